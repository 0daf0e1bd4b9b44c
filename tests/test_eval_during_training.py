"""Evaluation during training (the run config's `evaluate:` section): an eval suite scored every N steps on the
model being trained, into metrics.json's eval_history, the Trainer's log (hence the tracker) and the log lines."""

import json
import re
from pathlib import Path

import pytest
import yaml

import posttrain
from posttrain.config.schema import load_config
from posttrain.errors import PosttrainError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LIMIT = 12  # items per task: seconds per evaluation on the tiny model

SUITE = {
    "generation": [{"name": "add", "data": {"path": "tiny:chat", "split": "test"}, "max_new_tokens": 4}],
    "multiple_choice": [{"name": "add-mc", "data": {"path": "tiny:multiple_choice", "split": "test"}}],
    "perplexity": {"data": {"path": "tiny:text", "split": "test"}, "context": 64, "stride": 64},
}
KEYS = {"gen/add/exact_match", "gen/add/contains", "mc/add-mc/acc", "mc/add-mc/acc_norm",
        "perplexity/perplexity", "perplexity/bits_per_byte", "perplexity/word_perplexity"}


def write_suite(folder: Path, suite: dict = SUITE, name: str = "suite.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump(suite))
    return folder / name


def run(name: str, out: Path, suite: Path, *overrides: str) -> dict:
    cfg = load_config(CONFIGS / "tiny" / f"{name}.yaml",
                      [f"output_dir={out}", "train.max_steps=4", "train.logging_steps=1", f"evaluate.suite={suite}",
                       "evaluate.every_steps=2", f"evaluate.limit={LIMIT}", *overrides])
    return posttrain.run(cfg)


def assert_history(metrics: dict, out: Path, steps: list[int]) -> list[dict]:
    history = metrics["eval_history"]
    assert json.loads((out / "metrics.json").read_text())["eval_history"] == history
    assert [entry["step"] for entry in history] == steps
    for entry in history:
        assert set(entry) == KEYS | {"step"}, entry
        assert all(0 <= entry[k] <= 1 for k in KEYS if k.startswith(("gen/", "mc/"))), entry
        assert entry["perplexity/perplexity"] > 1
    return history


def test_sft_scores_every_n_steps_and_the_last_matches_posttrain_eval(tmp_path, tiny_sft_dir, monkeypatch, capsys):
    from posttrain.engine.trainer_args import LossHistory
    from posttrain.eval import run_eval, runner

    seen, generated = [], []  # what every callback's on_log gets (reporters such as TensorBoard's too); outputs
    on_log, generate = LossHistory.on_log, runner.generate_greedy
    monkeypatch.setattr(LossHistory, "on_log", lambda self, args, state, control, logs=None, **kw: (
        seen.append(dict(logs)), on_log(self, args, state, control, logs=logs, **kw))[1])
    monkeypatch.setattr(runner, "generate_greedy", lambda *a, **kw: (generated.append(generate(*a, **kw)),
                                                                      generated[-1])[1])
    out = tmp_path / "sft"
    metrics = run("sft", out, write_suite(tmp_path), f"model.name_or_path={tiny_sft_dir}")
    history = assert_history(metrics, out, [2, 4])
    assert [step for step, _ in metrics["train_loss_history"]] == [1, 2, 3, 4]  # scoring keeps every loss line

    # The tracker gets the figures under eval_ (TensorBoard shows eval/gen/add/exact_match), and TRL's own training
    # figures stay in their training lines.
    scored = [logs for logs in seen if "eval_gen/add/exact_match" in logs]
    assert len(scored) == 2 and all("loss" not in logs and "mean_token_accuracy" not in logs for logs in scored)
    assert all("mean_token_accuracy" in logs for logs in seen if "loss" in logs)
    assert re.search(r"posttrain: step 4: .*gen/add/exact_match [0-9.]+", capsys.readouterr().out)

    # The last figures are posttrain eval's of the saved model: same scorers, same items, greedy decoding.
    limited = {"generation": [{**SUITE["generation"][0], "limit": LIMIT}],
               "multiple_choice": [{**SUITE["multiple_choice"][0], "limit": LIMIT}],
               "perplexity": {**SUITE["perplexity"], "limit": LIMIT}}
    during = generated[-1]
    final = run_eval([f"final={out}"], limited, tmp_path / "eval")["variants"]["final"]
    assert len(during) == LIMIT and generated[-1] == during  # the same generated text, item by item
    for key in KEYS:
        if key.startswith("gen/"):
            assert history[-1][key] == final[key], key
        else:
            assert history[-1][key] == pytest.approx(final[key], rel=1e-4), key


def test_dpo_and_the_last_step_between_two_scored_ones(tmp_path, tiny_sft_dir):
    out = tmp_path / "dpo"
    metrics = run("dpo", out, write_suite(tmp_path), f"model.name_or_path={tiny_sft_dir}", "train.max_steps=3")
    assert_history(metrics, out, [2, 3])  # every 2 steps, and the last
    assert "rewards/accuracies" in metrics["last_train_log"]  # TRL's DPO figures stay in the training lines


def test_lora_scores_the_adapter_model(tmp_path):
    out = tmp_path / "lora"
    metrics = run("lora", out, write_suite(tmp_path), "train.max_steps=2", "evaluate.every_steps=1")
    assert_history(metrics, out, [1, 2])
    assert (out / "adapter_config.json").is_file()


def test_ternary_scores_the_qat_model(tmp_path, tiny_sft_dir):
    out = tmp_path / "ternary"
    metrics = run("ternary", out, write_suite(tmp_path), f"model.name_or_path={tiny_sft_dir}", "train.max_steps=2")
    assert_history(metrics, out, [2])


def test_evaluation_leaves_training_unchanged(tmp_path):
    """Scoring restores the random number generators and the training mode: the losses are the same as without."""
    plain = posttrain.run(load_config(CONFIGS / "tiny" / "sft.yaml", [
        f"output_dir={tmp_path / 'plain'}", "train.max_steps=4", "train.logging_steps=1"]))
    scored = run("sft", tmp_path / "scored", write_suite(tmp_path), "evaluate.every_steps=1")
    assert scored["train_loss_history"] == plain["train_loss_history"]
    assert [e["step"] for e in scored["eval_history"]] == [1, 2, 3, 4]


def test_resume_keeps_the_entries_of_the_checkpoint(tmp_path, monkeypatch):
    from posttrain.engine.checkpoints import GuardedTrainerMixin
    from posttrain.eval.runner import SuiteRun

    calls = []
    evaluate = SuiteRun.evaluate
    monkeypatch.setattr(SuiteRun, "evaluate",
                        lambda self, variant: (calls.append(variant.name), evaluate(self, variant))[1])
    compute_loss = GuardedTrainerMixin.compute_loss

    def crash_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2 and self.model.training:
            raise RuntimeError("simulated crash after checkpoint-2")
        return compute_loss(self, *args, **kwargs)

    out, suite = tmp_path / "sft", write_suite(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(GuardedTrainerMixin, "compute_loss", crash_at_step_3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run("sft", out, suite, "train.save_steps=2")
    assert calls == ["step 2"]
    cfg = load_config(CONFIGS / "tiny" / "sft.yaml", [f"output_dir={out}", "train.max_steps=4", "train.logging_steps=1",
                                                       f"evaluate.suite={suite}", "evaluate.every_steps=2",
                                                       f"evaluate.limit={LIMIT}", "train.save_steps=2"])
    metrics = posttrain.run(cfg, resume=True)
    assert calls == ["step 2", "step 4"]  # step 2's figures come from the checkpoint, not from scoring again
    assert_history(metrics, out, [2, 4])


def test_ddp_scores_on_the_main_process_and_matches_one_process(tmp_path):
    """2-process DDP (gloo) trains like 1 process with 2 accumulation steps (tests/test_distributed.py), so the
    figures match; the main process scores, the other waits for it, and the line is printed once."""
    import os
    import shutil
    import subprocess
    import sys

    suite = write_suite(tmp_path)
    args = [str(CONFIGS / "tiny" / "sft.yaml"), "train.max_steps=4", "train.logging_steps=1", "train.batch_size=4",
            "train.warmup_ratio=0", "data.eval=[]", f"evaluate.suite={suite}", "evaluate.every_steps=2",
            f"evaluate.limit={LIMIT}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    ddp = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "posttrain", "run", *args,
                          f"output_dir={tmp_path / 'ddp'}", "train.grad_accum=1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("posttrain: step 4: ") == 1
    one = subprocess.run([sys.executable, "-m", "posttrain", "run", *args, f"output_dir={tmp_path / 'one'}",
                          "train.grad_accum=2"], capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("ddp", "one")]
    assert [e["step"] for e in runs[0]["eval_history"]] == [2, 4]
    for scored, expected in zip(runs[0]["eval_history"], runs[1]["eval_history"]):
        assert scored == pytest.approx(expected, rel=1e-4)


def test_tensorboard_gets_the_eval_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run("sft", out, write_suite(tmp_path), "train.max_steps=2", "train.report_to=tensorboard")
    events = [EventAccumulator(str(p.parent)).Reload() for p in out.rglob("events.out.tfevents.*")]
    tags = {tag for e in events for tag in e.Tags()["scalars"]}
    assert "eval/gen/add/exact_match" in tags and "eval/perplexity/perplexity" in tags


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line naming the key or the suite section, before any output is written.

BASE = "recipe: sft\nmodel: {name_or_path: tiny:llama}\ndata: {train: tiny:chat}\ntrain: {max_steps: 2}\n"


def write_config(tmp_path: Path, evaluate: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + f"output_dir: {tmp_path / 'out'}\n" + evaluate)
    return path


@pytest.mark.parametrize("section, pattern", [
    ("preference: {data: {path: tiny:preference, split: test}, reference: tiny:llama}",
     r"evaluate\.suite: .*s\.yaml has a preference section, which needs a reference model; only generation, "
     r"multiple_choice and perplexity run during training"),
    ("drift: {base: tiny:llama, data: {path: tiny:text, split: test}}", r"has a drift section"),
    ("lm_eval: {tasks: [x]}", r"has a lm_eval section"),
    ("seed: 1", r"s\.yaml has no generation, multiple_choice or perplexity section"),
    ("generation: [{name: a, data: {path: tiny:chat, split: test}, strid: 1}]",
     r"unknown key 'generation\[0\]\.strid'"),
])
def test_suite_sections_that_cannot_run_are_refused_by_the_cli(tmp_path, capsys, section, pattern):
    from posttrain.cli import main

    (tmp_path / "s.yaml").write_text(section + "\n")
    code = main(["run", str(write_config(tmp_path, "evaluate: {suite: s.yaml}\n"))])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("posttrain: error: ")]
    assert code == 2 and len(errors) == 1 and re.search(pattern, errors[0]), errors
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("evaluate, pattern", [
    ("evaluate: {suite: s.yaml, every_steps: 0}", r"c\.yaml:6: evaluate\.every_steps must be >= 1"),
    ("evaluate: {suite: s.yaml, limit: 0}", r"evaluate\.limit must be >= 1"),
    ("evaluate: {every_steps: 5}", r"evaluate\.suite is required"),
    ("evaluate: {suite: nowhere.yaml}", r"c\.yaml:6: evaluate\.suite: nowhere\.yaml not found"),
    ("evaluate: {suite: s.yaml, evry_steps: 5}", r"unknown key 'evaluate\.evry_steps'.*every_steps"),
])
def test_evaluate_section_values_name_the_key(tmp_path, evaluate, pattern):
    write_suite(tmp_path, name="s.yaml")
    with pytest.raises(PosttrainError, match=pattern):
        load_config(write_config(tmp_path, evaluate + "\n"))


def test_suite_path_resolves_next_to_the_config_then_from_the_current_folder(tmp_path, monkeypatch):
    suite = write_suite(tmp_path / "configs" / "eval", name="train.yaml")
    (tmp_path / "configs" / "run").mkdir()
    config = tmp_path / "configs" / "run" / "c.yaml"
    config.write_text(BASE + "output_dir: out\nevaluate: {suite: ../eval/train.yaml}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(config).evaluate.suite == str(suite)  # next to the config
    assert load_config(config, ["evaluate.suite=configs/eval/train.yaml"]).evaluate.suite == str(suite)  # from here
    with pytest.raises(PosttrainError, match=r"command-line override: evaluate\.suite: x\.yaml not found"):
        load_config(config, ["evaluate.suite=x.yaml"])


def test_sharded_training_is_refused_before_any_output(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    write_suite(tmp_path, name="s.yaml")
    with pytest.raises(PosttrainError, match=r"evaluate: not supported under FSDP"):
        posttrain.run(load_config(write_config(tmp_path, "evaluate: {suite: s.yaml}\n")))
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(PosttrainError, match=r"evaluate: not supported under DeepSpeed ZeRO-3"):
        posttrain.run(load_config(write_config(tmp_path, "evaluate: {suite: s.yaml}\n")))
