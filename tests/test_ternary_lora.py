"""LoRA on a frozen 1.58-bit base: the base stays packed (2 bits per weight) and unchanged while the adapter trains,
peft saves and loads the adapter, `posttrain eval` takes it, and a ternary_merge adapter merges into a model that is
exactly ternary (BitNet folder and GGUF) with the unmerged model's greedy outputs and logits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import posttrain
from posttrain.cli import main as cli
from posttrain.config.schema import load_config
from posttrain.ternary import bitnet_weight_scale, load_ternary, unpack_ternary
from posttrain.ternary.lora import (
    TERNARY_ADAPTER_FILE,
    PackedTernaryLinear,
    TernaryLoraLinear,
    base_weight_bytes,
    load_adapter,
    load_packed_ternary,
    lora_config_for,
    packed_layers,
)
from posttrain.tiny import tiny_rows

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "ternary-lora.yaml"
# The bound. Measured 0.0 in fp32 (the demo adapter, 100 held-out prompts): the merged file holds the codes and
# weight_scale the adapter model computed with, and transformers' BitLinear runs the same float operations on them.
MERGE_BOUND = 1e-4


@pytest.fixture(scope="module")
def ternary_base(tmp_path_factory) -> Path:
    """A BitNet folder: the tiny Llama ternarized without training (posttrain quantize)."""
    out = tmp_path_factory.mktemp("tlora") / "base"
    assert cli(["quantize", "tiny:llama", "--out", str(out)]) == 0
    return out


def run_adapter(base: Path, out: Path, ternary_merge: bool) -> dict:
    overrides = [f"model.name_or_path={base}", f"output_dir={out}", f"adapter.ternary_merge={ternary_merge}",
                 "train.max_steps=30", "train.learning_rate=1e-2", "train.logging_steps=5", "data.max_eval_rows=32"]
    return posttrain.run(load_config(CONFIG, overrides))


@pytest.fixture(scope="module")
def plain_run(ternary_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("tlora") / "plain"
    return out, run_adapter(ternary_base, out, ternary_merge=False)


@pytest.fixture(scope="module")
def merge_run(ternary_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("tlora") / "ternary-merge"
    return out, run_adapter(ternary_base, out, ternary_merge=True)


def prompts(tokenizer, n: int = 8) -> list[torch.Tensor]:
    rows = tiny_rows("chat", "test")[:n]
    return [tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"] for row in rows]


def error_lines(capsys) -> list[str]:
    # transformers' weight-loading bar reads TQDM_DISABLE only when tqdm is first imported: in this process, before
    # --quiet sets it, so it may still draw here (a fresh `posttrain --quiet` process draws none)
    return [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]


def file_digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def test_packed_base_is_the_bitnet_function_in_2_bits(ternary_base):
    """Same logits as transformers' BitLinear, the same input gradient as posttrain's BitLinear (straight-through),
    no parameter in the ternary layers, and 2 bits per weight where the dense model holds 32."""
    packed = load_packed_ternary(ternary_base, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(ternary_base, dtype=torch.float32)
    latent = load_ternary(ternary_base, torch.float32)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, reference(ids).logits)
    grads = []
    for model in (packed, latent):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.square().mean().backward()
        grads.append(embeds.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)

    layers = packed_layers(packed)
    assert len(layers) == 14 and not any(list(m.parameters(recurse=False)) for _, m in layers)
    # the float32 scale round-trips to the stored weight_scale exactly (what lets a merge's export be bit-exact)
    assert all(torch.equal(bitnet_weight_scale(m.scale(), m.weight_scale.dtype), m.weight_scale) for _, m in layers)
    held = base_weight_bytes(packed)
    dense = sum(m.weight.nbytes for n, m in latent.named_modules() if type(m).__name__ == "BitLinear")
    assert held["dense_bytes"] == dense  # measured against what the dense (latent-weight) model holds
    assert held["packed_bytes"] == sum(m.weight.nbytes + m.weight_scale.nbytes for _, m in layers)
    assert held["ratio"] < 1 / 4 and held["packed_bytes"] * 15 < dense  # 2 bits + one scale per layer vs 32 bits


@pytest.mark.parametrize("ternary_merge", [False, True], ids=["plain", "ternary_merge"])
def test_training_moves_only_the_adapter_and_peft_reloads_it(ternary_base, tmp_path, ternary_merge):
    model = load_packed_ternary(ternary_base, torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora_config_for(config, ternary_merge))
    wrapped = {type(m) for m in peft_model.modules() if hasattr(m, "lora_A")}
    assert (TernaryLoraLinear in wrapped) == ternary_merge
    base_before = {n: b.clone() for n, b in peft_model.named_buffers() if "weight" in n}
    frozen_before = {n: p.clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, base_before[n]) for n, b in peft_model.named_buffers() if n in base_before)
    assert all(torch.equal(p, frozen_before[n]) for n, p in peft_model.named_parameters() if n in frozen_before)

    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
    base = load_packed_ternary(ternary_base, torch.float32)
    if ternary_merge:  # the quantizer-aware layer is posttrain's: registered again on load
        from posttrain.ternary.lora import write_adapter_kind

        write_adapter_kind(tmp_path / "adapter", True)
        loaded = load_adapter(base, tmp_path / "adapter")
    else:  # peft alone loads a plain adapter
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_recipe_trains_adapter_on_packed_base(ternary_base, plain_run):
    out, metrics = plain_run
    digest = file_digest(ternary_base)
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    held = metrics["ternary_base"]
    assert held["layers"] == 14 and held["ratio"] < 1 / 4 and held["ternary_merge"] is False
    assert json.loads((out / "metrics.json").read_text())["ternary_base"] == held
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and Path(config["base_model_name_or_path"]) == ternary_base.resolve()
    assert json.loads((out / TERNARY_ADAPTER_FILE).read_text())["ternary_merge"] is False
    lora_b = [t for k, t in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(t.abs().sum() > 0 for t in lora_b)  # every adapter moved away from B = 0
    assert file_digest(ternary_base) == digest

    # peft on its own, on the packed base, gives the outputs posttrain eval's loader gives
    from posttrain.eval.variants import load_variant

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = prompts(tokenizer, 1)[0]
    peft_model = PeftModel.from_pretrained(load_packed_ternary(ternary_base, torch.float32), str(out)).eval()
    variant = load_variant(f"tlora={out}", device="cpu")
    adapter_weights = load_file(out / "adapter_model.safetensors")
    assert variant.kind == "adapter" and variant.trainable_params == sum(t.numel() for t in adapter_weights.values())
    with torch.no_grad():
        expected = peft_model(ids).logits
        assert torch.equal(variant.model(ids).logits, expected)
        assert not torch.allclose(expected, load_packed_ternary(ternary_base, torch.float32)(ids).logits)


def test_plain_adapter_has_no_ternary_merge(plain_run, tmp_path, capsys):
    out, _ = plain_run
    assert cli(["merge", str(out), "--out", str(tmp_path / "merged")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "no exact ternary merge" in err[0] and "adapter.ternary_merge" in err[0]
    assert not (tmp_path / "merged").exists()


def test_ternary_merge_writes_an_exactly_ternary_model(ternary_base, merge_run, tmp_path):
    out, metrics = merge_run
    assert metrics["train_loss_last"] < metrics["train_loss_first"] and metrics["ternary_base"]["ternary_merge"]
    assert cli(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()  # plain transformers
    unmerged = load_adapter(load_packed_ternary(ternary_base, torch.float32), out).eval()
    base = load_packed_ternary(ternary_base, torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    worst, moved = 0.0, 0.0
    for ids in prompts(tokenizer):
        with torch.no_grad():
            a, b = merged(ids).logits, unmerged(ids).logits
            worst = max(worst, (a - b).abs().max().item())
            moved = max(moved, (b - base(ids).logits).abs().max().item())
            greedy = [m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                      for m in (merged, unmerged)]
        assert torch.equal(greedy[0], greedy[1])
    assert worst <= MERGE_BOUND and moved > 100 * MERGE_BOUND  # equal to the adapter model, not to the base

    # the merged weights are ternary codes in the BitNet layout (never the unused code 11) and differ from the base's
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    base_weights = load_file(ternary_base / "model.safetensors")
    packed = {k: t for k, t in weights.items() if t.dtype == torch.uint8}
    assert len(packed) == 14 and all(f"{k}_scale" in weights for k in packed)
    assert all(((t >> (2 * i)) & 3).ne(3).all() for t in packed.values() for i in range(4))
    changed = sum(not torch.equal(unpack_ternary(t), unpack_ternary(base_weights[k])) for k, t in packed.items())
    assert changed > 0


def test_ternary_merge_to_gguf_holds_the_merged_codes(merge_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    out, _ = merge_run
    assert cli(["merge", str(out), "--out", str(tmp_path / "bitnet")]) == 0
    assert cli(["merge", str(out), "--out", str(tmp_path / "gguf"), "--format", "gguf-tq2"]) == 0
    reader = gguf.GGUFReader(tmp_path / "gguf" / "model-tq2_0.gguf")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")  # no q/k row permutation
    values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()
    packed = load_file(tmp_path / "bitnet" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    codes = unpack_ternary(packed).float()
    assert torch.equal(torch.sign(values).reshape(codes.shape), codes)


def test_eval_compares_the_adapter_with_its_base(ternary_base, merge_run, tmp_path):
    from posttrain.eval import run_eval

    out, _ = merge_run
    suite = {"generation": [{"name": "add", "data": {"path": "tiny:chat", "split": "test"}, "max_new_tokens": 4,
                             "limit": 24}]}
    results = run_eval([f"ternary={ternary_base}", f"tlora={out}"], suite, tmp_path / "eval", baseline="ternary")
    assert set(results["variants"]) == {"ternary", "tlora"}
    assert all("gen/add/exact_match" in v for v in results["variants"].values())
    assert "tlora" in results["stats"]["comparisons"]
    assert (tmp_path / "eval" / "report.md").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["adapter.target_modules=[q_proj,input_layernorm]"], "adapter.target_modules ['input_layernorm'] are not linear"),
    (["adapter.target_modules=[qproj]"], "adapter.target_modules ['qproj'] not in the model"),
    (["adapter.method=qlora", "adapter.ternary_merge=false"], "adapter.method: qlora does not apply"),
], ids=["not-linear", "missing", "qlora"])
def test_bad_adapter_fails_in_one_line_before_training(ternary_base, tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    rc = cli(["run", str(CONFIG), f"model.name_or_path={ternary_base}", f"output_dir={out}", "--quiet", *overrides])
    err = error_lines(capsys)
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (out / "metrics.json").exists() and not list(out.glob("checkpoints/*"))


def test_ternary_merge_needs_a_ternary_base(tmp_path, capsys):
    rc = cli(["run", str(CONFIG), "model.name_or_path=tiny:llama", f"output_dir={tmp_path / 'run'}", "--quiet"])
    err = error_lines(capsys)
    assert rc == 2 and len(err) == 1 and "adapter.ternary_merge needs a ternary base model" in err[0], err


def test_packed_layer_refuses_a_layout_transformers_cannot_load():
    with pytest.raises(posttrain.PosttrainError, match="out_features % 4"):
        PackedTernaryLinear(8, 6)
