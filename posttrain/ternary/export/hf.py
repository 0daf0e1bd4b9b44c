"""Export ternary models so that plain transformers loads them, and load them back for more QAT.

`export_bitnet` writes transformers' BitNet format (integrations/bitnet.py), read by its `BitLinear` with
    quantization_config = {quant_method: bitnet, linear_class: bitlinear, quantization_mode: offline,
                           use_rms_norm, rms_norm_eps, modules_to_not_convert: [every dense nn.Linear]}
per quantized layer:
    <layer>.weight        uint8 (out/4, in): pack_ternary(T), see pack.py
    <layer>.weight_scale  shape (1,), model dtype, = 1 / s   (s = mean|W|; transformers computes
                          y = (x_int8 @ T^T) / (a * weight_scale) with a = 127 / absmax(x), i.e. x_q @ (T * s)^T)
    <layer>.rms_norm.weight   only with use_rms_norm
Everything else (embeddings, norms, lm_head, skipped linears) is stored dense in the export dtype.

Limits of that format, refused with a PosttrainError rather than written wrongly: one scale per tensor
(granularity='tensor'), 8-bit activations, out_features % 4 == 0 (transformers' BitLinear allocates out // 4
packed rows: skip such layers in `convert` and they are exported dense), one rms_norm_eps for all layers.

Numerics: when exported in the in-memory model's own dtype, transformers' BitLinear and posttrain's BitLinear
(lam = 1, fused path) run the same float operations on the same values, so logits are bit-identical: measured
max |diff| = 0.0 in fp32 and in bf16 on tiny Llamas, with transformers eager and torch.compile'd (CPU);
tests/test_ternary_export.py asserts <= 1e-5. Exporting in another dtype (fp32 model -> bf16 file) rounds
1/s and the dense tensors to that dtype, and the logits then differ by that rounding.

Every writer builds the folder under a temporary name next to `out_dir` and renames it at the end, so a crash
never leaves a complete-looking `out_dir`.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from posttrain.errors import PosttrainError
from posttrain.integrations.transformers_models import mark_not_quantized
from posttrain.ternary.pack import VALUES_PER_BYTE, pack_ternary, unpack_ternary
from posttrain.ternary.qat.bitlinear import BitLinear, bitlinear_layers
from posttrain.ternary.quant import bitnet_weight_scale, latent_from_ternary


def _resolve_dtype(model: nn.Module, dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return next(model.parameters()).dtype
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise PosttrainError(f"export dtype {dtype!r} is not a torch floating dtype: use float32, bfloat16 or float16")
    return resolved


def _check_model(model: nn.Module, what: str) -> list[tuple[str, BitLinear]]:
    if not isinstance(model, PreTrainedModel):
        raise PosttrainError(
            f"{what} needs a transformers PreTrainedModel, got {type(model).__name__}: "
            "merge PEFT adapters first (model.merge_and_unload())"
        )
    layers = bitlinear_layers(model)
    if not layers:
        raise PosttrainError(f"{what}: the model has no BitLinear layers: run posttrain.ternary.convert(model) first")
    if any(layer.quant_lambda < 1.0 for _, layer in layers):
        warnings.warn(
            f"{what}: quant_lambda < 1 (mid warm-up); the export is the fully quantized model (lambda=1)", stacklevel=3
        )
    return layers


def _check_bitnet_format(layers: list[tuple[str, BitLinear]]) -> None:
    """Refuse what transformers' BitLinear cannot represent (see the module docstring)."""
    for name, layer in layers:
        if layer.granularity != "tensor":
            raise PosttrainError(
                f"layer {name} uses granularity={layer.granularity!r}; transformers' BitNet format stores one scale "
                "per tensor: convert with granularity='tensor', or use export_fake_quant"
            )
        if layer.act_bits != 8:
            raise PosttrainError(
                f"layer {name} uses act_bits={layer.act_bits}; transformers' BitLinear quantizes activations to "
                "8 bits: convert with act_bits=8, or use export_fake_quant"
            )
        if layer.out_features % VALUES_PER_BYTE:
            raise PosttrainError(
                f"layer {name} has out_features={layer.out_features}, not a multiple of 4, which transformers' "
                f"BitLinear cannot load: convert with skip=[{name.split('.')[-1]!r}] to keep it dense"
            )
    eps = {layer.rms_norm.variance_epsilon for _, layer in layers if layer.rms_norm is not None}
    with_norm = sum(layer.rms_norm is not None for _, layer in layers)
    if len(eps) > 1 or 0 < with_norm < len(layers):
        raise PosttrainError(
            "BitLinear layers disagree on use_rms_norm/rms_norm_eps; transformers' config has one value: "
            "convert all layers with the same use_rms_norm and rms_norm_eps"
        )


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the duplicate names of tied tensors (lm_head tied to embed_tokens is re-tied at load)."""
    tie = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    seen: set[int] = set()
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tie and id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[key] = tensor.detach()
    return out


@torch.no_grad()
def _export_state(model: nn.Module, layers, dtype: torch.dtype, packed: bool) -> dict[str, torch.Tensor]:
    by_weight = {f"{name}.weight": layer for name, layer in layers}
    state = {}
    for key, tensor in _state_tensors(model).items():
        layer = by_weight.get(key)
        if layer is None:
            state[key] = tensor.to("cpu", dtype) if tensor.is_floating_point() else tensor.cpu()
        elif packed:
            codes, scale = layer.ternary()
            state[key] = pack_ternary(codes).cpu()
            state[key[: -len("weight")] + "weight_scale"] = bitnet_weight_scale(scale, dtype).cpu()
        else:
            state[key] = layer.quantized_weight().to("cpu", dtype)
    return state


def _write_atomically(out_dir: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_dir) on a sibling temp dir, then rename it to out_dir (replacing it only if overwrite)."""
    from posttrain.files import atomic_dir, check_output_folder

    out = check_output_folder(Path(out_dir).resolve(), "export target", overwrite)
    with atomic_dir(out) as staging:
        write(staging)
    return out


def _save_folder(model, tokenizer, config, state: dict[str, torch.Tensor], max_shard_size) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)  # includes the chat template (chat_template.jinja)

    return write


def _export_config(model: PreTrainedModel, dtype: torch.dtype, quantization_config: dict | None):
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quantization_config is not None:
        config.quantization_config = quantization_config
    return config


def export_bitnet(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a posttrain ternary model as a transformers BitNet checkpoint (packed 2-bit weights); return the path.

    `AutoModelForCausalLM.from_pretrained(out_dir)` loads it with no posttrain import. dtype defaults to the
    model's; non-quantized tensors and weight_scale are stored in it.
    """
    layers = _check_model(model, "export_bitnet")
    _check_bitnet_format(layers)
    dtype = _resolve_dtype(model, dtype)
    norm = layers[0][1].rms_norm
    converted = {name for name, _ in layers}
    dense = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in converted)
    quantization_config = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
        "use_rms_norm": norm is not None,
        "rms_norm_eps": norm.variance_epsilon if norm is not None else 1e-6,
        # explicit full names: given a list, transformers does not add its default lm_head skip
        "modules_to_not_convert": dense,
    }
    config = _export_config(model, dtype, quantization_config)
    state = _export_state(model, layers, dtype, packed=True)
    return _write_atomically(
        out_dir,
        overwrite,
        _save_folder(model, tokenizer, config, state, max_shard_size),
    )


def export_fake_quant(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a plain dense checkpoint whose quantized weights equal codes * scale exactly; return the path.

    Any granularity works. It is weight-only: a dense model runs activations unquantized, and the per-layer
    RMSNorm of use_rms_norm has no place in a dense architecture, so such models are refused.
    """
    layers = _check_model(model, "export_fake_quant")
    if any(layer.rms_norm is not None for _, layer in layers):
        raise PosttrainError(
            "export_fake_quant cannot store the BitLinear rms_norm of use_rms_norm=True: use export_bitnet"
        )
    dtype = _resolve_dtype(model, dtype)
    config = _export_config(model, dtype, None)
    state = _export_state(model, layers, dtype, packed=False)
    return _write_atomically(
        out_dir,
        overwrite,
        _save_folder(model, tokenizer, config, state, max_shard_size),
    )


def bits_per_weight(path: str | os.PathLike) -> dict[str, float | int]:
    """Bits per weight of an export_bitnet folder, from the safetensors headers (nothing is loaded).

    quantized_layers_bpw = 8 * (packed bytes + weight_scale bytes) / quantized weights   (~2.0)
    whole_file_bpw       = 8 * size of all *.safetensors files / all weights            (packed ones counted
                           as out x in; weight_scale counted as overhead, not as weights)
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise PosttrainError(f"bits_per_weight: no *.safetensors in {path}: pass an export_bitnet output folder")
    meta: dict[str, tuple[str, list[int]]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(key)
                meta[key] = (sl.get_dtype(), sl.get_shape())
    nbytes = {
        "U8": 1,
        "I8": 1,
        "BF16": 2,
        "F16": 2,
        "F32": 4,
        "F64": 8,
        "I32": 4,
        "I64": 8,
        "BOOL": 1,
    }
    numel = {k: int(torch.Size(shape).numel()) for k, (_, shape) in meta.items()}
    q_weights = q_bytes = total = 0
    for key, (dt, _) in meta.items():
        scale_key = key[: -len("weight")] + "weight_scale"
        if key.endswith("weight") and dt == "U8" and scale_key in meta:
            q_weights += numel[key] * VALUES_PER_BYTE
            q_bytes += numel[key] + numel[scale_key] * nbytes[meta[scale_key][0]]
            total += numel[key] * VALUES_PER_BYTE
        elif not key.endswith("weight_scale"):
            total += numel[key]
    file_bytes = sum(f.stat().st_size for f in files)
    return {
        "quantized_layers_bpw": 8.0 * q_bytes / q_weights if q_weights else float("nan"),
        "whole_file_bpw": 8.0 * file_bytes / total,
        "quantized_weights": q_weights,
        "total_weights": total,
        "file_bytes": file_bytes,
    }


def _check_bitnet_dir(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PosttrainError(f"load_ternary: {config_file} not found: pass an export_bitnet output folder")
    qc = json.loads(config_file.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "bitnet" or qc.get("linear_class", "bitlinear") != "bitlinear":
        raise PosttrainError(
            f"load_ternary: {config_file} has no bitnet/bitlinear quantization_config: "
            "pass a folder written by export_bitnet (dense checkpoints: from_pretrained + convert)"
        )


def load_ternary(path: str | os.PathLike, dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    """Load a BitNet (bitlinear, offline) checkpoint as a trainable model with posttrain BitLinear layers.

    transformers loads the checkpoint (its BitNet quantizer, tied weights, shards); each of its packed
    BitLinear layers is then replaced by a posttrain BitLinear whose latent weight is
    latent_from_ternary(T, 1 / weight_scale), so its forward uses T * s (the exported weights) and further QAT
    starts from there. The quantization_config is removed, so Trainer treats it as an ordinary model.
    """
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    path = Path(path)
    _check_bitnet_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    for name, hf_layer in [(n, m) for n, m in model.named_modules() if isinstance(m, HFBitLinear)]:
        model.set_submodule(name, _from_hf_bitlinear(hf_layer))
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            mark_not_quantized(module.config)
    return model


@torch.no_grad()
def _from_hf_bitlinear(hf_layer: nn.Module) -> BitLinear:
    dtype, device = hf_layer.weight_scale.dtype, hf_layer.weight.device
    norm = hf_layer.rms_norm
    layer = BitLinear(
        hf_layer.in_features,
        hf_layer.out_features,
        bias=hf_layer.bias is not None,
        device=device,
        dtype=dtype,
        use_rms_norm=norm is not None,
        rms_norm_eps=norm.variance_epsilon if norm is not None else 1e-6,
    )
    codes = unpack_ternary(hf_layer.weight, hf_layer.out_features)
    scale = 1.0 / hf_layer.weight_scale.float().reshape(())
    layer.weight.copy_(latent_from_ternary(codes, scale, dtype))
    if hf_layer.bias is not None:
        layer.bias.copy_(hf_layer.bias)
    if norm is not None:
        layer.rms_norm.weight.copy_(norm.weight)
    return layer
