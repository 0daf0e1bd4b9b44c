"""Surviving faults: SIGKILL + --resume gives the uninterrupted run's weights exactly, a crash while saving
leaves the previous checkpoint whole, SIGTERM saves and stops, a non-finite loss or a full disk stops the run
with one clear line and a good checkpoint kept. Runs are the tiny configs, fp32 on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import posttrain
from posttrain.config.schema import load_config
from posttrain.engine.checkpoints import latest_checkpoint
from posttrain.errors import PosttrainError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STEPS, EVERY = 30, 5
RUN = [f"train.max_steps={STEPS}", f"train.save_steps={EVERY}", "train.logging_steps=1", "train.batch_size=8",
       "train.save_total_limit=2", "data.eval=[]"]


def overrides(recipe: str, out: Path, start: Path | None) -> list[str]:
    return [f"output_dir={out}", *RUN] + ([f"model.name_or_path={start}"] if start else [])


def cli(args: list[str], prelude: str = "") -> subprocess.Popen:
    """`posttrain ...` in a fresh process (prelude: Python run first, e.g. a fault injector)."""
    code = f"{prelude}\nimport sys\nfrom posttrain.cli import main\nsys.exit(main({args!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same math as this process
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {process.stderr.read()[-2000:]}")
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, tiny_sft_dir):
    """The uninterrupted runs each interrupted one must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for recipe, start in (("sft", None), ("ternary", tiny_sft_dir)):
        out = root / recipe
        posttrain.run(load_config(CONFIGS / "tiny" / f"{recipe}.yaml", overrides(recipe, out, start)))
        runs[recipe] = out
    return runs


def config_args(recipe: str, out: Path, start: Path | None) -> list[str]:
    return ["run", str(CONFIGS / "tiny" / f"{recipe}.yaml"), *overrides(recipe, out, start)]


@pytest.mark.parametrize("recipe", ["sft", "ternary"])
def test_sigkill_then_resume_gives_identical_weights(recipe, tmp_path, tiny_sft_dir, reference_runs):
    start = tiny_sft_dir if recipe == "ternary" else None
    out = tmp_path / recipe
    process = cli(config_args(recipe, out, start))
    wait_for(out / "checkpoints" / f"checkpoint-{2 * EVERY}", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    resumed = cli(config_args(recipe, out, start) + ["--resume"])
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from" in stdout
    assert_identical(weights(out), weights(reference_runs[recipe]))
    history = json.loads((out / "metrics.json").read_text())["train_loss_history"]
    reference = json.loads((reference_runs[recipe] / "metrics.json").read_text())["train_loss_history"]
    assert history == reference  # the whole loss trajectory, restored and continued, is the reference's
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept == [f"checkpoint-{STEPS - EVERY}", f"checkpoint-{STEPS}"]  # save_total_limit=2


KILL_WHILE_SAVING = f"""
import os, signal, torch
_save = torch.save
def save(obj, f, *a, **k):
    _save(obj, f, *a, **k)
    if "checkpoint-{2 * EVERY}" in str(f) and str(f).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # model and optimizer written; scheduler, RNG, state not yet
torch.save = save
"""


def test_kill_during_save_keeps_previous_checkpoint_and_resume_works(tmp_path, reference_runs):
    out = tmp_path / "sft"
    process = cli(config_args("sft", out, None), prelude=KILL_WHILE_SAVING)
    process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    assert (checkpoints / ".saving" / f"checkpoint-{2 * EVERY}" / "optimizer.pt").is_file()  # it died mid-save
    assert not (checkpoints / f"checkpoint-{2 * EVERY}").exists()  # nothing half-written looks complete
    previous = latest_checkpoint(checkpoints)
    assert previous == checkpoints / f"checkpoint-{EVERY}"
    state = json.loads((previous / "trainer_state.json").read_text())
    assert state["global_step"] == EVERY and all(torch.isfinite(t).all() for t in weights(previous).values())
    resumed = cli(config_args("sft", out, None) + ["--resume"])
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert not (checkpoints / ".saving").exists()
    assert_identical(weights(out), weights(reference_runs["sft"]))


def test_sigterm_saves_a_checkpoint_and_stops_then_resumes(tmp_path, reference_runs):
    out = tmp_path / "sft"
    process = cli(config_args("sft", out, None))
    wait_for(out / "checkpoints" / f"checkpoint-{EVERY}", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    error_lines = [line for line in stderr.splitlines() if line.startswith("posttrain: error:")]
    assert len(error_lines) == 1 and "stopped by SIGTERM" in error_lines[0] and "--resume" in error_lines[0]
    assert "Traceback" not in stderr and not (out / "metrics.json").exists()
    stopped_at = json.loads((latest_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())
    assert EVERY < stopped_at["global_step"] < STEPS  # saved where it stopped, not at a save step
    resumed = cli(config_args("sft", out, None) + ["--resume"])
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert_identical(weights(out), weights(reference_runs["sft"]))


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    embed = torch.nn.Embedding.forward
    calls = {"n": 0}

    def poisoned(self, input_ids):  # a bad batch after step 5: its activations, hence its loss, are NaN
        output = embed(self, input_ids)
        calls["n"] += self.training
        return output * float("nan") if calls["n"] > EVERY + 2 else output

    monkeypatch.setattr(torch.nn.Embedding, "forward", poisoned)
    out = tmp_path / "sft"
    with pytest.raises(PosttrainError, match=r"training loss became nan at step \d+.*checkpoint-5.*--resume"):
        posttrain.run(load_config(CONFIGS / "tiny" / "sft.yaml", overrides("sft", out, None)))
    assert not (out / "metrics.json").exists()
    assert latest_checkpoint(out / "checkpoints").name == f"checkpoint-{EVERY}"
    assert all(torch.isfinite(t).all() for t in weights(out / "checkpoints" / f"checkpoint-{EVERY}").values())


def test_full_disk_refuses_to_save_with_one_line(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    out = tmp_path / "sft"
    with pytest.raises(PosttrainError, match="not enough free disk space .* checkpoint-5"):
        posttrain.run(load_config(CONFIGS / "tiny" / "sft.yaml", overrides("sft", out, None)))
    assert latest_checkpoint(out / "checkpoints") is None and not (out / "metrics.json").exists()


def test_resume_refuses_a_different_run_and_a_finished_one(tmp_path, reference_runs):
    finished = reference_runs["sft"]
    with pytest.raises(PosttrainError, match="already holds a finished run"):
        posttrain.run(load_config(CONFIGS / "tiny" / "sft.yaml", overrides("sft", finished, None)), resume=True)
    out = tmp_path / "sft"
    out.mkdir()
    (out / "posttrain.yaml").write_text((finished / "posttrain.yaml").read_text().replace("tiny:chat", "tiny:text"))
    with pytest.raises(PosttrainError, match="started with different data"):
        posttrain.run(load_config(CONFIGS / "tiny" / "sft.yaml", overrides("sft", out, None)), resume=True)
