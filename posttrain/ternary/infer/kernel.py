"""Triton kernels for BitNet b1.58 linears on packed 2-bit weights, and the pure-torch reference of the same math.

Layout: transformers' BitNet layout as exported (pack.py), used as is, no repacking at load:
    packed uint8 (R, K), R = N / 4; code c = w + 1 in {0, 1, 2}; packed[r, k] holds T[i * R + r, k] in bits 2i..2i+1.
Why keep it: the packing runs along the output dimension, so one loaded byte column packed[r0:r1, k0:k1] decodes,
with one shift and one mask per plane, into four int8 tiles that are ordinary (K, N) operands of an int8 tensor-core
dot, each against the same activation tile; loads are contiguous along K (coalesced, 16-byte vectors); and the
checkpoint buffer is the kernel's input (no second copy, nothing to convert at load). A layout packed along K would
need an interleave of the activations or a byte shuffle per tile to reach the same int8 tiles.
For a fused group of layers that share an input (q/k/v, gate/up; see linear.py) the members' packed tensors are
concatenated along dim 0 (still each in its own layout; the members then view the concatenation, so no memory is
duplicated) and a per-packed-row column map (col_base, col_step) says where plane i of packed row g lands:
column col_base[g] + i * col_step[g].

Math (BitNet: per-token int8 absmax activations, ternary weights, one scale per tensor), identical to posttrain's
`BitLinear` at lam = 1 and to transformers' `BitLinear`:
    t = max(max_k |x_k|, 1e-5); a = (1 / t) * 127 rounded to x's dtype; q_k = clamp(round_half_even(x_k a), -128, 127)
    acc_n = sum_k q_k T_nk = sum_k q_k c_nk - sum_k q_k        (exact int32; the second form needs no "- 1" per weight)
    y_n = acc_n / (weight_scale_n * a) + bias_n                 (weight_scale = 1 / mean|W|, as in transformers)
For bf16 inputs acc is rounded to bf16 before the division, as BitLinear's bf16 F.linear does, so the outputs equal
BitLinear's bit for bit; fp32 needs no rounding (|acc| <= 128 K < 2^24 for K < 131k); fp16 keeps the exact acc
(BitLinear's fp16 F.linear would overflow past 65504).

Kernels for 2 or more tokens (two launches per layer, or per fused group; one token: gemv.py, one launch):
  `_act_quant_fn`  one program per token: absmax pass, then q (int8), a (fp32) and sum(q) (int32). A cheap pre-pass
      (reads x once, writes 1 byte per element); fusing it into the matmul would make every program re-read and
      re-quantize all of x (16 rows of it, tl.dot's minimum). Rounding is a 1.5 * 2^23
      add-subtract (exact round-half-even for |v| < 2^22), compiled with enable_fp_fusion=False so that x * a is
      rounded before the add, as in torch.
  `_ternary_mm_fn` C = q @ T^T with T decoded in registers from the packed tile: for each K step one (BK, BN)
      uint8 load feeds four int8 tl.dot calls (tensor cores), four int32 accumulators cover 4 * BN output columns;
      epilogue: subtract sum(q), scale, optional bias, store. One kernel serves batched decode and prefill with
      two autotuned config sets: m <= 16 (BLOCK_M = 16, the minimum of tl.dot; small BLOCK_N so that enough
      programs stream the weights) and m > 16 (64..128-row
      tiles, grouped program order for L2 reuse of the weight tiles).
bf16 rounding is written out as integer round-to-nearest-even on the fp32 bits (the interpreter's own fp32 -> bf16
cast does not round to nearest even; on the GPU both agree), so interpreter and GPU compute the same bits.
Under TRITON_INTERPRET=1 the same kernels run on the CPU with a fixed config (tests). Set it before triton is
first imported (triton.language's own helpers are jit'd at import); the kernels here are built on first use.
"""

from __future__ import annotations

import torch

from posttrain.ternary.infer import gemv
from posttrain.ternary.infer.triton_setup import (  # noqa: F401 (import_triton, triton_available: re-exported)
    built_kernels,
    cdiv,
    import_triton,
    interpreting,
    next_power_of_2,
    triton_available,
)
from posttrain.ternary.quant import ternary_linear_reference  # noqa: F401 (the semantics; re-exported)

triton = None  # set with tl by _kernels() on first use (see triton_setup.py)
tl = None

SMALL_M = 16  # decode path (BLOCK_M = 16) up to this many tokens


_BUILT: dict[bool, dict] = {}


def _kernels() -> dict:
    """The jit'd kernels, built on first use for the current TRITON_INTERPRET mode (and cached per mode)."""
    return built_kernels(globals(), _BUILT, _build)


def _build() -> dict:
    kernels = {"act_quant": triton.jit(_act_quant_fn), "mm": triton.jit(_ternary_mm_fn)}
    if not interpreting():
        kernels["mm_small"] = triton.autotune(configs=_configs(small=True), key=["R", "K"])(kernels["mm"])
        kernels["mm_large"] = triton.autotune(configs=_configs(small=False), key=["R", "K", "M_BUCKET"])(kernels["mm"])
    return kernels


# Plain functions, jit-wrapped by _build() on first use; `tl` is this module's global, set by _kernels() before
# any of them is compiled or interpreted (the annotations are strings: from __future__ import annotations).


def _act_quant_fn(x_ptr, q_ptr, a_ptr, s_ptr, K, stride_xm, stride_qm, IS_BF16: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_row + k0 + offs, mask=offs < K - k0, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    t = tl.maximum(tl.max(amax, axis=0), 1e-5)
    a = tl.math.div_rn(tl.full((), 1.0, tl.float32), t) * 127.0  # torch: 127 / t is reciprocal(t) * 127
    if IS_BF16:  # rounded to the activation dtype, as activation_codes (explicit RNE, see the module docstring)
        u = a.to(tl.uint32, bitcast=True)
        a = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        a = a.to(x_ptr.dtype.element_ty).to(tl.float32)
    qsum = tl.zeros((BLOCK_K,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask = offs < K - k0
        v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32) * a
        r = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: round half to even (|v| <= 128 here)
        q = tl.minimum(tl.maximum(r, -128.0), 127.0).to(tl.int8)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q, mask=mask)
        qsum += q.to(tl.int32)
    tl.store(a_ptr + row, a)
    tl.store(s_ptr + row, tl.sum(qsum, axis=0))


def _ternary_mm_fn(q_ptr, a_ptr, s_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, base_ptr, step_ptr,
                   M, R, K, stride_qm, stride_wr, stride_ym, M_BUCKET,
                   HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr,
                   ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(R, BLOCK_N)
    width = GROUP_M * num_n  # grouped order: GROUP_M row blocks walk the weight tiles together (L2 reuse)
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rg = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    q_ptrs = q_ptr + rm.to(tl.int64)[:, None] * stride_qm + rk[None, :]
    w_ptrs = w_ptr + rg.to(tl.int64)[None, :] * stride_wr + rk[:, None]  # (BK, BN), contiguous along K
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        xq = tl.load(q_ptrs, mask=(rm < M)[:, None] & k_ok[None, :], other=0)
        p = tl.load(w_ptrs, mask=k_ok[:, None] & (rg < R)[None, :], other=0)
        acc0 = tl.dot(xq, (p & 3).to(tl.int8), acc0, out_dtype=tl.int32)
        acc1 = tl.dot(xq, ((p >> 2) & 3).to(tl.int8), acc1, out_dtype=tl.int32)
        acc2 = tl.dot(xq, ((p >> 4) & 3).to(tl.int8), acc2, out_dtype=tl.int32)
        acc3 = tl.dot(xq, (p >> 6).to(tl.int8), acc3, out_dtype=tl.int32)
        q_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    m_ok = rm < M
    row_ok = rg < R
    a = tl.load(a_ptr + rm, mask=m_ok, other=1.0)
    qsum = tl.load(s_ptr + rm, mask=m_ok, other=0)
    if HAS_MAP:
        col_base = tl.load(base_ptr + rg, mask=row_ok, other=0)
        col_step = tl.load(step_ptr + rg, mask=row_ok, other=0)
    else:
        col_base = rg
        col_step = R
    for plane in tl.static_range(4):  # unrolled; the ifs are resolved at compile time
        if plane == 0:
            acc = acc0
        elif plane == 1:
            acc = acc1
        elif plane == 2:
            acc = acc2
        else:
            acc = acc3
        cols = col_base + plane * col_step
        mask = m_ok[:, None] & row_ok[None, :]
        ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + cols[None, :]
        acc = acc - qsum[:, None]
        if INT_OUT:
            tl.store(ptrs, acc, mask=mask)
        else:
            v = acc.to(tl.float32)
            if ROUND_BF16:  # as BitLinear's bf16 F.linear output
                u = v.to(tl.uint32, bitcast=True)
                v = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            ws = tl.load(ws_ptr + cols, mask=row_ok, other=1.0)
            y = tl.math.div_rn(v, ws[None, :] * a[:, None])
            if ROUND_BF16:
                u = y.to(tl.uint32, bitcast=True)
                y = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            if HAS_BIAS:  # y in the output dtype, plus bias, rounded again: torch's y.to(dtype) + bias
                y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
                y += tl.load(b_ptr + cols, mask=row_ok, other=0.0).to(tl.float32)[None, :]
                if ROUND_BF16:
                    u = y.to(tl.uint32, bitcast=True)
                    y = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _configs(small: bool) -> list:
    """Autotune candidates. BLOCK_N counts packed rows (each yields 4 output columns)."""
    if small:  # decode: weight streaming; 16..64 packed rows x 128..512 bytes of K per step
        shapes = [(16, 16, 256, 4, 4), (16, 32, 256, 4, 3), (16, 64, 128, 4, 3), (16, 16, 512, 4, 3)]
    else:  # prefill: compute-bound int8 tensor-core tiles
        shapes = [(64, 64, 128, 4, 3), (128, 64, 128, 8, 3), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 8}


def act_quant(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 (M, K), a float32 (M,), sum(q) int32 (M,)) for a 2-D activation x2 with unit last stride."""
    interpret = interpreting()  # read once: an environment read costs ~2 us, per layer and call
    kernels = _BUILT.get(interpret) or _kernels()
    M, K = x2.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x2.device)
    a = torch.empty(M, dtype=torch.float32, device=x2.device)
    s = torch.empty(M, dtype=torch.int32, device=x2.device)
    if M:
        block = min(max(next_power_of_2(K), 16), 1024 if interpret else 4096)
        extra = {} if interpret else {"enable_fp_fusion": False, "num_warps": 4}
        is_bf16 = x2.dtype == torch.bfloat16
        kernels["act_quant"][(M,)](x2, q, a, s, K, x2.stride(0), q.stride(0), is_bf16, BLOCK_K=block, **extra)
    return q, a, s


def ternary_matmul(
    q: torch.Tensor,
    a: torch.Tensor,
    qsum: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    col_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_acc: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """y (M, N) from act_quant's outputs and packed (R, K) weights; weight_scale float32 (N,), bias (N,).

    config (BLOCK_M/N/K, GROUP_M) bypasses the autotuner (the interpreter always uses a fixed one).
    """
    kernels = _kernels()
    M, K = q.shape
    R = packed.shape[0]
    N = 4 * R
    y = torch.empty(M, N, dtype=torch.int32 if return_acc else out_dtype, device=q.device)
    if M == 0:
        return y
    base, step = col_map if col_map is not None else (packed, packed)  # unused pointers when HAS_MAP is False
    flags = {
        "HAS_MAP": col_map is not None,
        "HAS_BIAS": bias is not None,
        "INT_OUT": return_acc,
        "ROUND_BF16": out_dtype == torch.bfloat16,
    }
    m_bucket = min(next_power_of_2(M), 4096)
    args = (q, a, qsum, packed, weight_scale, bias if bias is not None else weight_scale, y, base, step)
    args += (M, R, K, q.stride(0), packed.stride(0), y.stride(0), m_bucket)
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        grid = (cdiv(M, config["BLOCK_M"]) * cdiv(R, config["BLOCK_N"]),)
        kernels["mm"][grid](*args, **flags, **config)
    else:
        kernel = kernels["mm_small" if M <= SMALL_M else "mm_large"]
        kernel[lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(R, meta["BLOCK_N"]),)](*args, **flags)
    return y


def ternary_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    col_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_acc: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """BitNet linear of x (..., K) with packed (N/4, K) weights: one token -> ternary_gemv (one launch), else
    act_quant pre-pass + ternary_matmul (int8 tensor cores).

    weight_scale: float32 (N,) contiguous (expand a (1,) scale once and keep it); result (..., N) in x's dtype.
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()

    one_token = config is None and gemv.gemv_applies(x2, packed)
    gemv_config = gemv.ready_config(x2, packed, x.dtype, bias, col_map, return_acc) if one_token else None
    if gemv_config is not None:  # decode at batch 1: one launch (gemv.py)
        y = gemv.launch(x2, packed, weight_scale, out_dtype=x.dtype, config=gemv_config, bias=bias,
                        col_map=col_map, return_acc=return_acc)  # gemv_applies checked it above
        return y.view(*x.shape[:-1], y.shape[-1])
    q, a, s = act_quant(x2)
    y = ternary_matmul(
        q,
        a,
        s,
        packed,
        weight_scale,
        out_dtype=x.dtype,
        bias=bias,
        col_map=col_map,
        return_acc=return_acc,
        config=config,
    )
    return y.view(*x.shape[:-1], y.shape[-1])
