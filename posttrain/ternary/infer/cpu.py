"""CPU kernel for packed ternary linears: one C call does activation quantization, the 2-bit matmul and the scale.

Why C and not torch ops: on a small model the cost of a linear layer on a CPU is the per-op overhead (~2-5 us per
torch op here), not arithmetic. BitNet's inference needs ~9 torch ops per layer (absmax, clamp, reciprocal, scale,
round, to int8, matmul, scale product, divide) against one F.linear for a dense layer, so a torch-op ternary model
is slower than its dense twin however the weights are stored: measured on the tiny model here, greedy decode at
~0.7x of dense with the "torch" backend, q/k/v and gate/up sharing one quantization. One ctypes call with a prebuilt
parameter block costs ~2.5 us including the output allocation, less than one dense F.linear on the same layer.

The kernel reads the packed weights directly in transformers' BitNet layout (uint8 (out/4, in), code w + 1, packed
row r holds rows r, R + r, 2R + r, 3R + r in bits 0-1, 2-3, 4-5, 6-7; see pack.py): nothing is unpacked at load, so
a ternary layer keeps 2 bits per weight in memory (1/16 of fp32, 1/8 of bf16). Per packed row it decodes the four
code planes once into a 4 x in scratch buffer and takes one u8 x s8 dot product per token and plane, a loop that
compilers vectorize (AVX2/AVX-512 VNNI, NEON). It is single-threaded: enough to beat a dense fp32 GEMV at decode,
where the dense layer reads 16x more bytes, but large-m prefill of big models is faster through torch's threaded
GEMM (`TernaryLinear(backend="torch")`).

Numerics are BitNet's, as in `kernel.ternary_linear_reference` and bit for bit equal to it (tested):
    t = max(max_k |x_k|, 1e-5); a = (1 / t) * 127 rounded to the activation dtype; q_k = clamp(rne(x_k * a), -128, 127)
    acc_n = sum_k q_k * T_nk (exact int32; rounded to bf16 for bf16 inputs, as BitLinear's bf16 F.linear does)
    y_n = acc_n / (ws_n * a) (+ bias_n)        ws = transformers' weight_scale = 1 / mean|W|
compiled with -ffp-contract=off so that no multiply-add is fused and the float operations are torch's.

The library is compiled on first use with the system C compiler (`CC`, else cc/gcc/clang; about a second) into
POSTTRAIN_CACHE/kernels/ and reused; without a compiler, or with POSTTRAIN_TERNARY_CPU_KERNEL=0, `available()` is
False and TernaryLinear falls back to torch ops (correct, slower on small models).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float load(const void* x, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

/* BitNet per-token absmax quantization of one row; returns a, writes q and sum(q) */
static float quantize_row(const void* x, int bf16, int64_t K, int8_t* q, int32_t* qsum) {
    float t = 0.0f;
    for (int64_t k = 0; k < K; k++) { float v = fabsf(load(x, bf16, k)); t = v > t ? v : t; }
    t = t < 1e-5f ? 1e-5f : t;
    float a = (1.0f / t) * 127.0f;                 /* torch: 127 / t == reciprocal(t) * 127 */
    if (bf16) a = bf16_to_f32(f32_to_bf16(a));
    int32_t s = 0;
    for (int64_t k = 0; k < K; k++) {
        float r = nearbyintf(load(x, bf16, k) * a);
        r = r < -128.0f ? -128.0f : (r > 127.0f ? 127.0f : r);
        q[k] = (int8_t)r;
        s += q[k];
    }
    *qsum = s;
    return a;
}

static int32_t dot_s8u8(const int8_t* q, const uint8_t* c, int64_t K) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; k++) s += (int32_t)q[k] * (int32_t)c[k];
    return s;
}

typedef struct {
    int64_t K, N;
    int32_t bf16;
    const uint8_t* w;   /* packed (N/4, K), contiguous */
    const float* ws;    /* (N,) float32 */
    const void* bias;   /* (N,) in the activation dtype, or NULL */
} pt_plan;

/* y (M, N) = BitNet linear of x (M, K), contiguous; acc_out, if given, gets the int32 accumulators instead */
int pt_ternary_run(const pt_plan* p, const void* x, int64_t M, void* y, int32_t* acc_out) {
    const int64_t K = p->K, N = p->N, R = N / 4;
    const int bf16 = p->bf16;
    int8_t* q = (int8_t*)malloc((size_t)(M * K + 4 * K));
    float* a = (float*)malloc((size_t)(M + 1) * sizeof(float));
    int32_t* qs = (int32_t*)malloc((size_t)(M + 1) * sizeof(int32_t));
    if (!q || !a || !qs) { free(q); free(a); free(qs); return -1; }
    uint8_t* c = (uint8_t*)(q + M * K);
    for (int64_t m = 0; m < M; m++) {
        const void* row = bf16 ? (const void*)((const uint16_t*)x + m * K) : (const void*)((const float*)x + m * K);
        a[m] = quantize_row(row, bf16, K, q + m * K, qs + m);
    }
    for (int64_t r = 0; r < R; r++) {
        const uint8_t* wr = p->w + r * K;
        for (int64_t k = 0; k < K; k++) {
            uint8_t b = wr[k];
            c[k] = b & 3u; c[K + k] = (b >> 2) & 3u; c[2 * K + k] = (b >> 4) & 3u; c[3 * K + k] = b >> 6;
        }
        for (int64_t m = 0; m < M; m++) {
            for (int i = 0; i < 4; i++) {
                int64_t n = i * R + r;
                int32_t acc = dot_s8u8(q + m * K, c + i * K, K) - qs[m];   /* sum q (c - 1) = sum q c - sum q */
                if (acc_out) { acc_out[m * N + n] = acc; continue; }
                float v = (float)acc;
                if (bf16) v = bf16_to_f32(f32_to_bf16(v));
                float out = v / (p->ws[n] * a[m]);
                if (bf16) {
                    uint16_t o = f32_to_bf16(out);
                    if (p->bias) o = f32_to_bf16(bf16_to_f32(o) + bf16_to_f32(((const uint16_t*)p->bias)[n]));
                    ((uint16_t*)y)[m * N + n] = o;
                } else {
                    if (p->bias) out += ((const float*)p->bias)[n];
                    ((float*)y)[m * N + n] = out;
                }
            }
        }
    }
    free(q); free(a); free(qs);
    return 0;
}
"""

_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    from posttrain.tiny import cache_dir

    return cache_dir() / "kernels"


def _compile(cc: str, out: Path) -> None:
    """Compile _SOURCE into `out`, with -march=native when the compiler takes it; atomic (rename at the end)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "ternary.c"
        src.write_text(_SOURCE)
        lib = Path(tmp) / out.name
        errors = []
        for arch in (["-march=native"], []):
            proc = subprocess.run([cc, *_FLAGS, *arch, str(src), "-o", str(lib)], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(lib, out)
                return
            errors.append(proc.stderr[-500:])
        raise RuntimeError(f"{cc} failed: {errors[-1]}")


class _Plan(ctypes.Structure):
    _fields_ = [
        ("K", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("bf16", ctypes.c_int32),
        ("w", ctypes.c_void_p),
        ("ws", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


def _cpu_id() -> str:
    """The machine and its CPU's feature flags: -march=native builds must not be shared across CPU models (a
    cache directory on a shared home would otherwise hand an AVX-512 build to an AVX2 machine)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((ln for ln in lines if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _load() -> ctypes.CDLL | None:
    if os.environ.get("POSTTRAIN_TERNARY_CPU_KERNEL", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    key = hashlib.sha256("\0".join([_SOURCE, cc, *_FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"ternary_cpu_{key}.so"
    try:
        if not path.is_file():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"posttrain ternary CPU kernel unavailable, using torch ops: {err}", stacklevel=3)
        return None
    ptr = ctypes.c_void_p
    lib.pt_ternary_run.argtypes = [ptr, ptr, ctypes.c_int64, ptr, ptr]
    lib.pt_ternary_run.restype = ctypes.c_int
    return lib


def _function():
    if "fn" not in _state:
        with _lock:
            if "fn" not in _state:
                lib = _load()
                _state["lib"] = lib  # keep the library loaded
                _state["fn"] = lib.pt_ternary_run if lib is not None else None
    return _state["fn"]


def available() -> bool:
    """Whether the C kernel is usable here (compiles it on first call)."""
    return _function() is not None


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


class CpuTernaryLinear:
    """A callable bound to one layer's packed weights: y = f(x) for CPU x of `dtype`, with as little Python per
    call as possible (one ctypes call with a prebuilt parameter block, one output allocation)."""

    __slots__ = ("_fn", "_plan", "_plan_ptr", "_keep", "K", "N", "dtype")

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        fn = _function()
        if fn is None:
            raise RuntimeError("the ternary CPU kernel is not available (no C compiler?): use backend='torch'")
        if dtype not in SUPPORTED_DTYPES or packed.device.type != "cpu" or packed.dtype != torch.uint8:
            raise ValueError(f"the ternary CPU kernel takes float32/bfloat16 CPU inputs, got {dtype}, {packed.device}")
        N = packed.shape[0] * 4
        if scales.dtype != torch.float32 or scales.numel() != N:
            raise ValueError(f"the ternary CPU kernel needs float32 scales of shape ({N},), got {tuple(scales.shape)}")
        packed, scales = packed.contiguous(), scales.contiguous()
        bias = None if bias is None else bias.to(dtype).contiguous()
        self._keep = (packed, scales, bias)  # the plan points into these
        self._plan = _Plan(packed.shape[1], N, int(dtype == torch.bfloat16), packed.data_ptr(), scales.data_ptr(),
                           None if bias is None else bias.data_ptr())  # fmt: skip
        self._plan_ptr = ctypes.addressof(self._plan)
        self._fn, self.K, self.N, self.dtype = fn, packed.shape[1], N, dtype

    def __call__(self, x: torch.Tensor, return_acc: bool = False) -> torch.Tensor:
        if x.dtype != self.dtype or not x.is_cpu:
            raise ValueError(f"expected a CPU {self.dtype} input, got {x.dtype} on {x.device}")
        return self.run(x, return_acc)

    def run(self, x: torch.Tensor, return_acc: bool = False) -> torch.Tensor:
        """__call__ for a caller that has checked x.is_cpu and x.dtype is self.dtype."""
        if x.shape[-1] != self.K:  # the kernel reads K values per row: never let a wrong shape through
            raise ValueError(f"expected an input of shape (..., {self.K}), got {tuple(x.shape)}")
        if not x.is_contiguous():
            x = x.contiguous()
        if return_acc:
            y = torch.empty((*x.shape[:-1], self.N), dtype=torch.int32)
            status = self._fn(self._plan_ptr, x.data_ptr(), x.numel() // self.K, None, y.data_ptr())
        else:
            y = x.new_empty((*x.shape[:-1], self.N))  # new_empty: the cheapest allocation call (~2 us here)
            status = self._fn(self._plan_ptr, x.data_ptr(), x.numel() // self.K, y.data_ptr(), None)
        if status != 0:
            raise MemoryError("ternary CPU kernel: out of memory for its scratch buffers")
        return y


def ternary_linear_cpu(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    return_acc: bool = False,
) -> torch.Tensor:
    """BitNet linear of x (..., K) (CPU, float32 or bfloat16) with packed (N/4, K) uint8 weights (one-off call;
    layers keep a `CpuTernaryLinear`). weight_scale: transformers' weight_scale (1 / mean|W|), (1,) or (N,), its
    value as stored (rounded to the model dtype). return_acc=True gives the int32 accumulators sum_k q_k T_nk."""
    scales = weight_scale.float().expand(packed.shape[0] * 4).contiguous()
    return CpuTernaryLinear(packed, scales, bias, x.dtype)(x, return_acc=return_acc)
