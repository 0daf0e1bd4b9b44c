"""The sft recipe on the tiny model: full, LoRA, QLoRA; outputs load with plain transformers / peft."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.config.schema import load_config
from posttrain.engine.run_dir import is_complete
from posttrain.errors import PosttrainError
from posttrain.tiny import TINY_VERSION

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_tiny(name, out, *overrides):
    cfg = load_config(CONFIGS / "tiny" / f"{name}.yaml",
                      [f"output_dir={out}", "train.max_steps=20", "train.logging_steps=5", *overrides])
    return cfg, posttrain.run(cfg)


def assert_finished(out: Path, metrics: dict):
    assert is_complete(out) and (out / "posttrain.yaml").is_file() and (out / "README.md").is_file()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["train_loss_first"] == metrics["train_loss_first"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.3, metrics["train_loss_history"]
    assert metrics["trained_tokens"] > 0 and metrics["tokens_per_second"] > 0
    assert set(metrics["versions"]) >= {"torch", "transformers", "trl", "peft", "posttrain"}
    assert "base_model: tiny:llama" in (out / "README.md").read_text()


def test_full_sft_trains_and_loads_in_plain_transformers(tmp_path, tiny_model_dir):
    out = tmp_path / "sft"
    _, metrics = run_tiny("sft", out)
    assert_finished(out, metrics)
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) == len(list(base.parameters()))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id


def test_lora_adapter_loads_with_peft_and_merge_matches(tmp_path, tiny_model_dir):
    from peft import PeftModel

    out = tmp_path / "lora"
    _, metrics = run_tiny("lora", out)
    assert_finished(out, metrics)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out).eval()
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)

    from posttrain.cli import main

    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        diff = (adapted(ids).logits - merged(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_qlora_trains_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    _, metrics = run_tiny("qlora", out)
    assert_finished(out, metrics)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith(f"tiny-llama-v{TINY_VERSION}") and config["r"] == 16


def test_finished_run_is_refused_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "sft"
    run_tiny("sft", out, "train.max_steps=2")
    with pytest.raises(PosttrainError, match="already holds a finished run"):
        run_tiny("sft", out, "train.max_steps=2")
    _, metrics = run_tiny("sft", out, "train.max_steps=3", "overwrite=true")
    assert metrics["steps"] == 3


def test_crash_leaves_no_finished_looking_output(tmp_path, monkeypatch):
    import trl

    def explode(self, *args, **kwargs):
        raise RuntimeError("simulated crash in the middle of training")

    monkeypatch.setattr(trl.SFTTrainer, "train", explode)
    out = tmp_path / "sft"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny("sft", out)
    assert not is_complete(out) and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    _, metrics = run_tiny("sft", out, "train.max_steps=2")  # an unfinished run of ours is reused
    assert is_complete(out) and metrics["steps"] == 2


def test_foreign_folder_is_never_clobbered(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(PosttrainError, match="not empty and was not written by posttrain"):
        run_tiny("sft", out)
    assert (out / "thesis.tex").read_text() == "precious"


def test_failed_overwrite_loses_nothing_and_inputs_are_never_outputs(tmp_path):
    out = tmp_path / "sft"
    run_tiny("sft", out, "train.max_steps=2")
    with pytest.raises(PosttrainError, match="does not exist"):
        run_tiny("sft", out, "overwrite=true", "data.train=./typo.jsonl")
    assert is_complete(out)  # the data is checked before the folder is touched
    with pytest.raises(PosttrainError, match="holds this run's own input"):
        run_tiny("sft", out, "overwrite=true", f"model.name_or_path={out}")
    assert is_complete(out)


def test_merge_never_replaces_a_folder_without_overwrite(tmp_path):
    from posttrain.cli import main

    run_tiny("lora", tmp_path / "lora", "train.max_steps=2")
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert main(["merge", str(tmp_path / "lora"), "--out", str(target)]) == 2
    assert (target / "notes.txt").read_text() == "keep me"
    # --overwrite replaces an earlier model, never a folder that holds none
    assert main(["merge", str(tmp_path / "lora"), "--out", str(target), "--overwrite"]) == 2
    assert (target / "notes.txt").read_text() == "keep me"
    merged = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "lora"), "--out", str(merged)]) == 0
    assert main(["merge", str(tmp_path / "lora"), "--out", str(merged), "--overwrite"]) == 0


def test_compiled_layers_train_like_eager_and_save_the_same_names(tmp_path):
    """train.compile: the decoder layers compiled (dynamic shapes: packed rows vary in length) give the eager
    run's losses, and the saved checkpoint has the eager model's parameter names (plain transformers loads it)."""
    eager_out, compiled_out = tmp_path / "eager", tmp_path / "compiled"
    _, eager = run_tiny("sft", eager_out, "train.max_steps=6", "train.logging_steps=1")
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    _, compiled = run_tiny("sft", compiled_out, "train.max_steps=6", "train.logging_steps=1", "train.compile=true")
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not silently run eagerly
    assert compiled["speed"]["compile_layers"] is True and eager["speed"]["compile_layers"] is False
    losses = [loss for _, loss in eager["train_loss_history"]]
    assert [loss for _, loss in compiled["train_loss_history"]] == pytest.approx(losses, rel=1e-4, abs=1e-4)
    a, b = (AutoModelForCausalLM.from_pretrained(out).state_dict() for out in (eager_out, compiled_out))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_nothing_reads_the_device_between_the_backward_and_the_next_forward(tmp_path, monkeypatch, name,
                                                                           tiny_model_dir):
    """On a GPU, reading a tensor's value waits for all queued work. The Trainer reads the loss (NaN filter, our
    guard) and counts tokens after the backward, which would stall the host there instead of letting it queue the
    optimizer step and load the next batch while the backward runs; posttrain reads both right after the forward
    (checkpoints.py). Here every .item() / bool() is recorded: between a step's backward and the next forward there
    are none (logging_steps is out of reach, so only step 1 logs), and every micro-step's tokens are counted once."""
    import transformers

    events, counted = [], []
    item, as_bool, backward = torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "item", lambda self: events.append("read") or item(self))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: events.append("read") or as_bool(self))
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: events.append("backward") or backward(
        self, *a, **k))
    step = transformers.Trainer.training_step  # entered before each micro-step's forward
    monkeypatch.setattr(transformers.Trainer, "training_step",
                        lambda self, *a, **k: events.append("forward") or step(self, *a, **k))
    track = transformers.Trainer._track_num_input_tokens
    monkeypatch.setattr(transformers.Trainer, "_track_num_input_tokens",
                        lambda self, inputs: counted.append(events[-1]) or track(self, inputs))
    start = [f"model.name_or_path={tiny_model_dir}"] if name == "dpo" else []  # dpo.yaml starts from tiny-sft
    _, metrics = run_tiny(name, tmp_path / name, "train.max_steps=4", "train.logging_steps=100", *start)
    steps = "".join("F" if e == "forward" else "B" if e == "backward" else "r" for e in events)
    gaps = re.findall(r"B(r*)F", steps)  # the reads from each backward to the next forward
    assert steps.count("F") == 4 and len(gaps) == 3 and gaps[1:] == ["", ""], steps  # gaps[0]: step 1's log
    assert len(counted) == 4 and metrics["trained_tokens"] > 0
