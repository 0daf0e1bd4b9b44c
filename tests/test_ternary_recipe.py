"""Ternary QAT vs post-training ternarization on the tiny SFT model; exports load in plain transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import posttrain
from posttrain.config.schema import DataSource, load_config
from posttrain.data.formats import normalize
from posttrain.data.sft_tokenize import tokenize_rows
from posttrain.data.sources import read_source
from posttrain.errors import PosttrainError
from posttrain.models import is_ternary_dir

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def held_out_loss(model_dir) -> float:
    """Mean token cross-entropy on the tiny task's test split, assistant tokens only (as in training)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, origins = read_source(DataSource("tiny:chat", split="test"))
    cfg = load_config(CONFIGS / "tiny" / "sft.yaml").data
    examples = tokenize_rows(tokenizer, normalize(rows, origins, cfg, "eval"), 128).examples
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
            logits = model(ids).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def qat_dir(tiny_sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ternary") / "qat"
    metrics = posttrain.run(load_config(CONFIGS / "tiny" / "ternary.yaml",
                                        [f"model.name_or_path={tiny_sft_dir}", f"output_dir={out}"]))
    return out, metrics


def test_qat_recovers_what_ptq_loses(tiny_sft_dir, qat_dir, tmp_path):
    from posttrain.cli import main

    assert main(["quantize", str(tiny_sft_dir), "--method", "ternary", "--out", str(tmp_path / "ptq")]) == 0
    sft, ptq, qat = held_out_loss(tiny_sft_dir), held_out_loss(tmp_path / "ptq"), held_out_loss(qat_dir[0])
    print(f"held-out loss: sft {sft:.4f}  ptq {ptq:.4f}  qat {qat:.4f}")
    assert qat < ptq
    assert qat - sft < 0.5 * (ptq - sft)  # QAT closes most of the gap that PTQ opens


def test_qat_output_is_a_transformers_bitnet_checkpoint(qat_dir):
    out, metrics = qat_dir
    assert is_ternary_dir(out) and (out / "metrics.json").is_file()
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitnet" and config["linear_class"] == "bitlinear"
    bpw = metrics["bits_per_weight"]
    assert 1.9 < bpw["quantized_layers_bpw"] < 2.1 and bpw["whole_file_bpw"] < 16
    assert metrics["ternary_layers"] == 14 and metrics["train_loss_last"] < metrics["train_loss_first"]
    script = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
              "ids = t.apply_chat_template([{'role': 'user', 'content': 'What is 23 + 4?'}],"
              " add_generation_prompt=True, return_tensors='pt', return_dict=True);"
              "out = m.generate(**ids, max_new_tokens=4, do_sample=False);"
              "assert 'posttrain' not in sys.modules; print(out.shape[1] > ids['input_ids'].shape[1])")
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]


def test_ternary_output_trains_further(qat_dir, tmp_path):
    out, _ = qat_dir
    metrics = posttrain.run(load_config(CONFIGS / "tiny" / "ternary.yaml", [
        f"model.name_or_path={out}", f"output_dir={tmp_path / 'again'}", "train.max_steps=5",
        "ternary.lambda_schedule=none"]))
    assert metrics["steps"] == 5 and is_ternary_dir(tmp_path / "again")


def test_ternary_refuses_adapters_and_unknown_formats(tmp_path, tiny_sft_dir):
    with pytest.raises(PosttrainError, match="adapter must be absent for recipe: ternary"):
        load_config(CONFIGS / "tiny" / "ternary.yaml", ["adapter.method=lora"])
    with pytest.raises(PosttrainError, match="train.compile is not supported for recipe: ternary"):
        load_config(CONFIGS / "tiny" / "ternary.yaml", ["train.compile=true"])
    from posttrain.ternary.ptq import quantize

    with pytest.raises(PosttrainError, match="--format 'gguf-tq9' is not available"):
        quantize(str(tiny_sft_dir), tmp_path / "x", fmt="gguf-tq9")
