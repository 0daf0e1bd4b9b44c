"""Quantizers, STE, lambda schedules, BitLinear, convert, QAT training and PTQ (posttrain.ternary)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.errors import PosttrainError
from posttrain.ternary import (
    BitLinear,
    TernaryLambdaCallback,
    absmean_scale,
    activation_codes,
    activation_quant,
    bitlinear_layers,
    convert,
    lambda_at,
    latent_from_ternary,
    set_quant_lambda,
    ste_blend,
    ternarize_,
    ternary_codes,
    weight_quant,
)

W = torch.tensor([[0.5, -1.0, 0.05, 2.0], [0.0, -0.3, 0.6, -0.25]])


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg.update(num_key_value_heads=2, vocab_size=260, **overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


# ---- quantizers -------------------------------------------------------------------------------------------


def test_absmean_tensor_scale_and_codes():
    codes, s = ternary_codes(W)
    assert s.item() == pytest.approx(4.7 / 8)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, -1, 0, 1], [0, -1, 1, 0]]  # -1.70 and 3.40 clip, -0.51 rounds to -1
    assert torch.equal(weight_quant(W), codes.float() * s)


def test_absmean_channel_and_group_scales():
    codes, s = ternary_codes(W, "channel")
    assert s.flatten().tolist() == pytest.approx([0.8875, 0.2875])
    assert codes.tolist() == [[1, -1, 0, 1], [0, -1, 1, -1]]
    codes, s = ternary_codes(W, "group", group_size=2)
    assert s.shape == (2, 2, 1)
    assert s.flatten().tolist() == pytest.approx([0.75, 1.025, 0.15, 0.425])
    assert codes.tolist() == [[1, -1, 0, 1], [0, -1, 1, -1]]
    q = weight_quant(W, "group", group_size=2)
    assert q[0].tolist() == pytest.approx([0.75, -0.75, 0.0, 1.025])


def test_bad_granularity_is_a_user_error():
    with pytest.raises(PosttrainError, match="granularity"):
        absmean_scale(W, "row")
    with pytest.raises(PosttrainError, match="group_size"):
        absmean_scale(W, "group", group_size=3)


def test_all_zero_weight_uses_eps_not_nan():
    codes, s = ternary_codes(torch.zeros(4, 4))
    assert s.item() == pytest.approx(1e-5) and not codes.any()


def test_activation_absmax_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 4.0, -4.0, 1.0]])
    codes, a = activation_codes(x)
    assert a[0].item() == pytest.approx(127.0) and a[2].item() == pytest.approx(127 / 4)
    # -63.5 rounds half to even (-64), like torch.round in transformers' BitLinear
    assert codes.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0], [64, 127, -127, 32]]  # 63.5 -> 64, 31.75 -> 32
    assert torch.allclose(activation_quant(x), codes / a)
    assert activation_quant(x.bfloat16()).dtype == torch.bfloat16


def test_ste_passes_gradient_through_and_blends():
    x = torch.randn(3, 8, requires_grad=True)
    y = ste_blend(x, activation_quant(x), 1.0)
    assert torch.equal(y, activation_quant(x))  # exactly the quantized value at lam = 1
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).expand(3, 8))
    half = ste_blend(x, activation_quant(x), 0.5)
    assert torch.allclose(half, x + 0.5 * (activation_quant(x) - x))
    assert ste_blend(x, activation_quant(x), 0.0) is x


def test_lambda_schedules():
    assert [lambda_at(s, 10, "linear") for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    sig = [lambda_at(s, 10, "sigmoid") for s in range(11)]
    assert sig[0] == 0.0 and sig[5] == pytest.approx(0.5) and sig[10] == 1.0
    assert all(a < b for a, b in zip(sig, sig[1:]))
    assert lambda_at(0, 10, "none") == 1.0 and lambda_at(0, 0, "linear") == 1.0
    with pytest.raises(PosttrainError, match="schedule"):
        lambda_at(1, 10, "cosine")


def test_latent_from_ternary_requantizes_to_the_same_weights():
    torch.manual_seed(0)
    for granularity, group in (("tensor", None), ("channel", None), ("group", 8)):
        codes, s = ternary_codes(torch.randn(12, 16), granularity, group)
        latent = latent_from_ternary(codes, s)
        codes2, s2 = ternary_codes(latent, granularity, group)
        assert torch.equal(codes, codes2)
        assert torch.allclose(s, s2, rtol=1e-6)


# ---- BitLinear --------------------------------------------------------------------------------------------


def test_bitlinear_fused_path_matches_ste_reference_forward_and_grads():
    """The fused lam=1 path equals F.linear(ste(x_q), ste(W_q)) in value and gradients."""
    torch.manual_seed(0)
    layer = BitLinear(32, 16, bias=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    g = torch.randn(2, 5, 16)

    def run(forward):
        layer.zero_grad()
        x.grad = None
        out = forward(x)
        (out * g).sum().backward()
        return out.detach(), x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()

    fused = run(layer)
    w = layer.weight
    ref = run(lambda xx: F.linear(ste_blend(xx, activation_quant(xx)), ste_blend(w, weight_quant(w)), layer.bias))
    for a, b in zip(fused, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bitlinear_lambda_zero_is_dense_and_rms_norm_option():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    layer = BitLinear.from_linear(dense)
    layer.quant_lambda = 0.0
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), dense(x))
    normed = BitLinear.from_linear(nn.Linear(16, 8), use_rms_norm=True, rms_norm_eps=1e-5)
    assert set(normed.state_dict()) == {"weight", "bias", "rms_norm.weight"}
    assert torch.equal(normed.rms_norm.weight, torch.ones(16))


# ---- convert / training / PTQ -----------------------------------------------------------------------------


def test_convert_swaps_decoder_linears_only():
    model = tiny_llama()
    keys = set(model.state_dict())
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert convert(model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[1].mlp.down_proj, BitLinear)
    assert model.model.layers[0].self_attn.q_proj.weight is q_proj  # same Parameter: dtype/device kept
    assert set(model.state_dict()) == keys  # same checkpoint keys as the dense model
    assert convert(model) == 0  # idempotent


def test_convert_skip_patterns():
    model = tiny_llama()
    assert convert(model, skip=["down_proj", "model.layers.1", "model.layers.*.self_attn.k_proj"]) == 5
    names = {n for n, _ in bitlinear_layers(model)}
    assert names == {f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj")} | {
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    }
    with pytest.raises(PosttrainError, match="skip"):
        convert(tiny_llama(), skip=["model"])


def test_bitlinear_model_trains_with_warmup_lambda():
    model = tiny_llama()
    convert(model)
    before = {n: m.weight.detach().clone() for n, m in bitlinear_layers(model)}
    torch.manual_seed(0)
    batch = torch.randint(0, 260, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(20):
        assert set_quant_lambda(model, lambda_at(step, 5, "linear")) == 14
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(not torch.equal(before[n], m.weight) for n, m in bitlinear_layers(model))


def test_lambda_callback_sets_layers_from_global_step():
    model = tiny_llama()
    convert(model)
    cb = TernaryLambdaCallback(warmup_steps=10)
    cb.on_step_begin(None, SimpleNamespace(global_step=3), None, model=model)
    assert {m.quant_lambda for _, m in bitlinear_layers(model)} == {0.3}
    cb.on_train_begin(None, SimpleNamespace(global_step=40), None, model=model)  # a resumed run
    assert {m.quant_lambda for _, m in bitlinear_layers(model)} == {1.0}


def test_ternarize_ptq_leaves_three_values_per_tensor():
    model = tiny_llama()
    embed = model.model.embed_tokens.weight.detach().clone()
    assert ternarize_(model) == 14
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            values = m.weight.unique()
            assert len(values) <= 3, name
            s = m.weight.abs().max()
            assert set(values.tolist()) <= {-s.item(), 0.0, s.item()}
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert len(model.lm_head.weight.unique()) > 3


def test_ternarize_on_bitlinear_keeps_its_forward():
    model = tiny_llama()
    convert(model)
    ids = torch.randint(0, 260, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        ternarize_(model)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_peft_lora_wraps_bitlinear_and_trains():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    convert(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, BitLinear) and not isinstance(q_proj.lora_A["default"], BitLinear)
    ids = torch.randint(0, 260, (2, 8))
    peft_model(ids, labels=ids).loss.backward()
    assert q_proj.lora_B["default"].weight.grad is not None
    assert q_proj.base_layer.weight.grad is None  # frozen base, as with any peft model
