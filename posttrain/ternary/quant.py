"""BitNet b1.58 quantizers (Ma et al. 2024), as pure tensor functions.

Weights, absmean ternary:
    s   = max(mean(|W|), eps)                    (one s per tensor, per output row, or per group of columns)
    T   = RoundClip(W / s, -1, 1)  in {-1, 0, +1}
    W_q = T * s
The paper writes W / (mean|W| + eps); like the BitNet reference code and transformers' `WeightQuant` we clamp
instead, so s is exactly mean|W| for any non-degenerate tensor (the two differ only for all-zero tensors).
In transformers' checkpoint format the stored `weight_scale` is 1 / s (its `BitLinear` divides by it).

Activations, 8-bit absmax per token (last dimension):
    a   = 127 / max(max_j |x_j|, 1e-5)
    x_q = clamp(round(x * a), -128, 127) / a
This is transformers' `BitLinear.activation_quant` (same 1e-5 clamp, same -128..127 range: -128 is never
produced by a symmetric scale, it is only the int8 range), computed in float32 with a rounded to the model
dtype, as transformers' torch.compile'd version does (see `activation_codes`).

Straight-through estimator with warm-up blend (HF "fine-tuning LLMs to 1.58 bit"):
    y = x + lam * (q(x) - x).detach()
forward value: the blend; gradient w.r.t. x: identity. `ste_blend` implements it as an autograd Function
that returns q(x) itself when lam == 1, so the forward is bit-exact with the quantized value (x + (q - x)
rounds in floating point) and no extra activation is kept for backward.
"""

from __future__ import annotations

import math

import torch

from posttrain.errors import PosttrainError
from posttrain.ternary.pack import unpack_ternary

GRANULARITIES = ("tensor", "channel", "group")
SCHEDULES = ("linear", "sigmoid", "none")
WEIGHT_EPS = 1e-5  # same clamp as transformers' WeightQuant and the BitNet reference code
ACT_EPS = 1e-5  # same clamp as transformers' BitLinear.activation_quant


def _check_granularity(granularity: str, group_size: int | None, in_features: int) -> None:
    if granularity not in GRANULARITIES:
        raise PosttrainError(f"ternary granularity {granularity!r} is unknown: use one of {', '.join(GRANULARITIES)}")
    if granularity == "group" and (not group_size or group_size <= 0 or in_features % group_size):
        raise PosttrainError(
            f"ternary group_size={group_size} must be a positive divisor of in_features={in_features}: "
            "pick e.g. 64 or 128, or granularity='tensor'"
        )


@torch.no_grad()
def absmean_scale(
    weight: torch.Tensor,
    granularity: str = "tensor",
    group_size: int | None = None,
    eps: float = WEIGHT_EPS,
) -> torch.Tensor:
    """s = max(mean|W|, eps) in float32, shaped to broadcast against the granularity's view of W.

    tensor: shape () ; channel: (out, 1) ; group: (out, in // group_size, 1), to be used with
    `weight.view(out, -1, group_size)`. No gradient: the scale is a statistic, not a learned value.
    """
    _check_granularity(granularity, group_size, weight.shape[-1])
    w = weight.detach().float().abs()
    if granularity == "tensor":
        s = w.mean()
    elif granularity == "channel":
        s = w.mean(dim=-1, keepdim=True)
    else:
        s = w.view(w.shape[0], -1, group_size).mean(dim=-1, keepdim=True)
    return s.clamp_(min=eps)


@torch.no_grad()
def ternary_codes(
    weight: torch.Tensor,
    granularity: str = "tensor",
    group_size: int | None = None,
    eps: float = WEIGHT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, s): T = RoundClip(W / s, -1, 1) as int8 of W's shape, s from `absmean_scale` (float32)."""
    s = absmean_scale(weight, granularity, group_size, eps)
    w = weight.detach().float()
    if granularity == "group":
        w = w.view(w.shape[0], -1, group_size)
    t = (w / s).round_().clamp_(-1, 1)
    return t.view(weight.shape).to(torch.int8), s


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_q = T * s (computed in float32, then cast to `dtype`); inverse of `ternary_codes` up to rounding."""
    t = codes.float()
    if scale.dim() == 3:  # group scales: (out, groups, 1)
        return (t.view(t.shape[0], scale.shape[1], -1) * scale).view(codes.shape).to(dtype)
    return (t * scale).to(dtype)


@torch.no_grad()
def weight_quant(
    weight: torch.Tensor,
    granularity: str = "tensor",
    group_size: int | None = None,
    eps: float = WEIGHT_EPS,
) -> torch.Tensor:
    """W_q = RoundClip(W / s, -1, 1) * s in W's dtype (no gradient; wrap with `ste_blend` for training)."""
    codes, s = ternary_codes(weight, granularity, group_size, eps)
    return dequantize(codes, s, weight.dtype)


@torch.no_grad()
def latent_from_ternary(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A latent weight W with weight_quant(W) == T * s, for restarting QAT from a ternary checkpoint.

    Storing T * s itself would not do: its absmean is s * p (p = fraction of non-zero codes per scale
    group), so re-quantizing gives the same codes with scale s * p. Dividing by p fixes that:
    W = T * s / p has mean|W| = s and RoundClip(W / s) = RoundClip(T / p) = T since 0 < p <= 1.
    """
    t = codes.float()
    if scale.dim() == 3:
        t = t.view(t.shape[0], scale.shape[1], -1)
    if scale.dim() == 0:
        p = t.abs().mean()
    else:
        p = t.abs().mean(dim=-1, keepdim=True)
    # p == 0 only where every code is 0, so any positive floor leaves W = 0 there
    w = t * (scale / p.clamp(min=1e-12))
    return w.view(codes.shape).to(dtype)


@torch.no_grad()
def activation_codes(x: torch.Tensor, bits: int = 8, eps: float = ACT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, a): codes = clamp(round(x * a), -2^(b-1), 2^(b-1)-1) as float32, a = (2^(b-1)-1) / max(|x|, eps)
    per token, rounded to x's dtype.

    This reproduces transformers' BitLinear.activation_quant as it runs by default (torch.compile'd): inductor
    computes in float32 and stores a in the model dtype. In fp32 it is also the eager computation bit for bit
    (`qp / t` is reciprocal(t) * qp in torch, as in transformers). Eager transformers in bf16 rounds x * a to
    bf16 before rounding to an integer, so a few codes differ from it by one step.
    """
    qp = 2 ** (bits - 1) - 1
    xf = x.detach().float()
    a = (qp / xf.abs().amax(dim=-1, keepdim=True).clamp_(min=eps)).to(x.dtype)
    return (xf * a.float()).round_().clamp_(-qp - 1, qp), a


@torch.no_grad()
def activation_quant(x: torch.Tensor, bits: int = 8, eps: float = ACT_EPS) -> torch.Tensor:
    """x_q = codes / a in x's dtype, from `activation_codes` (no gradient; wrap with `ste_blend` for training)."""
    codes, a = activation_codes(x, bits, eps)
    return codes.div_(a.float()).to(x.dtype)


def bitnet_weight_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' `weight_scale` buffer for a per-tensor scale s: 1 / s, shape (1,), in the model dtype."""
    return (1.0 / scale.float()).reshape(1).to(dtype)


class _STEBlend(torch.autograd.Function):
    """forward: x + lam * (q - x) (exactly q when lam == 1); backward: identity to x, nothing to q."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
        if lam >= 1.0:
            return q
        # reuse q's buffer: it was created by the quantizer for this call only
        return q.sub_(x).mul_(lam).add_(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None, None


def ste_blend(x: torch.Tensor, q: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """x + lam * (q - x).detach(): straight-through estimator with warm-up blend. `q` may be overwritten."""
    if lam <= 0.0:
        return x
    return _STEBlend.apply(x, q.detach(), float(lam))


def lambda_at(step: int, warmup_steps: int, schedule: str = "linear") -> float:
    """Quantization strength lam in [0, 1] at optimizer step `step` (0-based).

    linear:  lam = min(step / warmup_steps, 1)                       (HF 1.58-bit fine-tuning blog)
    sigmoid: lam = 1 / (1 + exp(-k (step / warmup_steps - 1/2))), k = 12, forced to 0 at step 0 and 1
             from step >= warmup_steps, so both schedules start dense and end fully quantized.
    none:    lam = 1 from the first step (plain QAT, no warm-up).
    warmup_steps <= 0 means no warm-up (lam = 1).
    """
    if schedule not in SCHEDULES:
        raise PosttrainError(f"ternary lambda schedule {schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
    if schedule == "none" or warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    if step <= 0:
        return 0.0
    frac = step / warmup_steps
    if schedule == "linear":
        return frac
    return 1.0 / (1.0 + math.exp(-12.0 * (frac - 0.5)))


def ternary_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    return_acc: bool = False,
) -> torch.Tensor:
    """Pure-torch BitNet linear on packed weights: the semantics every kernel here must reproduce.

    x (..., K) float; packed uint8 (N/4, K) in transformers' layout; weight_scale (1,) or (N,) = 1 / mean|W| (any
    float dtype; its value is used as given). return_acc=True returns the exact integer accumulators (int32).
    The integer product is taken in float64 (exact for these magnitudes, and available on CPU and CUDA).
    """
    codes = unpack_ternary(packed)  # int8 (N, K)
    q, a = activation_codes(x)  # q float32 codes, a (..., 1) in x.dtype
    acc = q.double() @ codes.double().t()
    if return_acc:
        return acc.to(torch.int32)
    acc = acc.float()
    if x.dtype == torch.bfloat16:
        acc = acc.to(torch.bfloat16).float()
    y = (acc / (weight_scale.float() * a.float())).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
