"""LoRA adapters on a frozen 1.58-bit base that stays packed in memory, and a merge that stays exactly ternary.

The base: `PackedTernaryLinear` holds what transformers' BitNet `BitLinear` holds (buffers `weight` uint8 (out/4, in)
in the BitNet 2-bit layout and `weight_scale` (1,) = 1 / s, optional `bias` and `rms_norm`) and computes the same
function: y = (X_int @ T^T) / (weight_scale * a) + b, with X_int, a the 8-bit absmax codes of x per token. It is an
`nn.Linear` subclass without parameters: peft's stock LoRA layer wraps it, `all-linear` finds it, and nothing of
the base is trainable or unpacked at rest (2 bits per weight instead of 32). Its backward passes the gradient to x
through the quantizers (straight-through): dx = dy @ (T * s), unpacked again in backward instead of kept.

Two kinds of adapter (config `adapter.ternary_merge`):

  plain          y = base(x) + scaling * B(A(dropout(x)))           peft's own lora.Linear on the packed base
                 (QLoRA's idea at 1.58 bits). T * s + scaling * B A is not ternary, so no merge is exact:
                 `posttrain merge` refuses it; use the adapter unmerged.
  ternary_merge  y = x_q @ Q(W + scaling * B A)^T + b               `TernaryLoraLinear`, trained through the
                 quantizer Q (absmean ternary, one scale per tensor, straight-through to B and A), so training
                 sees exactly the weights the merge writes. W = T * s / p is the base's latent weight
                 (latent_from_ternary, p = fraction of non-zero codes): Q(W) = T * s, so before training (B = 0)
                 the layer is the base exactly (Q(T * s) would shrink the scale to s * p). LoRA dropout does not
                 apply: the adapter is part of the weight, not a second path. The merge packs Q(W + scaling * B A)
                 and its scale into the base layer: the merged model computes what the adapter model computes.

peft does not know `TernaryLoraLinear`: it is registered on the LoraConfig (integrations/peft_lora.py), and the
adapter folder records the kind in TERNARY_ADAPTER_FILE so that `load_adapter` registers it again. A plain
adapter needs nothing of posttrain beyond the base layer: `PeftModel.from_pretrained(load_packed_ternary(base),
adapter_dir)` loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from posttrain.errors import PosttrainError
from posttrain.integrations.peft_lora import register_lora_layer
from posttrain.integrations.transformers_models import mark_not_quantized
from posttrain.ternary.pack import VALUES_PER_BYTE, pack_ternary, unpack_ternary
from posttrain.ternary.qat.bitlinear import BitLinear, _TernaryLinearFn
from posttrain.ternary.quant import (
    WEIGHT_EPS,
    activation_codes,
    bitnet_weight_scale,
    latent_from_ternary,
    ternary_codes,
)

TERNARY_ADAPTER_FILE = "ternary_adapter.json"
ACT_BITS = 8  # transformers' BitLinear quantizes activations to 8 bits


class _PackedTernaryFn(torch.autograd.Function):
    """y = (X_int @ T^T) / (weight_scale * a) + b on packed T; backward: dx = dy @ (T / weight_scale), nothing else."""

    @staticmethod
    def forward(ctx, x, packed, weight_scale, bias, rows: int):
        codes = unpack_ternary(packed, rows).to(x.dtype)
        x_codes, a = activation_codes(x, ACT_BITS)
        y = F.linear(x_codes.to(x.dtype), codes)  # integer-valued: exact in bf16/fp16 too
        # the float ops of transformers' BitLinear and posttrain's fused BitLinear: divide in float32, round once
        y = y.float().div_(weight_scale.to(x.dtype).float() * a.float()).to(x.dtype)
        if bias is not None:
            y.add_(bias.to(x.dtype))
        ctx.save_for_backward(packed, weight_scale)  # the buffers themselves: 2 bits per weight, no copy
        ctx.rows = rows
        return y

    @staticmethod
    def backward(ctx, grad_y):
        packed, weight_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = unpack_ternary(packed, ctx.rows).float() / weight_scale.float()
            grad_x = grad_y @ weight.to(grad_y.dtype)
        return grad_x, None, None, None, None


class PackedTernaryLinear(nn.Linear):
    """A frozen BitNet linear on packed 2-bit weights that trains what comes before it and LoRA around it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 use_rms_norm: bool = False, rms_norm_eps: float = 1e-6) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a dense float weight
        if out_features % VALUES_PER_BYTE:
            raise PosttrainError(f"PackedTernaryLinear needs out_features % 4 == 0 (BitNet layout), got {out_features}")
        self.in_features, self.out_features = in_features, out_features
        packed_shape = (out_features // VALUES_PER_BYTE, in_features)
        self.register_buffer("weight", torch.zeros(packed_shape, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.rms_norm = None
        if use_rms_norm:  # the class transformers' BitLinear uses, so the function is the same
            from transformers.models.llama.modeling_llama import LlamaRMSNorm

            self.rms_norm = LlamaRMSNorm(in_features, eps=rms_norm_eps).to(device=device, dtype=dtype)
            self.rms_norm.requires_grad_(False)

    @classmethod
    def from_hf_bitlinear(cls, layer: nn.Module) -> PackedTernaryLinear:
        """Takes over transformers' BitLinear buffers (the same tensors: nothing is copied or unpacked)."""
        norm = layer.rms_norm
        new = cls(layer.in_features, layer.out_features, bias=False, device="meta",
                  dtype=layer.weight_scale.dtype, use_rms_norm=norm is not None,
                  rms_norm_eps=norm.variance_epsilon if norm is not None else 1e-6)
        new.weight, new.weight_scale, new.bias = layer.weight, layer.weight_scale, layer.bias
        if norm is not None:
            new.rms_norm = norm.requires_grad_(False)
        return new

    def scale(self) -> torch.Tensor:
        """s = 1 / weight_scale in float32, the per-tensor absmean, moved by an ulp where the reciprocal does not
        round-trip: bitnet_weight_scale(s) is this layer's weight_scale exactly, so an export writes it unchanged."""
        stored = self.weight_scale.reshape(())
        s = 1.0 / stored.float()
        for _ in range(8):
            back = bitnet_weight_scale(s, stored.dtype).reshape(())
            if back == stored:
                break
            s = torch.nextafter(s, torch.full_like(s, float("inf") if back > stored else 0.0))
        return s

    def codes(self) -> torch.Tensor:
        return unpack_ternary(self.weight, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """T * s in float32: the weight this layer multiplies by."""
        return self.codes().float() * self.scale()

    def latent(self) -> torch.Tensor:
        """W = T * s / p in float32, whose quantization Q(W) is T with scale s again (latent_from_ternary; T * s
        itself would re-quantize to scale s * p, p the fraction of non-zero codes)."""
        return latent_from_ternary(self.codes(), self.scale(), torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        with torch.autocast(x.device.type, enabled=False):  # integer sums must not be rounded to bf16 by autocast
            return _PackedTernaryFn.apply(x, self.weight, self.weight_scale, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


class TernaryLoraLinear(LoraLinear):
    """peft LoRA layer whose adapter lives inside the quantizer: y = x_q @ Q(W + scaling * B A)^T + b."""

    def effective_weight(self, adapters: list[str] | None = None) -> torch.Tensor:
        """W + sum of scaling * B A over the adapters (default: the active ones), in float32, with gradient; W is
        the base's latent weight, Q(W) = T * s, so with B = 0 the layer is the base layer exactly."""
        base = self.get_base_layer()
        weight = base.latent()
        for name in self.active_adapters if adapters is None else adapters:
            if name in self.lora_A:
                delta = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()
                weight = weight + delta * self.scaling[name]
        return weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged or not any(n in self.lora_A for n in self.active_adapters):
            return base(x)
        if base.rms_norm is not None:
            x = base.rms_norm(x)
        with torch.autocast(x.device.type, enabled=False):
            weight = self.effective_weight().to(x.dtype)
            return _TernaryLinearFn.apply(x, weight, base.bias, WEIGHT_EPS, ACT_BITS)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Pack Q(W + scaling * B A) and its scale into the base layer (the values the forward computes)."""
        adapters = check_adapters_to_merge(self, adapter_names)
        if not adapters:
            return
        base = self.get_base_layer()
        dtype = base.weight_scale.dtype
        codes, scale = ternary_codes(self.effective_weight(adapters).to(dtype), "tensor", None, WEIGHT_EPS)
        if not hasattr(self, "unmerged_base"):
            self.unmerged_base = (base.weight, base.weight_scale)  # 2 bits per weight: cheap to keep for unmerge
        base.weight = pack_ternary(codes).to(base.weight.device)
        base.weight_scale = bitnet_weight_scale(scale, dtype).to(base.weight_scale.device)
        self.merged_adapters.extend(adapters)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.get_base_layer()
        base.weight, base.weight_scale = self.unmerged_base
        del self.unmerged_base
        self.merged_adapters.clear()


def packed_layers(model: nn.Module) -> list[tuple[str, PackedTernaryLinear]]:
    """(name, layer) of every packed ternary base layer, also inside peft wrappers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedTernaryLinear)]


def load_packed_ternary(path: str | os.PathLike, dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    """A BitNet folder (transformers' format: export_bitnet, recipe: ternary) with its ternary linears as
    PackedTernaryLinear: packed as on disk, frozen, ready for LoRA. Embeddings, norms and lm_head load as usual."""
    model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=dtype)
    if not to_packed_layers(model):
        raise PosttrainError(f"{path}: no BitNet linear layers were loaded; pass a folder written by export_bitnet")
    return model


def to_packed_layers(model: PreTrainedModel) -> int:
    """Swap transformers' BitLinear layers of a loaded BitNet model for PackedTernaryLinear (same buffers, same
    function, and a backward); the model is no longer marked quantized, so Trainer and peft take it."""
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    swapped = [(n, m) for n, m in model.named_modules() if isinstance(m, HFBitLinear)]
    for name, layer in swapped:
        model.set_submodule(name, PackedTernaryLinear.from_hf_bitlinear(layer))
    if swapped and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    for module in model.modules() if swapped else ():
        if isinstance(module, PreTrainedModel):
            mark_not_quantized(module.config)
    return len(swapped)


def base_weight_bytes(model: nn.Module) -> dict:
    """Bytes the ternary base's linear weights hold in memory, against the same layers as dense weights in the
    model's compute dtype (what a dense or latent-weight copy of the base holds)."""
    layers = packed_layers(model)
    held = sum(m.weight.nbytes + m.weight_scale.nbytes for _, m in layers)
    dense = sum(m.in_features * m.out_features * m.weight_scale.element_size() for _, m in layers)
    return {"layers": len(layers), "packed_bytes": held, "dense_bytes": dense,
            "ratio": round(held / dense, 6) if dense else None}


def lora_config_for(config: LoraConfig, ternary_merge: bool) -> LoraConfig:
    """Registers TernaryLoraLinear for the packed layers when the adapter trains through the quantizer."""
    if ternary_merge:
        register_lora_layer(config, PackedTernaryLinear, TernaryLoraLinear)
    return config


def write_adapter_kind(folder: str | os.PathLike, ternary_merge: bool) -> None:
    """Record in an adapter folder that its base is packed ternary and which kind of adapter it is."""
    from posttrain.files import write_json_atomic

    write_json_atomic(Path(folder) / TERNARY_ADAPTER_FILE,
                      {"base": "packed ternary (BitNet b1.58)", "ternary_merge": bool(ternary_merge)})


def is_ternary_merge_adapter(adapter_dir: str | os.PathLike) -> bool:
    file = Path(adapter_dir) / TERNARY_ADAPTER_FILE
    if not file.is_file():
        return False
    try:
        return bool(json.loads(file.read_text(encoding="utf-8")).get("ternary_merge"))
    except (OSError, ValueError, AttributeError) as err:
        raise PosttrainError(f"{file}: cannot read it ({type(err).__name__}); re-save the adapter") from None


def load_adapter(base: PreTrainedModel, adapter_dir: str | os.PathLike, trainable: bool = False) -> PeftModel:
    """peft's PeftModel.from_pretrained on a packed ternary base, with TernaryLoraLinear registered for a
    ternary_merge adapter (peft's config file cannot carry the registration)."""
    config = lora_config_for(LoraConfig.from_pretrained(str(adapter_dir)), is_ternary_merge_adapter(adapter_dir))
    return PeftModel.from_pretrained(base, str(adapter_dir), config=config, is_trainable=trainable)


def check_mergeable(adapter_dir: str | os.PathLike) -> None:
    """Only a ternary_merge adapter has an exact ternary merge; fails with one line before anything loads."""
    if not is_ternary_merge_adapter(adapter_dir):
        raise _plain_merge_error(adapter_dir)


def _plain_merge_error(adapter_dir) -> PosttrainError:
    return PosttrainError(
        f"{adapter_dir}: a plain LoRA adapter on a ternary base has no exact ternary merge (T*s + BA is not "
        "ternary); use it unmerged (posttrain eval takes the adapter folder), or train it with "
        "adapter.ternary_merge: true, which trains through the quantizer so that the merge stays ternary"
    )


def merged_ternary_model(model: PeftModel, adapter_dir: str | os.PathLike = "adapter") -> PreTrainedModel:
    """The adapter merged into its packed base, as a model of posttrain BitLinear layers (export_bitnet and
    export_gguf take it; further QAT can start from it). Only a ternary_merge adapter merges exactly."""
    if any(isinstance(m, LoraLinear) and not isinstance(m, TernaryLoraLinear)
           and isinstance(m.get_base_layer(), PackedTernaryLinear) for m in model.modules()):
        raise _plain_merge_error(adapter_dir)
    merged = model.merge_and_unload()  # TernaryLoraLinear.merge packs Q(W + BA); dense targets merge as usual
    for name, layer in packed_layers(merged):
        merged.set_submodule(name, bitlinear_from_packed(layer))
    return merged


class MergedBitLinear(BitLinear):
    """A BitLinear made by a merge, remembering the codes and scale the adapter model computed with.

    Its latent weight (latent_from_ternary) re-derives the scale only to within a float32 ulp (mean|T s / p| is a
    rounded sum), and one ulp can move a downstream 8-bit activation code across a rounding boundary. So `ternary()`,
    what export_bitnet and export_gguf write, returns the remembered codes and scale while the latent still
    quantizes to them (same codes, scale within 1e-5): the files then hold the adapter model's values bit for bit.
    Once further training moves the latent, it is an ordinary BitLinear.
    """

    def remember(self, packed: torch.Tensor, scale: torch.Tensor) -> MergedBitLinear:
        # not persistent: state_dict (and with it every export's tensor list) stays a BitLinear's
        self.register_buffer("merged_packed", packed.clone(), persistent=False)
        self.register_buffer("merged_scale", scale.detach().float().clone(), persistent=False)
        return self

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scale = super().ternary()
        merged = unpack_ternary(self.merged_packed, self.out_features)
        if torch.equal(codes, merged) and torch.allclose(scale, self.merged_scale, rtol=1e-5, atol=0.0):
            return merged, self.merged_scale.clone()
        return codes, scale

    def quantized_weight(self) -> torch.Tensor:
        codes, scale = self.ternary()
        return (codes.float() * scale).to(self.weight.dtype)


@torch.no_grad()
def bitlinear_from_packed(layer: PackedTernaryLinear) -> MergedBitLinear:
    """A posttrain BitLinear whose forward uses the packed layer's codes and scale (latent_from_ternary)."""
    dtype, device = layer.weight_scale.dtype, layer.weight.device
    norm = layer.rms_norm
    new = MergedBitLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=device,
                          dtype=dtype, use_rms_norm=norm is not None,
                          rms_norm_eps=norm.variance_epsilon if norm is not None else 1e-6)
    new.weight.copy_(latent_from_ternary(layer.codes(), layer.scale(), dtype))
    if layer.bias is not None:
        new.bias.copy_(layer.bias)
    if norm is not None:
        new.rms_norm.weight.copy_(norm.weight)
    return new.remember(layer.weight, layer.scale())
