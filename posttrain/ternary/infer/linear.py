"""Fast inference for ternary (BitNet b1.58) checkpoints: `TernaryLinear` and `load_fast_ternary`.

    model = load_fast_ternary("out/ternary", device="cuda")   # an export_bitnet folder, or a hub BitNet checkpoint
    model.generate(**inputs)

`TernaryLinear` holds exactly what transformers' `BitLinear` holds (state-dict keys `weight` uint8 (out/4, in) in
the BitNet layout, `weight_scale` (1,) = 1 / mean|W|, optional `bias` and `rms_norm`), and computes the same
function (see kernel.ternary_linear_reference) on one of three backends, picked per call by `backend="auto"`:

  "triton"  CUDA: one token: gemv.py (quantization fused, one launch, dp4a on 32-bit weight words); more: kernel.py
            (int8 activations x 2-bit weights decoded in registers for tensor-core tl.dot).
            Memory: the packed weights only, 2 bits per weight (1/8 of bf16), plus an fp32 scale per output column.
  "cpu"     CPU, float32/bfloat16: cpu.py, one C call per layer (quantize + 2-bit matmul + scale) on the packed
            weights. Memory: the packed weights only (1/16 of an fp32 model's linear weights).
  "torch"   anywhere (no triton, no C compiler, fp16 on CPU, mps): torch ops. Memory: the packed weights plus the
            codes unpacked once on first use, int8 on CPU (8 bits per weight, for torch._int_mm) or in the
            activation dtype elsewhere (16 bits for bf16): 4x / 8x the packed bytes.
All three are bit-exact with the reference in fp32 and bf16 (fp32: also with posttrain's and transformers' BitLinear).

Layers that always see the same input (q/k/v_proj, gate/up_proj; `fuse_shared_inputs`) are fused on the triton
and torch backends: the input is quantized once and one matmul runs over the members' concatenated weights (the
members' `weight` buffers become views of the concatenation, so no byte is duplicated). The call of the first
member computes all outputs; the others pick theirs up when called with the very same tensor object, unmodified
(identity and version counter checked); anything else recomputes. The CPU kernel does not need it (one C call per
layer costs less than slicing the fused output). TernaryLinear is inference-only: no parameters, and its output
carries no gradient (to train further, use posttrain.ternary.load_ternary).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from posttrain.errors import PosttrainError
from posttrain.ternary.infer import cpu, kernel
from posttrain.ternary.pack import VALUES_PER_BYTE, pack_ternary, unpack_ternary
from posttrain.ternary.qat.bitlinear import BitLinear
from posttrain.ternary.quant import activation_codes, bitnet_weight_scale

BACKENDS = ("auto", "triton", "cpu", "torch")
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _backend(requested: str, x: torch.Tensor) -> str:
    if requested != "auto":
        return requested
    if x.device.type == "cuda" and kernel.triton_available():
        return "triton"
    if x.device.type == "cpu" and x.dtype in cpu.SUPPORTED_DTYPES and cpu.available():
        return "cpu"
    return "torch"


def _torch_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """The reference math with pre-unpacked codes: int8 + torch._int_mm on CPU, x.dtype + F.linear elsewhere."""
    x2 = x.reshape(-1, x.shape[-1])
    q, a = activation_codes(x2)
    if codes.dtype == torch.int8:
        acc = torch._int_mm(q.to(torch.int8), codes.t()).float()
    else:
        acc = F.linear(q.to(x.dtype), codes).float()  # transformers' BitLinear computes exactly this
    if x.dtype == torch.bfloat16:
        acc = acc.to(torch.bfloat16).float()
    y = acc.div_(scales * a.float()).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _codes_for(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    codes = unpack_ternary(packed)
    return codes if x.device.type == "cpu" else codes.to(x.dtype)


class TernaryLinear(nn.Module):
    """Inference linear with packed ternary weights in transformers' BitNet format (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        use_rms_norm: bool = False,
        rms_norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if out_features % VALUES_PER_BYTE:
            raise PosttrainError(f"TernaryLinear needs out_features % 4 == 0 (BitNet layout), got {out_features}")
        if backend not in BACKENDS:
            raise PosttrainError(f"TernaryLinear backend {backend!r} is unknown: use one of {', '.join(BACKENDS)}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        rows = out_features // VALUES_PER_BYTE
        self.register_buffer("weight", torch.zeros(rows, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.rms_norm = None
        if use_rms_norm:
            from transformers.models.llama.modeling_llama import LlamaRMSNorm

            self.rms_norm = LlamaRMSNorm(in_features, eps=rms_norm_eps).to(device=device, dtype=dtype)
        self._group: _SharedInputGroup | None = None
        self._cache: dict = {}
        self._cpu: cpu.CpuTernaryLinear | None = None  # the CPU kernel bound to this layer (built on first use)

    @classmethod
    def from_bitlinear(cls, layer: nn.Module, backend: str = "auto") -> TernaryLinear:
        """From transformers' BitLinear; the buffers (and rms_norm) are shared, not copied."""
        new = cls(layer.in_features, layer.out_features, backend=backend, device="meta")
        new.weight, new.weight_scale, new.bias = layer.weight, layer.weight_scale, layer.bias
        new.rms_norm = layer.rms_norm
        return new

    @classmethod
    @torch.no_grad()
    def from_qat(cls, layer: BitLinear, backend: str = "auto") -> TernaryLinear:
        """From posttrain's QAT BitLinear (per-tensor scale, 8-bit activations): its lam = 1 forward, packed."""
        if layer.granularity != "tensor" or layer.act_bits != 8:
            raise PosttrainError(
                f"TernaryLinear needs granularity='tensor' and act_bits=8 (BitNet), got {layer.granularity!r}, "
                f"act_bits={layer.act_bits}: convert with the defaults"
            )
        dtype = layer.weight.dtype
        new = cls(layer.in_features, layer.out_features, backend=backend, device="meta")
        codes, scale = layer.ternary()
        new.weight = pack_ternary(codes)
        new.weight_scale = bitnet_weight_scale(scale, dtype)
        new.bias = None if layer.bias is None else layer.bias.detach().clone()
        new.rms_norm = layer.rms_norm
        return new

    def reset_cache(self) -> None:
        """Forget derived tensors (scales, unpacked codes, the CPU kernel binding); automatic on .to() and
        load_state_dict, needed after assigning or editing weight / weight_scale / bias in place."""
        self._cache, self._cpu = {}, None

    def _apply(self, fn, recurse=True):
        self.reset_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.reset_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def scales(self) -> torch.Tensor:
        """float32 (out_features,) copy of weight_scale, the kernels' per-column input (cached)."""
        ws = self._cache.get("scales")
        if ws is None or ws.device != self.weight_scale.device:
            ws = self.weight_scale.float().expand(self.out_features).contiguous()
            self._cache["scales"] = ws
        return ws

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Unpacked codes for the torch backend: int8 on CPU, x.dtype elsewhere (built once, cached)."""
        key = ("codes", x.device, x.dtype if x.device.type != "cpu" else torch.int8)
        if key not in self._cache:
            self._cache[key] = _codes_for(self.weight, x)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        fast = self._cpu
        if fast is not None and x.is_cpu and x.dtype is fast.dtype:  # the per-token decode path: keep it short
            return fast.run(x)
        backend = _backend(self.backend, x)
        if self._group is not None and backend != "cpu":
            return self._group(self, x, backend)
        if backend == "cpu":
            self._cpu = cpu.CpuTernaryLinear(self.weight, self.scales(), self.bias, x.dtype)
            return self._cpu(x)
        if backend == "triton":
            return kernel.ternary_linear_triton(x, self.weight, self.scales(), self.bias)
        return _torch_linear(x, self.codes(x), self.scales(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class _SharedInputGroup:
    """TernaryLinear siblings fed the same tensor: one activation quantization and one matmul for all of them."""

    def __init__(self, members: list[TernaryLinear]) -> None:
        self.members = members
        self.sizes = [m.out_features for m in members]
        self._fused: dict | None = None
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}
        self._version: int | None = None

    def __call__(self, member: TernaryLinear, x: torch.Tensor, backend: str) -> torch.Tensor:
        idx = self.members.index(member)
        if self._x is x and idx in self._pending and self._version == _version(x):
            out = self._pending.pop(idx)
            if not self._pending:
                self._x = None
            return out
        outs = self._compute(x, backend).split(self.sizes, dim=-1)
        self._pending = {i: y for i, y in enumerate(outs) if i != idx}
        self._x, self._version = (x, _version(x)) if self._pending else (None, None)
        return outs[idx]

    @torch.no_grad()
    def _build(self, device: torch.device) -> dict:
        """Concatenate the members' packed weights (members then view it), scales, biases and the column map."""
        members = self.members
        packed = torch.cat([m.weight.to(device) for m in members])
        bases, steps, col, row = [], [], 0, 0
        for m in members:
            rows = m.weight.shape[0]
            m.weight = packed[row : row + rows]
            m.reset_cache()
            bases.append(torch.arange(col, col + rows, dtype=torch.int32))
            steps.append(torch.full((rows,), rows, dtype=torch.int32))
            col, row = col + m.out_features, row + rows
        biases = [m.bias for m in members]
        bias = None
        if any(b is not None for b in biases):
            like = next(b for b in biases if b is not None)
            bias = torch.cat([b if b is not None else like.new_zeros(n) for b, n in zip(biases, self.sizes)])
        return {
            "packed": packed,
            "weights": [m.weight for m in members],
            "scales": torch.cat([m.scales().to(device) for m in members]),
            "bias": None if bias is None else bias.to(device),
            "col_map": (torch.cat(bases).to(device), torch.cat(steps).to(device)),
        }

    def _state(self, device: torch.device) -> dict:
        f = self._fused
        stale = (
            f is None
            or f["packed"].device != device
            or any(w is not m.weight for w, m in zip(f["weights"], self.members))
        )
        if stale:
            self._fused = f = self._build(device)
        return f

    def _compute(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        f = self._state(x.device)
        if backend == "triton":
            return kernel.ternary_linear_triton(x, f["packed"], f["scales"], f["bias"], col_map=f["col_map"])
        key = ("codes", x.dtype if x.device.type != "cpu" else torch.int8)
        if key not in f:
            f[key] = torch.cat([_codes_for(m.weight, x) for m in self.members])
        return _torch_linear(x, f[key], f["scales"], f["bias"])


def fuse_shared_inputs(model: nn.Module, groups: Iterable[Iterable[str]] = SHARED_INPUT_GROUPS) -> int:
    """Group sibling TernaryLinear layers that share their input (default q/k/v_proj and gate/up_proj); return
    the number of groups. Members must have equal in_features and no rms_norm (that normalizes per layer)."""
    count = 0
    for parent in model.modules():
        for names in groups:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, TernaryLinear) for m in members):
                continue
            if len({m.in_features for m in members}) != 1 or any(m.rms_norm is not None for m in members):
                continue
            group = _SharedInputGroup(members)
            for m in members:
                m._group = group
            count += 1
    return count


def swap_ternary_linears(model: nn.Module, backend: str = "auto") -> int:
    """Replace transformers' BitLinear and posttrain's QAT BitLinear layers by TernaryLinear; return the count."""
    from transformers.integrations.bitnet import AutoBitLinear
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, AutoBitLinear):
            raise PosttrainError(
                f"{name} is transformers' AutoBitLinear (linear_class='autobitlinear'), which stores dense weights: "
                "only packed BitNet checkpoints (linear_class='bitlinear', e.g. export_bitnet's) load fast"
            )
        if isinstance(module, HFBitLinear):
            model.set_submodule(name, TernaryLinear.from_bitlinear(module, backend))
        elif isinstance(module, BitLinear):
            if module.quant_lambda < 1.0:
                warnings.warn(f"{name}: quant_lambda < 1 (mid warm-up); TernaryLinear runs lambda = 1", stacklevel=2)
            model.set_submodule(name, TernaryLinear.from_qat(module, backend))
        else:
            continue
        count += 1
    return count


def _check_bitnet_config(path: str | os.PathLike, **kwargs) -> None:
    config = AutoConfig.from_pretrained(path, **kwargs)
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitnet":
        raise PosttrainError(
            f"load_fast_ternary: {path} has no quant_method='bitnet' quantization_config: pass an export_bitnet "
            "folder or a BitNet checkpoint (a model with posttrain BitLinear layers can be passed as an object)"
        )


def load_fast_ternary(
    path_or_model: str | os.PathLike | PreTrainedModel,
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype | str = "auto",
    backend: str = "auto",
    fuse: bool = True,
    **from_pretrained_kwargs,
) -> PreTrainedModel:
    """A BitNet model whose ternary linears are TernaryLinear, ready for `generate`.

    path_or_model: an export_bitnet folder or hub id (quant_method 'bitnet', linear_class 'bitlinear'), loaded by
    transformers (its BitLinear layers are then swapped, sharing their buffers), or an in-memory model with
    transformers BitLinear or posttrain BitLinear layers (swapped in place). device: moves the model after the
    swap. fuse: group q/k/v and gate/up (see fuse_shared_inputs).
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        _check_bitnet_config(path_or_model)
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=dtype, **from_pretrained_kwargs)
    elif isinstance(path_or_model, nn.Module):
        model = path_or_model
    else:
        raise PosttrainError(f"load_fast_ternary takes a path or a model, got {type(path_or_model).__name__}")
    if swap_ternary_linears(model, backend) == 0:
        raise PosttrainError(
            "load_fast_ternary found no BitLinear layer to replace: pass a BitNet checkpoint or a converted model"
        )
    if device is not None:
        model.to(device)
    if fuse:
        fuse_shared_inputs(model)
    return model.eval()
