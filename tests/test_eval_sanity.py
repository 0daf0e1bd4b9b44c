# ruff: noqa: F401, F811  -- pytest fixtures are imported from test_eval_fixtures, then requested by name
"""Invariants of the eval metrics on tiny offline models: zero drift from oneself, zero preference margin
against oneself, nonzero drift after perturbing weights, smaller files giving fewer bits per weight."""

from __future__ import annotations

import pytest
import torch
from test_eval_fixtures import (
    build_bitnet_export,
    build_model,
    mc_rows,
    one_torch_thread,
    preference_rows,
    text_rows,
    tiny,
)

from posttrain.eval.bench import size_metrics
from posttrain.eval.drift import drift_metrics
from posttrain.eval.multiple_choice import questions_from_rows, score_choices
from posttrain.eval.perplexity import rolling_windows
from posttrain.eval.preference import completion_logps, pair_sequences, preference_metrics
from posttrain.eval.tokenization import encode_pair
from posttrain.eval.variants import count_parameters, load_variant


@pytest.fixture(scope="module")
def base(tiny):
    return load_variant(str(tiny["base"]), device="cpu", name="base")


@pytest.fixture(scope="module")
def perturbed_dir(tiny):
    """The base with its linear weights rounded to 4 bits per tensor (a crude quantization): a small change."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                scale = p.abs().max() / 7
                p.copy_(torch.round(p / scale) * scale)
    out = tiny["root"] / "perturbed"
    model.save_pretrained(out)
    tiny["tokenizer"].save_pretrained(out)
    return out


def _texts():
    return [r["text"] for r in text_rows(6, seed=21)]


def test_drift_of_a_model_from_itself_is_zero(base, tiny):
    again = load_variant(str(tiny["base"]), device="cpu", name="again")
    for other in (base, again):
        metrics = drift_metrics(base, other, _texts(), context=32, batch_size=4)
        assert metrics == {"kl": 0.0, "top1_agreement": 1.0}


def test_perturbed_weights_show_drift(base, perturbed_dir):
    perturbed = load_variant(str(perturbed_dir), device="cpu", name="perturbed")
    metrics = drift_metrics(base, perturbed, _texts(), context=32, batch_size=4)
    assert metrics["kl"] > 1e-6
    assert 0.0 <= metrics["top1_agreement"] <= 1.0


def test_preference_against_itself_is_zero(base):
    seqs = pair_sequences(base.tokenizer, preference_rows(6, seed=2))
    logps = completion_logps(base.model, seqs, batch_size=4)
    metrics = preference_metrics(logps, list(logps), beta=0.1)
    assert metrics["accuracy"] == 0.0  # strict: ties are not wins, as in TRL
    assert metrics["margin"] == 0.0


def test_preference_tokenization_follows_trl(base):
    """Plain text: EOS appended to completions; the prompt is the common prefix of the tokenizations."""
    row = {"prompt": "The cat", "chosen": " runs.", "rejected": " eats."}
    (prompt, chosen), (_, rejected) = pair_sequences(base.tokenizer, [row])
    tok = base.tokenizer
    assert prompt + chosen == tok("The cat runs." + tok.eos_token)["input_ids"]
    assert chosen[-1] == rejected[-1] == tok.eos_token_id
    chat = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "cat"}],
        "rejected": [{"role": "assistant", "content": "dog"}],
    }
    (prompt, chosen), _ = pair_sequences(tok, [chat])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(chosen) == "cat<|im_end|>\n"


def test_logps_do_not_depend_on_batching(base):
    seqs = pair_sequences(base.tokenizer, preference_rows(6, seed=3))
    one = completion_logps(base.model, seqs, batch_size=1)
    many = completion_logps(base.model, seqs, batch_size=12)
    assert many == pytest.approx(one, rel=1e-5, abs=1e-4)


def test_multiple_choice_does_not_depend_on_batching(base):
    questions = questions_from_rows(mc_rows(12, seed=4), "mc")
    one = score_choices(base.model, base.tokenizer, questions, batch_size=1)
    many = score_choices(base.model, base.tokenizer, questions, batch_size=12)
    for a, b in zip(one.loglikelihoods, many.loglikelihoods):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-4)


def test_encode_pair_moves_trailing_space_to_the_continuation(base):
    tok = base.tokenizer
    assert encode_pair(tok, "Answer: ", "cat") == encode_pair(tok, "Answer:", " cat")
    ctx, cont = encode_pair(tok, "Answer:", " cat")
    assert ctx + cont == tok.encode("Answer: cat")
    assert encode_pair(tok, "", " cat")[0] == [tok.eos_token_id]  # no BOS: EOS conditions the first token


@pytest.mark.parametrize("n_seq", [2, 5, 17, 32, 33, 64, 100])
@pytest.mark.parametrize("context,stride", [(16, 16), (16, 4), (16, 1), (8, 8)])
def test_rolling_windows_score_each_target_once(n_seq, context, stride):
    seen = []
    for w in rolling_windows(n_seq, context, stride):
        assert 0 < w.end - w.start <= context and w.n_targets <= w.end - w.start
        seen += list(range(w.end - w.n_targets + 1, w.end + 1))
    assert seen == list(range(1, n_seq))


def test_smaller_file_has_fewer_bits_per_weight(tiny):
    build_model(tiny["root"] / "fp16", tiny["tokenizer"], seed=0, dtype=torch.float16)
    fp32 = size_metrics(load_variant(str(tiny["base"]), device="cpu"))
    fp16 = size_metrics(load_variant(str(tiny["root"] / "fp16"), device="cpu"))
    assert fp16["params_total"] == fp32["params_total"]
    assert fp16["disk_bytes"] < fp32["disk_bytes"]
    assert fp16["bits_per_weight"] < fp32["bits_per_weight"]
    assert fp32["linear_bits_per_weight"] == 32.0 and fp16["linear_bits_per_weight"] == 16.0
    assert 32 <= fp32["bits_per_weight"] < 33  # + the safetensors header


def test_packed_bitlinear_weights_count_unpacked():
    from transformers.integrations.bitnet import BitLinear

    layer = torch.nn.Sequential(BitLinear(64, 32, bias=False, dtype=torch.float32), torch.nn.Linear(4, 4))
    assert count_parameters(layer) == 64 * 32 + 4 * 4 + 4


def test_bitnet_export_loads_and_counts_two_bit_linears(tiny):
    """A ternary export in transformers' BitNet format: same logical parameters, ~2 bits per linear weight."""
    export = build_bitnet_export(tiny["base"], tiny["root"] / "bitnet")
    variant = load_variant(str(export), device="cpu")
    assert variant.kind == "bitnet"
    sizes, full = size_metrics(variant), size_metrics(load_variant(str(tiny["base"]), device="cpu"))
    assert sizes["params_total"] == full["params_total"]
    assert 2.0 <= sizes["linear_bits_per_weight"] < 2.1  # 2-bit codes + one fp32 scale per matrix
    assert sizes["bits_per_weight"] < full["bits_per_weight"] / 2  # embeddings and head stay fp32


def test_evaluation_leaves_autograd_as_it_found_it():
    """Regression: a generator suspended inside torch.inference_mode left it enabled for the whole process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.eval.perplexity import iterate_window_logits, rolling_windows

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    seqs = [list(range(20)), list(range(12))]
    windows = [w for i, s in enumerate(seqs) for w in rolling_windows(len(s), 8, 8, doc=i)]
    first = iterate_window_logits(model, seqs, windows, 1, "a")
    second = iterate_window_logits(model, seqs, windows, 1, "b")
    for _ in zip(first, second):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
