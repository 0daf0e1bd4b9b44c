"""What a run says about itself: whether it continues an unfinished run or starts over (one line each), the last
step's loss in metrics.json and the final line, and one token count (the Trainer's) in every log line, also after
a resume. Runs are a few steps of the tiny SFT config, fp32 on CPU."""

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

import posttrain
from posttrain.config.schema import load_config
from posttrain.engine.checkpoints import GuardedTrainerMixin, RunInterrupted
from posttrain.pipeline import run_pipeline

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "sft.yaml"
STEPS, STOP = 8, 4
# batch_size 8 packs into 2 rows per micro-batch: TRL's own num_tokens would count one row's length per micro-batch.
FAST = [f"train.max_steps={STEPS}", "train.batch_size=8", "train.logging_steps=10", f"train.save_steps={STEPS}",
        "data.eval=[]"]  # the last checkpoint holds the whole log history


def config(out: Path, *extra: str):
    return load_config(CONFIG, [f"output_dir={out}", *FAST, *extra])


def interrupted_run(out: Path, monkeypatch, *extra: str) -> None:
    """A run stopped as by SIGTERM during step STOP: checkpoint-STOP saved, no metrics.json."""
    check = GuardedTrainerMixin._check_loss

    def stop_during_step(self, loss):
        if self.state.global_step + 1 == STOP:
            self.stop_request.signal_name = "SIGTERM"
        check(self, loss)

    with monkeypatch.context() as patch:
        patch.setattr(GuardedTrainerMixin, "_check_loss", stop_during_step)
        with pytest.raises(RunInterrupted):
            posttrain.run(config(out, *extra))
    assert (out / "checkpoints" / f"checkpoint-{STOP}").is_dir() and not (out / "metrics.json").exists()


def lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def trainer_state(out: Path) -> dict:
    return json.loads((out / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())


def logged_steps(out: Path) -> list[int]:
    return [entry["step"] for entry in trainer_state(out)["log_history"] if "loss" in entry]


def assert_one_token_count(out: Path, metrics: dict) -> None:
    """Every training log line's num_tokens is the Trainer's num_input_tokens_seen, and the last is metrics.json's."""
    logged = [entry for entry in trainer_state(out)["log_history"] if "loss" in entry]
    assert logged and all(entry["num_tokens"] == entry["num_input_tokens_seen"] for entry in logged), logged
    assert logged[-1]["num_tokens"] == metrics["trained_tokens"]


# 1. Resume is hard to lose: a rerun continues an unfinished run of the same settings, and every choice is said.

def test_rerun_continues_an_unfinished_run_with_the_same_settings(tmp_path, monkeypatch, capsys):
    reference = posttrain.run(config(tmp_path / "reference", "train.save_steps=0"))
    out = tmp_path / "run"
    interrupted_run(out, monkeypatch)
    capsys.readouterr()
    metrics = posttrain.run(config(out))  # the same command again, without --resume
    said = lines(capsys.readouterr().out, "resuming from")
    assert len(said) == 1 and f"checkpoint-{STOP}" in said[0] and "overwrite=true" in said[0], said
    assert metrics["steps"] == STEPS
    assert logged_steps(out) == [1, STOP, STEPS]  # step STOP's line comes from before the interruption
    assert metrics["trained_tokens"] == reference["trained_tokens"]
    assert_one_token_count(out, metrics)  # the count survives the resume
    weights, expected = load_file(out / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert all((weights[name] == expected[name]).all() for name in expected)


def test_changed_settings_start_over_and_say_the_checkpoints_are_discarded(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted_run(out, monkeypatch)
    capsys.readouterr()
    metrics = posttrain.run(config(out, "data.max_eval_rows=100"))
    said = lines(capsys.readouterr().err, "starting over")
    assert len(said) == 1 and "different data settings" in said[0] and f"checkpoint-{STOP}" in said[0], said
    assert "discarded" in said[0]
    assert metrics["steps"] == STEPS and logged_steps(out) == [1, STEPS]  # a new run: nothing from the old one
    assert not (tmp_path / ".run.replaced").exists()


def test_overwrite_starts_over_and_says_so(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted_run(out, monkeypatch)
    capsys.readouterr()
    metrics = posttrain.run(config(out, "overwrite=true"))
    said = lines(capsys.readouterr().out, "overwrite=true")
    assert len(said) == 1 and "starting over" in said[0] and f"checkpoint-{STOP}" in said[0], said
    assert metrics["steps"] == STEPS and logged_steps(out) == [1, STEPS]


def test_resume_without_an_unfinished_run_says_it_starts_from_the_beginning(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = posttrain.run(config(out, "train.max_steps=2"), resume=True)
    said = lines(capsys.readouterr().out, "--resume")
    assert len(said) == 1 and "starting from the beginning" in said[0], said
    assert metrics["steps"] == 2


def test_pipeline_redoes_an_interrupted_stage_from_its_start(tmp_path, monkeypatch, capsys):
    """The pipeline passes overwrite=true to every stage: an interrupted stage starts over, as before."""
    out = tmp_path / "pipe"
    stage_overrides = [*FAST, "overwrite=true"]
    interrupted_run(out / "sft", monkeypatch, "overwrite=true")
    path = tmp_path / "pipe.yaml"
    path.write_text(f"recipe: pipeline\noutput_dir: {out}\nstages:\n"
                    f"  - {{name: sft, config: {CONFIG}, overrides: {json.dumps(stage_overrides)}}}\n")
    capsys.readouterr()
    run_pipeline(path)
    assert not lines(capsys.readouterr().out, "resuming from")
    assert STOP not in logged_steps(out / "sft")  # nothing kept from the interrupted stage
    assert json.loads((out / "sft" / "metrics.json").read_text())["steps"] == STEPS


# 2. The last step's loss is logged, so metrics.json and the final line report it.

def test_last_step_loss_is_logged_below_the_logging_interval(tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "run"
    assert main(["run", str(CONFIG), f"output_dir={out}", *FAST, "train.max_steps=3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [step for step, _ in metrics["train_loss_history"]] == [1, 3]
    first, last = metrics["train_loss_first"], metrics["train_loss_last"]
    assert last == metrics["train_loss_history"][-1][1] and last != first
    final = lines(capsys.readouterr().out, "posttrain: done:")
    assert final == [f"posttrain: done: train loss {first:.4f} -> {last:.4f}, 3 steps"]


# 3. One token count: the logged num_tokens is the Trainer's num_input_tokens_seen.

def test_logged_num_tokens_is_the_trainers_count(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = posttrain.run(config(out, "train.logging_steps=2"))
    assert logged_steps(out) == [1, 2, 4, 6, 8]
    assert_one_token_count(out, metrics)
    console = [float(n) for n in re.findall(r"'num_tokens': '([\d.e+]+)'", capsys.readouterr().out)]
    assert console and console[-1] == metrics["trained_tokens"]
