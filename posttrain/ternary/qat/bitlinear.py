"""BitLinear for quantization-aware training (QAT) of BitNet b1.58 models, plus model surgery.

`BitLinear` is an `nn.Linear` subclass with the same parameters and state_dict keys (`weight`, `bias`), so
optimizers, peft, TRL, accelerate, DDP and FSDP see an ordinary linear layer. Its forward fake-quantizes:

    x' = RMSNorm(x)                      (only with use_rms_norm: transformers' LlamaRMSNorm, as in its BitLinear)
    W~ = W + lam * (Q_w(W) - W).detach()  Q_w: absmean ternary, see quant.py
    x~ = x' + lam * (Q_a(x') - x').detach()   Q_a: 8-bit absmax per token
    y  = x~ @ W~^T + b

At lam = 1 with a per-tensor scale (the BitNet setting) the forward runs `_TernaryLinearFn` instead: the same
value computed with transformers' BitLinear operations, y = (X_int @ T^T) / (weight_scale * a) + b, so an
export_bitnet checkpoint reproduces the in-memory logits bit for bit, and int8 codes are what backward keeps.
lam <= 0 is a plain dense linear.

lam (`quant_lambda`) is a plain float attribute, deliberately not in the state_dict: it is a function of the
optimizer step, `lambda_at(step, warmup_steps, schedule)`, so it is recomputed rather than saved, and a
resumed run gets the right value from its restored global step. A trainer sets it every step with
`TernaryLambdaCallback` (qat/warmup.py; on_step_begin: set_quant_lambda(model, lambda_at(state.global_step, ...))),
a plain loop calls `set_quant_lambda(model, lambda_at(step, ...))` before each forward. Under torch.compile each new
lam value during warm-up recompiles (dynamo specializes floats); after warm-up lam stays 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.errors import PosttrainError
from posttrain.ternary.quant import (
    WEIGHT_EPS,
    _check_granularity,
    activation_codes,
    activation_quant,
    bitnet_weight_scale,
    dequantize,
    latent_from_ternary,
    ste_blend,
    ternary_codes,
    weight_quant,
)


class _TernaryLinearFn(torch.autograd.Function):
    """Fully quantized BitNet linear (lam = 1, per-tensor scale) with a straight-through backward.

    forward:  y = (X_int @ T^T) / (weight_scale * a) + b     the operations of transformers' BitLinear, so an
              export reproduces it bit for bit (X_int, a = activation_codes(x); weight_scale = 1 / s)
    backward: as if y = x_q @ W_q^T + b with identity quantizers: dx = dy @ (T * s), dW = dy^T @ x_q.
    Saves int8 codes (1 byte per activation, not 4) and recomputes x_q and W_q in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, act_bits: int):
        codes, s = ternary_codes(weight, "tensor", None, eps)
        x_codes, a = activation_codes(x, act_bits)
        y = F.linear(x_codes.to(x.dtype), codes.to(x.dtype))  # integer-valued: exact in bf16/fp16 too
        # like transformers' compiled post_quant_process: divide in float32, round once (no copies in fp32)
        y = y.float().div_(bitnet_weight_scale(s, x.dtype).float() * a.float()).to(x.dtype)
        if bias is not None:
            y.add_(bias)
        if any(ctx.needs_input_grad[:3]):  # nothing to keep at inference (generate, eval)
            ctx.save_for_backward(x_codes.to(torch.int8), a, codes, s)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_codes, a, codes, s = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ dequantize(codes, s, grad_y.dtype)
        flat = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[1]:
            x_q = (x_codes.float() / a.float()).to(grad_y.dtype).reshape(flat.shape[0], -1)
            grad_w = flat.t() @ x_q
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b, None, None


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 fake quantization (ternary weights, `act_bits`-bit activations).

    act_bits=None keeps activations in full precision (weight-only QAT). use_rms_norm adds a `rms_norm`
    submodule (key `<layer>.rms_norm.weight`) with the semantics of transformers' BitNet `use_rms_norm`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        granularity: str = "tensor",
        group_size: int | None = None,
        act_bits: int | None = 8,
        use_rms_norm: bool = False,
        rms_norm_eps: float = 1e-6,
        eps: float = WEIGHT_EPS,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _check_granularity(granularity, group_size, in_features)
        if act_bits is not None and not 2 <= act_bits <= 16:
            raise PosttrainError(f"BitLinear act_bits={act_bits} is out of range: use 8 (BitNet) or None")
        self.granularity = granularity
        self.group_size = group_size
        self.act_bits = act_bits
        self.eps = eps
        self.quant_lambda = 1.0
        self.rms_norm = None
        if use_rms_norm:
            # the class transformers' BitLinear instantiates, so exported checkpoints compute the same norm
            from transformers.models.llama.modeling_llama import LlamaRMSNorm

            self.rms_norm = LlamaRMSNorm(in_features, eps=rms_norm_eps).to(device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> BitLinear:
        """A BitLinear sharing `linear`'s weight and bias Parameters (no copy; dtype and device kept)."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            device="meta",
            dtype=w.dtype,
            **options,
        )
        layer.weight = w
        layer.bias = linear.bias
        if layer.rms_norm is not None:
            layer.rms_norm = layer.rms_norm.to_empty(device=w.device)
            nn.init.ones_(layer.rms_norm.weight)
        return layer

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 in {-1,0,1}, scale float32) of the current weight; W_q = codes * scale."""
        return ternary_codes(self.weight, self.granularity, self.group_size, self.eps)

    def quantized_weight(self) -> torch.Tensor:
        """W_q = codes * scale in the weight's dtype: what the forward uses at lam = 1."""
        return weight_quant(self.weight, self.granularity, self.group_size, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        lam = self.quant_lambda
        if lam <= 0.0:  # warm-up start: a dense layer, no quantization work at all
            return F.linear(x, self.weight, self.bias)
        if lam >= 1.0 and self._fused_ok(x):
            return _TernaryLinearFn.apply(x, self.weight, self.bias, self.eps, self.act_bits)
        w = ste_blend(self.weight, self.quantized_weight(), lam)
        if self.act_bits is not None:
            x = ste_blend(x, activation_quant(x, self.act_bits), lam)
        return F.linear(x, w, self.bias)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        # the fused path needs a per-tensor scale, int8-sized codes and one dtype (autocast mixes them:
        # F.linear in the generic path handles autocast)
        return (
            self.granularity == "tensor"
            and self.act_bits is not None
            and self.act_bits <= 8
            and x.dtype == self.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (
            f"{super().extra_repr()}, granularity={self.granularity}{group}, act_bits={self.act_bits}, "
            f"quant_lambda={self.quant_lambda:g}"
        )


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """transformers' `modules_to_not_convert` rule, so a skip list means the same in posttrain and at load.

    A pattern matches a module name (1) as a prefix ending at a module boundary ("model.layers.1" matches
    "model.layers.1.mlp.up_proj", not "model.layers.11..."), (2) as a regex with the same boundary
    ("model.layers.*.mlp" matches all MLPs), or (3) as a suffix ("down_proj").
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def _is_adapter(name: str) -> bool:
    # peft's lora_A / lora_B / lora_magnitude... are nn.Linear too; they must stay dense
    return any(part.startswith("lora_") for part in name.split("."))


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear that `convert` would quantize: not the output embeddings (lm_head),
    not a peft adapter, not matching `skip`. BitLinear layers are included (they are nn.Linear)."""
    skip = list(skip)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m is not head
        and name != "lm_head"
        and not _is_adapter(name)
        and not matches_any(name, skip)
    ]


def convert(
    model: nn.Module,
    skip: Iterable[str] = (),
    granularity: str = "tensor",
    group_size: int | None = None,
    act_bits: int | None = 8,
    use_rms_norm: bool = False,
    rms_norm_eps: float | None = None,
    quant_lambda: float = 1.0,
) -> int:
    """Swap the model's decoder nn.Linear layers for BitLinear in place; return how many were swapped.

    Embeddings are never nn.Linear, the output embeddings (lm_head) are never converted, and module names
    matching `skip` (see `matches_any`) stay dense. Weights and biases are the same Parameter objects, so dtype,
    device and any existing references survive; already converted layers are left alone (idempotent).
    rms_norm_eps defaults to the model config's rms_norm_eps (1e-6 without one).
    """
    if rms_norm_eps is None:
        rms_norm_eps = getattr(getattr(model, "config", None), "rms_norm_eps", None) or 1e-6
    options = {
        "granularity": granularity,
        "group_size": group_size,
        "act_bits": act_bits,
        "use_rms_norm": use_rms_norm,
        "rms_norm_eps": rms_norm_eps,
    }
    targets = quantizable_linears(model, skip)
    if not targets:
        raise PosttrainError(
            f"convert found no nn.Linear to quantize in {type(model).__name__} (skip={list(skip)}): "
            "check the skip patterns"
        )
    count = 0
    for name, linear in targets:
        if isinstance(linear, BitLinear):
            continue
        layer = BitLinear.from_linear(linear, **options)
        layer.quant_lambda = float(quant_lambda)
        model.set_submodule(name, layer)
        count += 1
    return count


def bitlinear_layers(model: nn.Module) -> list[tuple[str, BitLinear]]:
    """(name, layer) of every posttrain BitLinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


def set_quant_lambda(model: nn.Module, lam: float) -> int:
    """Set lam on every BitLinear of the model (works through DDP/FSDP/peft wrappers); return the count."""
    if not 0.0 <= lam <= 1.0:
        raise PosttrainError(f"quant lambda {lam} is outside [0, 1]: use lambda_at(step, warmup_steps, schedule)")
    layers = bitlinear_layers(model)
    for _, layer in layers:
        layer.quant_lambda = float(lam)
    return len(layers)


@torch.no_grad()
def ternarize_(
    model: nn.Module,
    skip: Iterable[str] = (),
    granularity: str = "tensor",
    group_size: int | None = None,
) -> int:
    """Post-training ternarization (PTQ baseline): W <- RoundClip(W / s, -1, 1) * s in place, no training.

    Applies to the layers `convert` would pick. Dense nn.Linear layers get W_q itself (dense activations:
    the weight-only PTQ baseline). BitLinear layers use their own granularity and get the latent weight
    of `latent_from_ternary`, so that their forward uses exactly W_q (storing W_q would rescale it by the
    fraction of non-zeros). Returns the number of layers changed.
    """
    count = 0
    for _, layer in quantizable_linears(model, skip):
        if isinstance(layer, BitLinear):
            codes, scale = layer.ternary()
            layer.weight.copy_(latent_from_ternary(codes, scale, layer.weight.dtype))
        else:
            codes, scale = ternary_codes(layer.weight, granularity, group_size)
            layer.weight.copy_(dequantize(codes, scale, layer.weight.dtype))
        count += 1
    return count
