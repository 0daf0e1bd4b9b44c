"""Export to transformers' BitNet format, load it in plain transformers (fresh process), fake-quant export,
load_ternary round trip, bits per weight, and the export's refusals."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.errors import PosttrainError
from posttrain.ternary import (
    BitLinear,
    bitlinear_layers,
    bits_per_weight,
    convert,
    dequantize,
    export_bitnet,
    export_fake_quant,
    load_ternary,
    unpack_ternary,
)

VOCAB = 260
TEXT = "hello ternary world"
# The stated bounds. fp32: transformers' BitLinear (eager or compiled) and posttrain's fused BitLinear run the
# same float operations, measured bit-identical (max |diff| = 0.0); 1e-5 leaves room for BLAS differences.
# bf16: posttrain reproduces transformers' default, torch.compile'd BitLinear bit for bit (test_..._compiled);
# the fast test runs transformers eager, which rounds x * a to bf16 first: a few codes move by one step.
LOGIT_BOUND = {torch.float32: 1e-5, "bf16_eager": 0.05, "bf16_compiled": 1e-5}


def tiny_llama(seed=0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg.update(num_key_value_heads=2, vocab_size=VOCAB, **overrides)
    # built in dtype (not .to(dtype)), so the rotary inv_freq stays float32 exactly as from_pretrained makes it
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=dtype).eval()


@pytest.fixture(scope="module")
def tokenizer():
    """Offline byte-level tokenizer (256 bytes + 2 specials) with a chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    return fast


def ternary_model(seed=0, skip=(), use_rms_norm=False, dtype=torch.float32, **overrides):
    model = tiny_llama(seed, dtype, **overrides)
    convert(model, skip=skip, use_rms_norm=use_rms_norm)
    if use_rms_norm:  # non-trivial norm weights, so the test sees whether they are exported and loaded
        for _, layer in bitlinear_layers(model):
            nn.init.uniform_(layer.rms_norm.weight, 0.5, 1.5)
    return model


LOADER = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    results = {}
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok(sys.argv[1].split("|")[0], return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("proj") or n == "lm_head"}
        results[folder] = {"ids": ids, "logits": logits.float(), "gen": gen, "chat": chat, "kinds": kinds,
                           "dtype": str(model.dtype)}
    assert "posttrain" not in sys.modules
    torch.save(results, sys.argv[1].split("|")[1])
    """
)


def load_in_fresh_transformers(folders, out_file, text=TEXT, compiled=False):
    """Load each export with plain transformers in a new interpreter that never imports posttrain."""
    # transformers' unpack/quant helpers are torch.compile'd: ~35 s cold on this CPU, so the fast tests run
    # them eagerly (the same operations; bit-identical in fp32)
    env = {**os.environ, "PYTHONPATH": ""}
    if not compiled:
        env["TORCHDYNAMO_DISABLE"] = "1"
    cmd = [sys.executable, "-c", LOADER, f"{text}|{out_file}", *map(str, folders)]
    proc = subprocess.run(cmd, cwd=out_file.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_file)


def compare_with_loaded(variants, folders, loaded, tokenizer, bounds) -> dict[str, float]:
    """Assert logits within bounds[key], same greedy tokens when the bound is exact; return the measured diffs."""
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    diffs = {}
    for key, model in variants.items():
        got = loaded[str(folders[key])]
        assert torch.equal(got["ids"], ids)
        with torch.no_grad():
            logits = model(ids).logits.float()
        diffs[key] = (got["logits"] - logits).abs().max().item()
        assert diffs[key] <= bounds[key], f"{key}: max |logit diff| {diffs[key]} > {bounds[key]}"
        assert got["gen"].shape[1] == ids.shape[1] + 6 and got["chat"] == "<user>hi</s>"
        if bounds[key] <= 1e-5:
            gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=VOCAB - 3)
            assert torch.equal(got["gen"], gen), key
        quantized = [n for n, kind in got["kinds"].items() if kind == "BitLinear"]
        assert len(quantized) == len(bitlinear_layers(model)) and got["kinds"]["lm_head"] == "Linear"
    return diffs


def test_export_bitnet_loads_in_plain_transformers_with_same_logits(tmp_path, tokenizer):
    variants = {
        "plain": ternary_model(0),
        # rms_norm option + tied embeddings (lm_head re-tied at load, stored once)
        "rmsnorm_tied": ternary_model(1, use_rms_norm=True, tie_word_embeddings=True),
        # out_features 130 is not a multiple of 4: those layers are skipped and exported dense
        "skip130": ternary_model(2, skip=["gate_proj", "up_proj"], intermediate_size=130),
        "bf16": ternary_model(3, dtype=torch.bfloat16),
    }
    folders = {k: export_bitnet(m, tokenizer, tmp_path / k) for k, m in variants.items()}
    loaded = load_in_fresh_transformers(folders.values(), tmp_path / "loaded.pt")
    bounds = dict.fromkeys(variants, LOGIT_BOUND[torch.float32]) | {"bf16": LOGIT_BOUND["bf16_eager"]}
    compare_with_loaded(variants, folders, loaded, tokenizer, bounds)
    assert loaded[str(folders["bf16"])]["dtype"] == "torch.bfloat16"
    skip_kinds = loaded[str(folders["skip130"])]["kinds"]
    assert skip_kinds["model.layers.0.mlp.up_proj"] == "Linear"
    assert skip_kinds["model.layers.0.mlp.down_proj"] == "BitLinear"
    config = json.loads((folders["rmsnorm_tied"] / "config.json").read_text())
    assert config["quantization_config"]["use_rms_norm"] is True
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("POSTTRAIN_TEST_COMPILED"), reason="set POSTTRAIN_TEST_COMPILED=1 (~45 s)")
def test_export_bitnet_bf16_matches_compiled_transformers_bit_for_bit(tmp_path, tokenizer):
    """transformers' default BitLinear path is torch.compile'd; in bf16 posttrain reproduces it exactly."""
    variants = {
        "bf16": ternary_model(3, dtype=torch.bfloat16),
        "bf16_rms": ternary_model(4, use_rms_norm=True, dtype=torch.bfloat16),
    }
    folders = {k: export_bitnet(m, tokenizer, tmp_path / k) for k, m in variants.items()}
    loaded = load_in_fresh_transformers(folders.values(), tmp_path / "loaded.pt", compiled=True)
    bounds = dict.fromkeys(variants, LOGIT_BOUND["bf16_compiled"])
    compare_with_loaded(variants, folders, loaded, tokenizer, bounds)


def test_export_bitnet_tensors(tmp_path, tokenizer):
    model = ternary_model(0)
    folder = export_bitnet(model, tokenizer, tmp_path / "bitnet")
    tensors = load_file(folder / "model.safetensors")
    layer = model.model.layers[0].mlp.up_proj
    codes, scale = layer.ternary()
    packed = tensors["model.layers.0.mlp.up_proj.weight"]
    assert packed.dtype == torch.uint8 and packed.shape == (128 // 4, 64)
    assert torch.equal(unpack_ternary(packed), codes)
    # transformers' BitLinear divides by weight_scale: it holds 1 / mean|W|
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].item() == pytest.approx(1 / scale.item())
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert (folder / "chat_template.jinja").exists() or "chat_template" in (
        folder / "tokenizer_config.json"
    ).read_text()
    bpw = bits_per_weight(folder)
    assert bpw["quantized_layers_bpw"] == pytest.approx(2.0, abs=0.01)
    assert bpw["quantized_weights"] == sum(m.weight.numel() for _, m in bitlinear_layers(model))
    assert 2.0 < bpw["whole_file_bpw"] < 32.0


def test_export_fake_quant_dense_weights_equal_ternary_times_scale(tmp_path, tokenizer):
    model = ternary_model(0)
    for dtype in (torch.float32, torch.bfloat16):
        folder = export_fake_quant(model, tokenizer, tmp_path / str(dtype), dtype=dtype)
        tensors = load_file(folder / "model.safetensors")
        for name, layer in bitlinear_layers(model):
            codes, scale = layer.ternary()
            stored = tensors[f"{name}.weight"]
            assert stored.dtype == dtype
            assert torch.equal(stored, dequantize(codes, scale, dtype)), name
            assert len(stored.unique()) <= 3
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / str(torch.float32))
    assert all(type(m) is nn.Linear for n, m in dense.named_modules() if n.endswith("proj"))


def test_load_ternary_round_trip_is_trainable(tmp_path, tokenizer):
    model = ternary_model(0, use_rms_norm=True)
    folder = export_bitnet(model, tokenizer, tmp_path / "bitnet")
    loaded = load_ternary(folder)
    assert not getattr(loaded, "is_quantized", False) and "quantization_config" not in loaded.config.to_dict()
    pairs = list(zip(bitlinear_layers(model), bitlinear_layers(loaded)))
    assert len(pairs) == 14
    for (name, a), (name_b, b) in pairs:
        assert name == name_b and isinstance(b, BitLinear)
        (ca, sa), (cb, sb) = a.ternary(), b.ternary()
        assert torch.equal(ca, cb), name
        assert sb.item() == pytest.approx(sa.item(), rel=1e-6)
        assert torch.equal(a.rms_norm.weight, b.rms_norm.weight)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff  # scales agree to ~1e-7 relative (1 / weight_scale), not bit for bit
    loaded.train()
    loss = loaded(ids, labels=ids).loss
    loss.backward()
    assert loaded.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_export_refusals_and_atomic_write(tmp_path, tokenizer, monkeypatch):
    with pytest.raises(PosttrainError, match="out_features=130"):
        export_bitnet(ternary_model(0, intermediate_size=130), tokenizer, tmp_path / "a")
    channel = tiny_llama()
    convert(channel, granularity="channel")
    with pytest.raises(PosttrainError, match="granularity"):
        export_bitnet(channel, tokenizer, tmp_path / "b")
    with pytest.raises(PosttrainError, match="convert"):
        export_bitnet(tiny_llama(), tokenizer, tmp_path / "c")
    model = ternary_model(0)
    export_bitnet(model, tokenizer, tmp_path / "d")
    with pytest.raises(PosttrainError, match="overwrite"):
        export_bitnet(model, tokenizer, tmp_path / "d")
    export_bitnet(model, tokenizer, tmp_path / "d", overwrite=True)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bitnet(model, tokenizer, tmp_path / "e")
    assert not (tmp_path / "e").exists()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["d"]  # no temp folder left behind
    assert (tmp_path / "d" / "model.safetensors").exists()
