"""Efficiency of a loaded variant: size on disk, bits per weight, memory, and prefill/decode speed.

Definitions (docs/EVAL.md has the long form):
- params_total: logical weights (a packed 2-bit BitNet weight counts as its unpacked out x in values);
  params_trainable: the adapter's parameters for a PEFT variant, every parameter otherwise.
- disk_bytes: the safetensors files needed to run the variant (an adapter's = base files + adapter file).
- bits_per_weight = disk_bytes * 8 / params_total (everything on disk, embeddings and scales included).
- linear_bits_per_weight: the stored bits of the transformer blocks' linear layers (their weight plus any
  weight_scale tensor, read from the safetensors headers) / their logical weights. Embeddings and the LM head
  are excluded because low-bit methods keep them in high precision. Not reported for adapters.
- load_seconds and peak_memory_bytes are measured on a second load of the model, after an untimed one and
  after freed memory is handed back to the OS (bench_variant says why): they do not depend on the order the
  models are listed in.
- peak_memory_bytes: CUDA max_memory_allocated on GPU; on CPU, the process's peak RSS (VmHWM, reset before
  loading) minus the RSS before loading. Both cover loading plus the speed runs.
- prefill_tokens_per_s = prompt_tokens / median prefill time; ttft_seconds = median time from the prompt's
  forward to the first greedy token; decode_tokens_per_s = new_tokens / median time of new_tokens cached
  single-token greedy steps. Batch 1, `warmup` untimed runs first, then the median of `repeats`.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import time
from pathlib import Path

import torch

from posttrain.errors import PosttrainError
from posttrain.eval.kv_cache import cache_kwargs, output_cache
from posttrain.eval.tokenization import model_max_length
from posttrain.eval.variants import count_parameters, load_variant, pick_device

_DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
}


def size_metrics(variant) -> dict[str, float]:
    params = count_parameters(variant.model)
    disk = sum(Path(f).stat().st_size for f in variant.weight_files)
    out = {"params_total": params, "params_trainable": variant.trainable_params}
    if disk:
        out.update(disk_bytes=disk, bits_per_weight=disk * 8 / params)
    if variant.kind != "adapter" and variant.weight_files:
        linear = linear_bits_per_weight(variant.model, variant.weight_files)
        if linear is not None:
            out["linear_bits_per_weight"] = linear
    return {k: v for k, v in out.items() if v is not None}


def linear_bits_per_weight(model, files: list[Path]) -> float | None:
    from safetensors import safe_open

    stored = {}  # tensor name -> bits on disk
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                stored[name] = _DTYPE_BITS.get(sl.get_dtype(), 32) * _numel(sl.get_shape())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    bits = weights = 0
    for name, module in model.named_modules():
        if module is head or not (hasattr(module, "in_features") and hasattr(module, "out_features")):
            continue
        if f"{name}.weight" in stored:
            bits += stored[f"{name}.weight"] + stored.get(f"{name}.weight_scale", 0)
            weights += module.in_features * module.out_features
    return bits / weights if weights else None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bench_variant(spec: str, name: str, device: str, dtype: str, prompt_tokens: int, new_tokens: int,
                  repeats: int, warmup: int):
    """Load one MODEL spec and measure it: (variant, {load_seconds, peak_memory_bytes, speed metrics}).

    The model is loaded and run once untimed first, then freed. A process pays one-time costs on its first
    load of a kind of model: imports (transformers' modeling module, peft, the BitNet integration), torch and
    CUDA start-up, the allocator's first arenas, the first read of the files. Measured directly, they land on
    whichever model is listed first (seconds and hundreds of MB against a tiny model's milliseconds and KB),
    so each model's figures would depend on the argument order. The throwaway load pays whatever this model
    needs, whatever ran before it, so the measured load is the model's own cost. A fresh process per model
    would instead charge the imports to every model, a constant that swamps small models' differences.
    """
    dev = pick_device(device)
    throwaway = load_variant(spec, device, dtype, name=name)
    speed_metrics(throwaway.model, len(throwaway.tokenizer), prompt_tokens, new_tokens, repeats=1, warmup=0)
    del throwaway
    release_memory(dev)
    with PeakMemory(dev) as peak:
        variant = load_variant(spec, device, dtype, name=name)
        speed = speed_metrics(variant.model, len(variant.tokenizer), prompt_tokens, new_tokens, repeats, warmup)
    return variant, {"load_seconds": variant.load_seconds, "peak_memory_bytes": peak.peak_bytes(), **speed}


def release_memory(device: torch.device) -> None:
    """Free the models no longer referenced and hand their memory back, so the next peak starts from it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    try:
        # glibc keeps freed heap pages mapped: a load reusing them raises no RSS, so its peak would read too low.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): the RSS peak is then a lower bound


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the process's RSS high-water mark on Linux CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.hwm_reset = _reset_rss_peak()
            self.start = _proc_status_kib("VmRSS") * 1024 if self.hwm_reset else _ru_maxrss_bytes()
        return self

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.start
        peak = _proc_status_kib("VmHWM") * 1024 if self.hwm_reset else _ru_maxrss_bytes()
        return max(0, peak - self.start)

    def __exit__(self, *exc):
        return False


def _reset_rss_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each variant gets its own peak, not the process's.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_kib("VmHWM") > 0
    except OSError:
        return False


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _ru_maxrss_bytes() -> int:
    # Fallback (macOS, no /proc): the process-lifetime peak, so later variants may read 0 growth.
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def speed_metrics(
    model, vocab_size: int, prompt_tokens: int, new_tokens: int, repeats: int, warmup: int, seed: int = 0
) -> dict[str, float]:
    device = next(model.parameters()).device
    if prompt_tokens + new_tokens > model_max_length(model):
        raise PosttrainError(
            f"bench: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
            f"{model_max_length(model)} positions; lower them"
        )
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), generator=gen).to(device)
    prefill, ttft, decode = [], [], []
    with torch.inference_mode():
        for run in range(warmup + repeats):
            timings = _one_run(model, prompt, new_tokens, device)
            if run >= warmup:
                prefill.append(timings[0])
                ttft.append(timings[1])
                decode.append(timings[2])
    return {
        "prefill_tokens_per_s": prompt_tokens / statistics.median(prefill),
        "ttft_seconds": statistics.median(ttft),
        "decode_tokens_per_s": new_tokens / statistics.median(decode),
    }


def _one_run(model, prompt, new_tokens: int, device) -> tuple[float, float, float]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    sync()
    t1 = time.perf_counter()
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    token.item()  # the first token exists on the host: TTFT ends here
    t2 = time.perf_counter()
    cache = output_cache(out)
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    token.item()
    sync()
    return t1 - t0, t2 - t0, time.perf_counter() - t2
