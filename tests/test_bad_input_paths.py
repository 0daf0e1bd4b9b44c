"""Bad paths: output folders, model paths and data paths that are wrong before any training starts.

Part of the bad-input suite (tests/test_bad_input.py): each case ends in ONE line `posttrain: error: ...` and
exit 2, and fails before the slow work (building a model, loading data, asking the hub). An output folder that
posttrain did not write is never touched. Tests run as root, where os.access says yes to almost anything, so
the place that cannot be written is /proc/x (creating a file in /proc fails, for root too).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from posttrain.errors import PosttrainError

BASE = "recipe: sft\nmodel: {{name_or_path: {model}}}\ndata: {{train: {data}}}\noutput_dir: {out}\n"
UNWRITABLE = "/proc/x"


def write_config(tmp_path: Path, model="tiny:llama", data="tiny:chat", out=None, name="c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(model=model, data=data, out=out or tmp_path / "out"))
    return path


def cli_error(capsys, argv: list[str], *patterns: str) -> str:
    """`posttrain ARGV` in-process exits 2 with one `posttrain: error:` line matching every regex."""
    from posttrain.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and lines and lines[-1].startswith("posttrain: error: "), err
    assert len([line for line in lines if line.startswith("posttrain: error: ")]) == 1, err
    for pattern in patterns:
        assert re.search(pattern, lines[-1]), f"{pattern!r} not in {lines[-1]!r}"
    return lines[-1]


def forbid(monkeypatch, target: str, why: str) -> None:
    """Make `module.attr` fail the test if it is called (the slow work the check must come before)."""
    module, _, attr = target.rpartition(".")

    def called(*args, **kwargs):
        raise AssertionError(f"{target} was called: {why}")

    monkeypatch.setattr(f"{module}.{attr}", called)


def forbid_hub(monkeypatch) -> None:
    # The loaders are what asks the hub for a name that is not a local folder (with retries, offline).
    forbid(monkeypatch, "transformers.AutoTokenizer.from_pretrained", "a name went to the hub")
    forbid(monkeypatch, "transformers.AutoModelForCausalLM.from_pretrained", "a name went to the hub")


# ----------------------------------------------------------------------------------------------------------
# 1. The one output-folder check (posttrain.files.check_output_folder), used by init-tiny and quantize.


def _file(path: Path) -> None:
    path.write_text("x")


def _full_folder(path: Path) -> None:
    path.mkdir()
    (path / "keep.txt").write_text("x")


@pytest.mark.parametrize("make, target, pattern", [
    (_file, "out", r"^--out .*/out: a file is in the way; choose a folder path$"),
    (_file, "out/deeper", r"^--out .*/out/deeper: a file is in the way \(.*/out is a file\)"),
    (_full_folder, "out", r"^--out .*/out is not empty; choose another folder or pass --overwrite$"),
    (None, UNWRITABLE, r"^--out /proc/x cannot be written \(creating a file in /proc fails: .*\); choose a folder"),
], ids=["file", "file-above", "not-empty", "proc"])
def test_check_output_folder_refuses(tmp_path, make, target, pattern):
    from posttrain.files import check_output_folder

    if make is not None:
        make(tmp_path / "out")
    with pytest.raises(PosttrainError) as info:
        check_output_folder(tmp_path / target, "--out")
    assert re.search(pattern, str(info.value)) and "\n" not in str(info.value), str(info.value)
    assert not any(p.name.startswith(".posttrain-probe") for p in tmp_path.rglob("*"))


def test_check_output_folder_accepts(tmp_path):
    from posttrain.files import check_output_folder

    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")  # a model: --overwrite may replace it
    assert check_output_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert check_output_folder(tmp_path / "empty", "--out") == tmp_path / "empty"
    assert check_output_folder(tmp_path / "full", "--out", overwrite=True) == tmp_path / "full"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "empty", "full"]  # nothing made or left


def test_init_tiny_refuses_a_folder_it_did_not_write(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, "posttrain.tiny.build_tokenizer", "the folder is refused before any work")
    foreign = tmp_path / "foreign2"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep")
    cli_error(capsys, ["init-tiny", foreign],
              rf"^posttrain: error: out_dir {re.escape(str(foreign))} is not empty; choose another folder or pass "
              r"--overwrite$")
    assert [p.name for p in foreign.iterdir()] == ["important.txt"]
    assert (foreign / "important.txt").read_text() == "keep"


def test_init_tiny_refuses_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.json", "posttrain.yaml", "model.safetensors"):
        (run / name).write_text("{}")
    cli_error(capsys, ["init-tiny", run], r"is not empty; choose another folder or pass --overwrite")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "model.safetensors", "posttrain.yaml"]


@pytest.mark.parametrize("where", ["afile", "afile/sub", UNWRITABLE])
def test_init_tiny_file_in_the_way_or_unwritable(tmp_path, capsys, where):
    (tmp_path / "afile").write_text("x")
    target = where if where.startswith("/") else tmp_path / where
    cli_error(capsys, ["init-tiny", target], r"^posttrain: error: out_dir .*(a file is in the way|cannot be written)")
    assert (tmp_path / "afile").read_text() == "x"


def test_init_tiny_overwrite_replaces_the_folder(tmp_path, capsys):
    from posttrain.cli import main

    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an earlier model
    (folder / "old.txt").write_text("x")
    assert main(["init-tiny", str(folder), "--overwrite"]) == 0, capsys.readouterr().err
    assert (folder / "config.json").stat().st_size > 2 and not (folder / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging folder left beside it


@pytest.mark.parametrize("case", ["foreign", "checkout", "current-folder", "parent-of-current"])
def test_overwrite_never_replaces_a_folder_that_holds_no_model(tmp_path, monkeypatch, capsys, case):
    """--overwrite given by mistake (init-tiny, quantize and merge share the check) deletes nothing of a project."""
    from posttrain.cli import main

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("keep")
    target = project
    if case == "checkout":
        (project / ".git").mkdir()
        (project / "config.json").write_text("{}")  # even a checkout that holds a config.json
    if case in ("current-folder", "parent-of-current"):
        (project / "config.json").write_text("{}")
        monkeypatch.chdir(project / "src" if case == "parent-of-current" else project)
    assert main(["init-tiny", str(target), "--overwrite"]) == 2
    assert "--overwrite replaces only a folder that holds a model" in capsys.readouterr().err
    assert (project / "notes.txt").read_text() == "keep" and (project / "src").is_dir()


def test_tiny_cache_still_rebuilds_its_own_folder(tmp_path, monkeypatch):
    from posttrain.tiny import TINY_VERSION, resolve_tiny_model

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    half_built = tmp_path / f"tiny-llama-v{TINY_VERSION}"
    half_built.mkdir()
    (half_built / "tokenizer.json").write_text("{")  # a build that died before config.json
    assert resolve_tiny_model("tiny:llama") == half_built
    assert (half_built / "config.json").is_file()


def test_quantize_uses_the_shared_check_before_loading(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, "posttrain.models.resolve_path", "--out is checked before the model is loaded")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    cli_error(capsys, ["quantize", "tiny:llama", "--out", tmp_path / "out"],
              r"^posttrain: error: --out .*/out is not empty; choose another folder or pass --overwrite$")
    cli_error(capsys, ["quantize", "tiny:llama", "--out", UNWRITABLE],
              r"^posttrain: error: --out /proc/x cannot be written")


# ----------------------------------------------------------------------------------------------------------
# 2. `posttrain run` with an output_dir that cannot be written: one line, before the tokenizer and the data.


@pytest.mark.parametrize("out", [UNWRITABLE, "afile/run"])
def test_run_checks_output_dir_before_loading_anything(tmp_path, capsys, monkeypatch, out):
    forbid(monkeypatch, "posttrain.recipe.resolve_path", "output_dir is checked before the model and data")
    forbid(monkeypatch, "posttrain.recipe.load_tokenizer", "output_dir is checked before the model and data")
    (tmp_path / "afile").write_text("x")
    out = out if out.startswith("/") else tmp_path / out
    line = cli_error(capsys, ["run", write_config(tmp_path, out=out)],
                     rf"^posttrain: error: output_dir {re.escape(str(out))}(:| cannot be written)")
    assert "training rows" not in line and (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_run_read_only_parent(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, "posttrain.recipe.resolve_path", "output_dir is checked before the model and data")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        cli_error(capsys, ["run", write_config(tmp_path, out=parent / "run")], r"output_dir .* cannot be written")
    finally:
        parent.chmod(0o755)


# ----------------------------------------------------------------------------------------------------------
# 3. A missing model path that looks local fails at once (no hub retries); a hub name still goes to the hub.


def test_missing_run_output_names_the_config_that_makes_it(tmp_path, monkeypatch):
    from posttrain.models import resolve_path

    monkeypatch.chdir(tmp_path)  # no runs/ folder yet: the bundled tiny/sft config has not run here
    with pytest.raises(PosttrainError, match=r"model path 'runs/tiny-sft' does not exist .*run `posttrain run "
                                             r"tiny/sft` first"):
        resolve_path("runs/tiny-sft")
    with pytest.raises(PosttrainError, match=r"run `posttrain run tiny/sft` first"):
        resolve_path("./runs/tiny-sft/")


@pytest.mark.parametrize("name", ["./no/model", "../no-model", "/no/such/model", "~/no-such-model/x", "a/b/c",
                                  "existing/model", r"C:\models\x"])
def test_path_looking_names_fail_at_once(tmp_path, monkeypatch, name):
    from posttrain.models import resolve_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    with pytest.raises(PosttrainError, match=r"^model path .* does not exist \(checked .*\); .*first"):
        resolve_path(name)


def test_hub_names_still_go_to_the_hub(tmp_path, monkeypatch):
    from posttrain.models import resolve_path

    monkeypatch.chdir(tmp_path)  # no local folder named Qwen or gpt2
    assert resolve_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_path("gpt2") == "gpt2"


def test_run_with_a_run_output_not_made_yet_never_asks_the_hub(tmp_path, capsys, monkeypatch):
    forbid_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cli_error(capsys, ["run", "tiny/dpo", f"output_dir={tmp_path / 'dpo'}"],
              r"^posttrain: error: model path 'runs/tiny-sft' does not exist .*run `posttrain run tiny/sft` first")
    assert not (tmp_path / "dpo").exists()


# ----------------------------------------------------------------------------------------------------------
# 4. `posttrain validate` checks every path that can be checked without training.


@pytest.mark.parametrize("make, pattern", [
    (lambda t: write_config(t, data=t / "missing.jsonl"), r"data file '.*missing\.jsonl' does not exist"),
    (lambda t: write_config(t, data="./data/train"), r"data file './data/train' does not exist"),
    (lambda t: write_config(t, model=t / "no-model"), r"model path '.*no-model' does not exist"),
    (lambda t: write_config(t, model="runs/tiny-sft"), r"model path 'runs/tiny-sft' .*posttrain run tiny/sft"),
    (lambda t: (t / "afile").write_text("x") and write_config(t, out=t / "afile"),
     r"output_dir .*afile: a file is in the way"),
    (lambda t: write_config(t, out=UNWRITABLE), r"output_dir /proc/x cannot be written"),
    (lambda t: (t / "foreign").mkdir() or (t / "foreign" / "x.txt").write_text("x") and
     write_config(t, out=t / "foreign"), r"output_dir .*foreign is not empty and was not written by posttrain"),
], ids=["data-file", "data-folder", "model", "run-output", "output-file", "output-unwritable", "output-foreign"])
def test_validate_checks_paths(tmp_path, capsys, monkeypatch, make, pattern):
    monkeypatch.chdir(tmp_path)
    cli_error(capsys, ["validate", make(tmp_path)], r"^posttrain: error: " + pattern)


def test_validate_refuses_a_finished_run_unless_overwrite(tmp_path, capsys):
    from posttrain.cli import main

    done = tmp_path / "out"
    done.mkdir()
    (done / "posttrain.yaml").write_text("{}")
    (done / "metrics.json").write_text("{}")
    config = write_config(tmp_path, out=done)
    cli_error(capsys, ["validate", config], r"output_dir .*out already holds a finished run .*overwrite")
    assert main(["validate", str(config), "overwrite=true"]) == 0


def test_validate_does_not_fetch_hub_names_or_build_tiny_models(tmp_path, capsys, monkeypatch):
    from posttrain.cli import main

    forbid_hub(monkeypatch)
    forbid(monkeypatch, "posttrain.tiny.build_tiny", "validate does not build the tiny model")
    forbid(monkeypatch, "datasets.load_dataset", "validate does not fetch hub datasets")
    monkeypatch.chdir(tmp_path)
    hub = write_config(tmp_path, model="Qwen/Qwen2.5-0.5B", data="HuggingFaceH4/ultrachat_200k")
    assert main(["validate", str(hub)]) == 0, capsys.readouterr().err
    assert main(["validate", str(write_config(tmp_path, model="tiny:qwen2", data="tiny:chat"))]) == 0


def write_pipeline(tmp_path: Path, stage_data="tiny:chat", suite="suite.yaml") -> Path:
    write_config(tmp_path, name="base.yaml")
    write_config(tmp_path, model="runs/unused", data=stage_data, name="sft.yaml")
    (tmp_path / "suite.yaml").write_text("{}\n")
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"recipe: pipeline\noutput_dir: {tmp_path / 'pipe'}\nstages:\n"
                    "  - {name: base, config: base.yaml}\n  - {name: sft, config: sft.yaml, model_from: base}\n"
                    f"  - {{name: report, compare: [base, sft], suite: {suite}}}\n")
    return path


def test_validate_pipeline_checks_each_stage(tmp_path, capsys, monkeypatch):
    from posttrain.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(write_pipeline(tmp_path))]) == 0, capsys.readouterr().err  # model_from: not yet
    cli_error(capsys, ["validate", write_pipeline(tmp_path, stage_data=tmp_path / "gone.jsonl")],
              r"^posttrain: error: stage sft: data file '.*gone\.jsonl' does not exist")
    cli_error(capsys, ["validate", write_pipeline(tmp_path, suite="nope.yaml")],
              r"^posttrain: error: stage report: suite 'nope\.yaml' not found")
    cli_error(capsys, ["validate", write_pipeline(tmp_path), f"output_dir={UNWRITABLE}"],
              r"^posttrain: error: output_dir /proc/x cannot be written")


def test_validate_bundled_demo_pipeline(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["validate", "demo/pipeline", f"output_dir={tmp_path / 'demo'}"]) == 0, capsys.readouterr().err
