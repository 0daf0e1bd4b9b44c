"""The one-token ternary kernel (decode at batch 1): activation quantization and 2-bit matmul in one launch.

kernel.py's two-kernel path (a quantization pre-pass, then int8 tensor-core tiles with BLOCK_M = 16) costs two
launches per layer, and decoding each weight byte for the tensor cores is ALU work a one-token decode cannot hide;
on an H200 it ran at 85-100 us per layer whatever the layer's size (docs/BENCHMARKS.md). Here one program per
BLOCK_N packed rows quantizes the token itself (it sits in L2) and reads the weights as 32-bit words: one shift,
one mask and one dp4a per 4 weight bytes and bit plane (_gemv_fn). Same math and bits as
kernel.ternary_linear_reference; the layout is kernel.py's (transformers' BitNet packing, fused groups through
the same column map). Every configuration is checked against the reference on first use per device and dtype,
and the fastest good one is chosen per shape. On an H200 (2026-11-26) the first twelve configurations all passed
that check and the kernel ran 4096x14336 in 12.0 us and 8192x28672 in 26.0 us of GPU time (docs/BENCHMARKS.md);
the later candidates (GEMV_CONFIGS) are checked in the interpreter and compiled for sm_90/sm_80 in the tests, not
yet run on a GPU.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

from posttrain.ternary.infer.triton_setup import built_kernels, cdiv, interpreting, next_power_of_2
from posttrain.ternary.pack import pack_ternary
from posttrain.ternary.quant import ternary_linear_reference

triton = None  # set with tl by _kernels() on first use (importing triton fixes the interpreter mode)
tl = None
_BUILT: dict[bool, object] = {}


def _kernels() -> dict:
    """{"gemv": the jit'd kernel} for the current TRITON_INTERPRET mode, built on first use."""
    return built_kernels(globals(), _BUILT, lambda: {"gemv": triton.jit(_gemv_fn)})


# A plain function, jit-wrapped by _kernels(); `tl` is this module's global, set before it is compiled.


def _gemv_fn(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, base_ptr, step_ptr, R, K, stride_wr,
             HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr, ROUND_BF16: tl.constexpr,
             IS_BF16: tl.constexpr, USE_DP4A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             QUANT_BLOCK: tl.constexpr, ACC_2D: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    # One token (decode at batch 1), one launch: the activation quantization is fused (each program re-reads the
    # token, which sits in L2), and the weights are read as 32-bit words, 16 codes each. Plane i of a word,
    # (w >> 2i) & 0x03030303, holds the codes of 4 consecutive k in its 4 bytes: one dp4a (4-way byte dot product,
    # accumulating) against the 4 matching int8 activations packed the same way, i.e. a shift, a mask and a dp4a
    # per 4 weight bytes and plane where a multiply per code would be (the design; not yet measured on a GPU).
    # ACC_2D keeps per-word partial sums in dp4a's own accumulator and reduces across the tile once at the end
    # (more registers); otherwise each K step reduces. PREFETCH loads each weight tile one K step ahead, the first
    # one before the token's scale is known, so that HBM latency overlaps the quantization's reduction (the
    # compiler's pipelining starts only at the loop). The tuner picks per shape.
    pid = tl.program_id(0)
    WORDS: tl.constexpr = BLOCK_K // 4
    rg = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, WORDS)
    lane = tl.arange(0, 4)
    w_ptrs = w_ptr.to(tl.pointer_type(tl.uint32)) + rg.to(tl.int64)[:, None] * (stride_wr // 4) + rw[None, :]
    if PREFETCH:
        p_next = tl.load(w_ptrs, mask=(rg < R)[:, None] & (rw * 4 < K)[None, :], other=0)
    offs = tl.arange(0, QUANT_BLOCK)
    amax = tl.zeros((QUANT_BLOCK,), tl.float32)
    for k0 in range(0, K, QUANT_BLOCK):
        v = tl.load(x_ptr + k0 + offs, mask=offs < K - k0, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    t = tl.maximum(tl.max(amax, axis=0), 1e-5)
    a = tl.math.div_rn(tl.full((), 1.0, tl.float32), t) * 127.0
    if IS_BF16:  # as _act_quant_fn
        u = a.to(tl.uint32, bitcast=True)
        a = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        a = a.to(x_ptr.dtype.element_ty).to(tl.float32)
    if ACC_2D:
        acc0 = tl.zeros((BLOCK_N, WORDS), tl.int32)
        acc1 = tl.zeros((BLOCK_N, WORDS), tl.int32)
        acc2 = tl.zeros((BLOCK_N, WORDS), tl.int32)
        acc3 = tl.zeros((BLOCK_N, WORDS), tl.int32)
    else:
        acc0 = tl.zeros((BLOCK_N,), tl.int32)
        acc1 = tl.zeros((BLOCK_N,), tl.int32)
        acc2 = tl.zeros((BLOCK_N,), tl.int32)
        acc3 = tl.zeros((BLOCK_N,), tl.int32)
    qsum = tl.zeros((WORDS,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rw[:, None] * 4 + lane[None, :]  # (WORDS, 4): byte j of word w is k0 + 4w + j
        v = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32) * a
        r = (v + 12582912.0) - 12582912.0  # round half to even, as _act_quant_fn (no FMA: enable_fp_fusion off)
        q = tl.minimum(tl.maximum(r, -128.0), 127.0).to(tl.int32)
        qsum += tl.sum(q, axis=1)
        qw = tl.sum((q & 0xFF) << (lane * 8)[None, :], axis=1)  # the 4 int8 codes of each word, packed
        qw = tl.broadcast_to(qw[None, :], (BLOCK_N, WORDS))
        if PREFETCH:  # this step's tile arrived during the last one; ask for the next (masked off past K)
            p = p_next
            p_next = tl.load(w_ptrs + WORDS, mask=(rg < R)[:, None] & (rw * 4 < K - k0 - BLOCK_K)[None, :], other=0)
        else:
            p = tl.load(w_ptrs, mask=(rg < R)[:, None] & (rw < (K - k0) // 4)[None, :], other=0)
        for plane in tl.static_range(4):  # unrolled; the ifs are resolved at compile time
            if plane == 0:
                acc = acc0
            elif plane == 1:
                acc = acc1
            elif plane == 2:
                acc = acc2
            else:
                acc = acc3
            c = (p >> (2 * plane)) & 0x03030303
            if ACC_2D:
                d = acc
            else:
                d = tl.zeros((BLOCK_N, WORDS), tl.int32)
            if USE_DP4A:
                d = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [c, qw, d],
                                              dtype=tl.int32, is_pure=True, pack=1)
            else:  # the same sums without the PTX instruction (interpreter, ROCm); int8 bytes sign-extended
                for j in tl.static_range(4):
                    qj = (((qw >> (8 * j)) & 0xFF) ^ 0x80) - 0x80
                    d += ((c >> (8 * j)) & 0xFF).to(tl.int32) * qj
            if ACC_2D:
                acc = d
            else:
                acc = acc + tl.sum(d, axis=1)
            if plane == 0:
                acc0 = acc
            elif plane == 1:
                acc1 = acc
            elif plane == 2:
                acc2 = acc
            else:
                acc3 = acc
        w_ptrs += WORDS
    if ACC_2D:
        acc0 = tl.sum(acc0, axis=1)
        acc1 = tl.sum(acc1, axis=1)
        acc2 = tl.sum(acc2, axis=1)
        acc3 = tl.sum(acc3, axis=1)
    s = tl.sum(qsum, axis=0)
    row_ok = rg < R
    if HAS_MAP:
        col_base = tl.load(base_ptr + rg, mask=row_ok, other=0)
        col_step = tl.load(step_ptr + rg, mask=row_ok, other=0)
    else:
        col_base = rg
        col_step = R
    for plane in tl.static_range(4):
        if plane == 0:
            acc = acc0
        elif plane == 1:
            acc = acc1
        elif plane == 2:
            acc = acc2
        else:
            acc = acc3
        cols = col_base + plane * col_step
        acc = acc - s
        if INT_OUT:
            tl.store(y_ptr + cols, acc, mask=row_ok)
        else:  # as _ternary_mm_fn's epilogue
            v = acc.to(tl.float32)
            if ROUND_BF16:
                u = v.to(tl.uint32, bitcast=True)
                v = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            y = tl.math.div_rn(v, tl.load(ws_ptr + cols, mask=row_ok, other=1.0) * a)
            if ROUND_BF16:
                u = y.to(tl.uint32, bitcast=True)
                y = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            if HAS_BIAS:
                y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
                y += tl.load(b_ptr + cols, mask=row_ok, other=0.0).to(tl.float32)
                if ROUND_BF16:
                    u = y.to(tl.uint32, bitcast=True)
                    y = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=row_ok)


class GemvConfig(NamedTuple):
    """One launch configuration of _gemv_fn. quant_block caps the token tile the scale's max-reduction loads at
    once: 4096 loads a 4096-wide token in one go but holds 32 values per thread of 4 warps, and the registers of
    that peak bound how many programs an SM runs (ptxas, sm_90: 160 registers for 4 rows x 512 bytes on 2 warps,
    56 with quant_block 512)."""

    block_n: int  # packed rows per program (4 output rows each)
    block_k: int  # bytes of K per step
    num_warps: int
    num_stages: int
    acc_2d: bool = False  # per-word partial sums, reduced once at the end
    prefetch: bool = False  # weight tiles loaded one K step ahead, the first before the token's scale
    quant_block: int = 4096


# Decode GEMV candidates. Each is checked against the reference once per device and dtype (gemv_configs), then the
# fastest good one is picked per shape with triton.testing.do_bench (its L2 flush makes the weights come from HBM,
# as in a real decode). Tuned here rather than by triton.autotune: the autotuner's per-call key building costs
# ~10 us of Python on every launch, which a one-token decode cannot hide. On an H200, with the first twelve,
# 4096x14336 ran at 1.22 TB/s of packed weights and 8192x28672 at 2.26 TB/s; the smaller layer has few
# programs per SM (224 of 16 rows for 132 SMs), too few loads in flight. Hence the others (not measured on a
# GPU yet): 4 or 8 rows per program (896 or 448 programs there) with a small quant_block (48-64 registers; a 4096 one:
# 96-164), and the one-step-ahead weight loads.
GEMV_CONFIGS = [GemvConfig(16, 256, 4, 2), GemvConfig(16, 512, 4, 2), GemvConfig(32, 256, 4, 2),
                GemvConfig(32, 512, 8, 2), GemvConfig(8, 512, 2, 2), GemvConfig(8, 1024, 4, 2),
                GemvConfig(16, 1024, 8, 1), GemvConfig(64, 256, 8, 2), GemvConfig(16, 256, 4, 2, acc_2d=True),
                GemvConfig(32, 128, 4, 3, acc_2d=True), GemvConfig(16, 512, 8, 2, acc_2d=True),
                GemvConfig(8, 512, 4, 2, acc_2d=True),
                GemvConfig(4, 512, 2, 2, quant_block=512), GemvConfig(4, 1024, 4, 2, quant_block=1024),
                GemvConfig(4, 256, 2, 3, quant_block=512), GemvConfig(8, 512, 2, 2, quant_block=256),
                GemvConfig(16, 256, 4, 1, prefetch=True), GemvConfig(8, 512, 2, 1, prefetch=True, quant_block=512),
                GemvConfig(4, 1024, 4, 1, prefetch=True, quant_block=1024)]
INTERPRET_GEMV_CONFIG = GemvConfig(16, 64, 4, 1, quant_block=1024)
_GEMV_GOOD: dict = {}  # (device, dtype) -> the configs that gave the reference's bits there
_GEMV_TUNED: dict = {}  # shape and flags -> the fastest good config
GEMV_TIMES: dict = {}  # the same key -> {config: milliseconds} as tuned (scripts/bench_ternary.py reports them)


_SWITCH: list[bool] = []  # POSTTRAIN_TERNARY_GEMV, read once (an environment read costs ~2 us per decode call)


def gemv_applies(x2: torch.Tensor, packed: torch.Tensor) -> bool:
    """One token, weights readable as aligned 32-bit words (K % 4 == 0); POSTTRAIN_TERNARY_GEMV=0, set before the
    first call, turns it off."""
    if not _SWITCH:
        _SWITCH.append(os.environ.get("POSTTRAIN_TERNARY_GEMV", "1") != "0")
    return (_SWITCH[0] and x2.shape[0] == 1 and x2.shape[1] % 4 == 0 and packed.stride(0) % 4 == 0
            and packed.stride(1) == 1 and packed.data_ptr() % 4 == 0)


def gemv_configs(device: torch.device, dtype: torch.dtype) -> list:
    """The candidates that reproduce the reference bit for bit on this device and dtype (checked once, on a
    random layer with a K tail). A candidate that fails to compile or disagrees is dropped; if none is left the
    one-token kernel is off for this process (with a warning) and the two-kernel path (act_quant + tensor-core
    matmul, measured exact on an H200) serves single tokens."""
    key = (torch.device(device), dtype)
    if key not in _GEMV_GOOD:
        if interpreting():  # the interpreter runs the pure-Triton sums, checked by the tests
            _GEMV_GOOD[key] = [INTERPRET_GEMV_CONFIG]
            return _GEMV_GOOD[key]
        g = torch.Generator(device=device).manual_seed(0)
        K, N = 1040, 256  # K: two full 512-byte blocks and a tail
        packed = pack_ternary(torch.randint(-1, 2, (N, K), generator=g, device=device, dtype=torch.int8))
        x = (torch.randn(1, K, generator=g, device=device) * 3).to(dtype)
        ws = torch.full((1,), 37.0, device=device, dtype=dtype)
        scales, expected = ws.float().expand(N).contiguous(), ternary_linear_reference(x, packed, ws)
        good, errors = [], []
        for config in GEMV_CONFIGS:
            try:
                if torch.equal(ternary_gemv(x, packed, scales, out_dtype=dtype, config=config), expected):
                    good.append(config)
                else:
                    errors.append(f"{config}: wrong result")
            except Exception as err:  # noqa: BLE001 - e.g. no dp4a on this GPU, or too many registers
                errors.append(f"{config}: {type(err).__name__}")
        if errors:
            warnings.warn(f"posttrain: one-token ternary kernel configurations dropped on {device} ({dtype}): "
                          f"{'; '.join(errors)[:400]}" + ("" if good else "; using the two-kernel path instead"),
                          stacklevel=2)
        _GEMV_GOOD[key] = good
    return _GEMV_GOOD[key]


def ready_config(x2, packed, out_dtype, bias, col_map, return_acc) -> GemvConfig | None:
    """The config for this call, checking and tuning on first use; None: use the two-kernel path. Nothing that
    synchronizes runs while a CUDA graph is being captured (then an unchecked or untuned case falls back)."""
    key = (x2.device, x2.dtype, out_dtype, packed.shape, col_map is not None, bias is not None, return_acc)
    config = _GEMV_TUNED.get(key)
    if config is not None or interpreting():
        return config or INTERPRET_GEMV_CONFIG
    if x2.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    good = gemv_configs(x2.device, x2.dtype)
    if not good:
        return None
    from triton.testing import do_bench

    y = torch.empty(1, 4 * packed.shape[0], dtype=torch.int32 if return_acc else out_dtype, device=x2.device)
    scales = torch.ones(4 * packed.shape[0], dtype=torch.float32, device=x2.device)

    def seconds(config):
        run = lambda: ternary_gemv(x2, packed, scales, out_dtype=out_dtype, bias=bias, col_map=col_map,  # noqa: E731
                                   return_acc=return_acc, config=config, out=y)
        try:
            return do_bench(run, warmup=5, rep=25)
        except Exception:  # noqa: BLE001 - a candidate that cannot run here is simply not chosen
            return float("inf")

    GEMV_TIMES[key] = times = {config: seconds(config) for config in good}
    _GEMV_TUNED[key] = config = min(good, key=times.get)
    return config


def ternary_gemv(x2, packed, weight_scale, *, out_dtype, config, bias=None, col_map=None, return_acc=False, out=None):
    """y (1, N) for one token x2 (1, K): activation quantization and 2-bit matmul in one launch (see _gemv_fn);
    config: a GemvConfig."""
    if not gemv_applies(x2, packed) or weight_scale.numel() != 4 * packed.shape[0]:
        raise ValueError("ternary_gemv needs one token, K % 4 == 0, 4-byte aligned rows and one scale per column")
    return launch(x2, packed, weight_scale, out_dtype=out_dtype, config=config, bias=bias, col_map=col_map,
                  return_acc=return_acc, out=out)


def launch(x2, packed, weight_scale, *, out_dtype, config, bias=None, col_map=None, return_acc=False, out=None):
    """ternary_gemv without its argument checks, for callers that ran gemv_applies (the per-token decode path)."""
    K, R = x2.shape[1], packed.shape[0]
    interpret = interpreting()
    kernels = _BUILT.get(interpret) or _kernels()
    y = out if out is not None else torch.empty(1, 4 * R, dtype=torch.int32 if return_acc else out_dtype,
                                                device=x2.device)
    base, step = col_map if col_map is not None else (packed, packed)
    flags = {"HAS_MAP": col_map is not None, "HAS_BIAS": bias is not None, "INT_OUT": return_acc,
             "ROUND_BF16": out_dtype == torch.bfloat16, "IS_BF16": x2.dtype == torch.bfloat16,
             "USE_DP4A": not interpret and torch.version.hip is None}  # dp4a: NVIDIA PTX
    extra = {} if interpret else {"enable_fp_fusion": False}  # x * a rounded before the rounding add, as torch
    block_n, block_k, warps, stages, acc_2d, prefetch, quant_block = config  # unpacked: cheaper than attributes
    kernels["gemv"][(cdiv(R, block_n),)](
        x2, packed, weight_scale, bias if bias is not None else weight_scale, y, base, step, R, K, packed.stride(0),
        **flags, BLOCK_N=block_n, BLOCK_K=block_k,
        QUANT_BLOCK=min(max(next_power_of_2(K), 16), quant_block, 1024 if interpret else 4096),
        ACC_2D=acc_2d, PREFETCH=prefetch, num_warps=warps, num_stages=stages, **extra)
    return y
