"""One logger: informational lines once per launch (main process), warnings with their rank, --quiet, and dotted
overrides anywhere on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_log(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"from posttrain import log; {code}"], capture_output=True,
                          text=True, env={**os.environ, **env}, check=True)


def test_information_comes_from_the_main_process_only():
    main = run_log("log.info('hello')", RANK="0", WORLD_SIZE="2")
    other = run_log("log.info('hello')", RANK="1", WORLD_SIZE="2")
    assert main.stdout == "posttrain: hello\n"
    assert other.stdout == "" and other.stderr == ""


def test_warnings_name_their_rank_in_a_multi_process_run():
    other = run_log("log.warning('disk is slow')", RANK="1", WORLD_SIZE="2")
    alone = run_log("log.warning('disk is slow')")
    assert other.stderr == "posttrain: warning [rank 1]: disk is slow\n"
    assert alone.stderr == "posttrain: warning: disk is slow\n"


def test_quiet_keeps_errors_only():
    quiet = run_log("log.set_quiet(); log.info('a'); log.warning('b')")
    assert quiet.stdout == "" and quiet.stderr == ""


@pytest.mark.parametrize("argv", [
    ["validate", "tiny/sft", "--quiet", "train.max_steps=3"],  # an override after a flag
    ["validate", "tiny/sft", "train.max_steps=3", "--quiet"],
])
def test_overrides_anywhere_on_the_line(argv):
    done = subprocess.run([sys.executable, "-m", "posttrain", *argv], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "max_steps: 3" in done.stdout


def test_a_flag_that_is_not_an_override_is_still_refused():
    done = subprocess.run([sys.executable, "-m", "posttrain", "validate", "tiny/sft", "--bogus"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr


def test_quiet_run_prints_only_the_summary(tmp_path):
    done = subprocess.run([sys.executable, "-m", "posttrain", "run", "tiny/sft", "--quiet", "train.max_steps=2",
                           f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if line.strip()] == [done.stdout.strip().splitlines()[-1]]
    assert done.stdout.startswith("posttrain: done: train loss")
    assert "%|" not in done.stderr  # no progress bar


def test_a_warning_every_process_raises_alike_is_said_once():
    other = run_log("log.warning('no layers', every_rank=False)", RANK="1", WORLD_SIZE="2")
    main = run_log("log.warning('no layers', every_rank=False)", RANK="0", WORLD_SIZE="2")
    assert other.stderr == "" and main.stderr == "posttrain: warning [rank 0]: no layers\n"


def test_quiet_can_be_undone(monkeypatch):
    from posttrain import log

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    log.set_quiet()
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "error" and log.quiet()
    log.set_quiet(False)
    assert "TQDM_DISABLE" not in os.environ and os.environ["TRANSFORMERS_VERBOSITY"] == "info" and not log.quiet()


def test_resume_is_refused_for_a_pipeline():
    done = subprocess.run([sys.executable, "-m", "posttrain", "run", "demo/pipeline", "--resume"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 2 and "--resume is for one run" in done.stderr
