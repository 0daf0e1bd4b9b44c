"""Ternary inference speed: posttrain's packed 2-bit kernels vs a dense linear vs transformers' BitLinear, per layer
and end to end (greedy decode).

    python scripts/bench_ternary.py                   # CUDA: Triton kernel table + 1B-shaped Llama decode (minutes)
    python scripts/bench_ternary.py --device cpu      # CPU: C kernel table (small shapes) + tiny-model decode

Kernel table, per (in x out, m): the ternary layer (activation quantization + 2-bit matmul + scale; CUDA: Triton,
CPU: the C kernel), on CUDA the Triton matmul alone ("tern mm") / on the CPU the torch fallback backend ("torch
fb"), the dense layer as users run it (bf16 F.linear on CUDA, fp32 on CPU), transformers' BitLinear on the same
packed weights (on CUDA torch.compile'd as shipped, on the CPU eager), and the ratios; on CUDA also the same calls
captured in a CUDA graph ("graph" columns: GPU time without Python launch overhead, as a served decode runs; the
eager columns include Triton's and torch's per-call Python cost, tens of microseconds). Each row first checks the
kernel against the pure-torch reference (integer accumulators equal, float outputs max |diff|); a failing row
prints its error and the run goes on. CUDA times are CUDA-event means with warm-up, cycling through enough weight
copies (>= 256 MB) that the weights come from HBM as in a real decode, not from L2 (BitLinear: one copy).

End to end, the same random weights dense vs with TernaryLinear, built in memory (convert -> TernaryLinear, no hub):
  CUDA: a Llama of hidden 2048, 16 layers, intermediate 8192 in bf16; greedy `generate` decode rate (extra tokens /
        extra time between a 1-token and an N-token generate: prefill excluded), then a StaticCache decode replayed
        as a CUDA graph (no Python or launch overhead: what the kernels give once launch cost is gone).
  CPU:  the offline tiny model (posttrain.tiny, fp32 eager, as users run it) against its export_bitnet checkpoint
        loaded by load_fast_ternary, alternating the two over --rounds rounds (medians, bests, median per-round
        ratio), by generate and by a bare forward loop; then a mid-sized random Llama (--cpu-mid) whose linear
        layers dominate. torch runs with --threads (default 1 on the CPU, see --help).
Results: a table on stdout, JSON at $OUT/bench_ternary.json when OUT is set (or --json PATH).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from posttrain.ternary import (  # noqa: E402
    TernaryLinear,
    bitnet_weight_scale,
    convert,
    export_bitnet,
    graph_generate,
    load_fast_ternary,
    pack_ternary,
    ternary_linear_reference,
    unpack_ternary,
)
from posttrain.ternary.infer import cpu as cpu_kernel  # noqa: E402
from posttrain.ternary.infer import kernel  # noqa: E402
from posttrain.ternary.infer.linear import _torch_linear  # noqa: E402

GPU_SHAPES = [(2560, 6912), (6912, 2560), (4096, 14336), (14336, 4096), (8192, 28672)]
CPU_SHAPES = [(256, 768), (768, 256), (1024, 2816), (2816, 1024), (2048, 8192)]
ROTATE_BYTES = 256 * 2**20


def cuda_time(fns: list, warmup: int = 5, reps: int = 40) -> float:
    """Mean seconds per call, cycling through fns (one per weight copy), CUDA events around the whole loop."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            fns[i % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def graph_time(fns: list, reps: int = 48) -> float:
    """Mean seconds per call with launch overhead removed: `reps` calls (cycling through fns) captured in one CUDA
    graph, replayed; the GPU time a decode step gets when it runs as a graph (vLLM, SGLang, torch.compile)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (lazy initialization)
        for fn in fns[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(times)


def cpu_time(fns: list, budget_s: float = 0.4, max_reps: int = 2000) -> float:
    """Median seconds per call on the CPU (perf_counter), within a time budget."""
    fns[0]()
    times, t_end = [], time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() < t_end):
        fn = fns[len(times) % len(fns)]
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copies(nbytes: int, device: str) -> int:
    return 1 if device == "cpu" else max(1, min(64, math.ceil(ROTATE_BYTES / nbytes)))


def hf_bitlinear(packed: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype):
    from transformers.integrations.bitnet import BitLinear

    layer = BitLinear(packed.shape[1], packed.shape[0] * 4, bias=False, device=packed.device, dtype=dtype)
    layer.weight.copy_(packed)
    layer.weight_scale.copy_(ws)
    return layer


def check_row(x, packed, ws, scales, device) -> dict:
    """Kernel vs the pure-torch reference on this shape: integer accumulators and float outputs."""
    if device == "cpu":
        layer = cpu_kernel.CpuTernaryLinear(packed, scales, None, x.dtype)
        acc, y = layer(x, return_acc=True), layer(x)
    else:
        acc = kernel.ternary_linear_triton(x, packed, scales, return_acc=True)
        y = kernel.ternary_linear_triton(x, packed, scales)
    ref_acc = ternary_linear_reference(x, packed, ws, return_acc=True)
    ref = ternary_linear_reference(x, packed, ws)
    return {"acc_exact": bool(torch.equal(acc, ref_acc)), "max_abs_diff": (y.float() - ref.float()).abs().max().item()}


def layer_fns(K: int, N: int, m: int, device: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """Callables per method (one per rotated weight copy) and the check of the first copy."""
    g = torch.Generator(device=device).manual_seed(K * 7 + N)  # generated where it runs (GBs on a GPU)
    x = torch.randn(m, K, generator=g, device=device).to(dtype)
    second = "torch_fallback" if device == "cpu" else "ternary_mm"
    packs, fns = [], {"ternary": [], second: [], "dense": [], "hf_bitlinear": []}
    for _ in range(copies(N * K // 4, device)):
        packs.append(pack_ternary(torch.randint(-1, 2, (N, K), generator=g, device=device, dtype=torch.int8)))
    ws = bitnet_weight_scale(torch.tensor(0.02), dtype).to(device)
    scales = ws.float().expand(N).contiguous()
    check = check_row(x, packs[0], ws, scales, device)
    if device != "cpu":
        q, a, s = kernel.act_quant(x)
    for packed in packs:
        if device == "cpu":
            layer = cpu_kernel.CpuTernaryLinear(packed, scales, None, dtype)
            fns["ternary"].append(lambda f=layer: f(x))
            codes = unpack_ternary(packed)  # the torch backend's int8 codes + torch._int_mm
            fns[second].append(lambda c=codes: _torch_linear(x, c, scales, None))
        else:
            fns["ternary"].append(lambda p=packed: kernel.ternary_linear_triton(x, p, scales))
            fns[second].append(lambda p=packed: kernel.ternary_matmul(q, a, s, p, scales, out_dtype=dtype))
    # one BitLinear only: its torch.compile'd methods would recompile for every module instance
    fns["hf_bitlinear"].append(hf_bitlinear(packs[0], ws, dtype))
    for _ in range(copies(N * K * dtype.itemsize, device)):
        w = (torch.randn(N, K, generator=g, device=device) * 0.02).to(dtype)
        fns["dense"].append(lambda w=w: F.linear(x, w))
    fns["hf_bitlinear"] = [lambda layer=layer: layer(x) for layer in fns["hf_bitlinear"]]
    return fns, check


def gemv_tuning(K: int, N: int) -> dict:
    """What the one-token kernel's tuner measured on this shape (float output, no bias): the config it chose and
    every good candidate's time, fastest first (do_bench, weights from HBM)."""
    from posttrain.ternary.infer import gemv

    for key, times in gemv.GEMV_TIMES.items():
        if key[3] == (N // 4, K) and not key[4] and not key[5] and not key[6]:  # no col map, no bias, not integer
            order = sorted(times, key=times.get)
            return {"gemv_config": order[0]._asdict(),
                    "gemv_tuning_us": [[list(config), round(times[config] * 1e3, 2)] for config in order]}
    return {}


def kernel_row(K: int, N: int, m: int, device: str, dtype: torch.dtype) -> dict:
    row = {"in": K, "out": N, "m": m}
    try:
        fns, check = layer_fns(K, N, m, device, dtype)
        row.update(check)
        timer = cpu_time if device == "cpu" else cuda_time
        with torch.no_grad():
            for name in [k for k in fns if k != "hf_bitlinear"]:
                row[f"{name}_us"] = timer(fns[name]) * 1e6
            try:
                if device == "cpu":  # transformers' helpers are torch.compile'd: ~10 s per shape on a CPU
                    with torch.compiler.set_stance("force_eager"):
                        row["hf_bitlinear_us"] = timer(fns["hf_bitlinear"]) * 1e6
                else:
                    row["hf_bitlinear_us"] = timer(fns["hf_bitlinear"], warmup=3, reps=10) * 1e6
            except Exception as err:  # noqa: BLE001 - one failing baseline must not stop the table
                row["hf_bitlinear_error"] = repr(err)[:200]
        if device != "cpu":  # the same calls inside CUDA graphs: GPU time without Python launch overhead
            with torch.no_grad():
                for name in fns:
                    try:
                        row[f"{name}_graph_us"] = graph_time(fns[name]) * 1e6
                    except Exception as err:  # noqa: BLE001 - e.g. a baseline that cannot be captured
                        row[f"{name}_graph_error"] = repr(err)[:200]
            if "dense_graph_us" in row and "ternary_graph_us" in row:
                row["graph_x_vs_dense"] = row["dense_graph_us"] / row["ternary_graph_us"]
            if "hf_bitlinear_graph_us" in row and "ternary_graph_us" in row:
                row["graph_x_vs_hf_bitlinear"] = row["hf_bitlinear_graph_us"] / row["ternary_graph_us"]
            if "ternary_graph_us" in row:  # packed bytes over the whole layer's GPU time
                row["graph_GBps"] = N * K / 4 / (row["ternary_graph_us"] * 1e-6) / 1e9
            if m == 1:
                row.update(gemv_tuning(K, N))
                print(f"  one-token kernel on {K}x{N}: {row.get('gemv_config')}", flush=True)
        row["x_vs_dense"] = row["dense_us"] / row["ternary_us"]
        if "hf_bitlinear_us" in row:
            row["x_vs_hf_bitlinear"] = row["hf_bitlinear_us"] / row["ternary_us"]
        if "ternary_mm_us" in row:  # packed bytes over the matmul's time
            row["mm_GBps"] = N * K / 4 / (row["ternary_mm_us"] * 1e-6) / 1e9
    except Exception as err:  # noqa: BLE001
        row["error"] = repr(err)[:300]
        traceback.print_exc()
    print_row(row, device)
    return row


def print_header(device: str) -> None:
    dense = "fp32" if device == "cpu" else "bf16"
    mm = "torch fb" if device == "cpu" else "tern mm"
    graph = "" if device == "cpu" else "  | graph: tern us bf16 us BitLin us x dense x BitLin  GB/s"
    print(
        f"\n{'in x out':>13} {'m':>4} {'ternary us':>11} {mm + ' us':>11} {dense + ' us':>10} {'BitLinear us':>13} "
        f"{'x dense':>8} {'x BitLin':>9} {'mm GB/s':>8}{graph}  check",
        flush=True,
    )


def print_row(row: dict, device: str) -> None:
    def f(key, fmt="{:.1f}"):
        return fmt.format(row[key]) if key in row else "-"

    shape = f"{row['in']}x{row['out']}"
    if "error" in row:
        print(f"{shape:>13} {row['m']:>4}  ERROR {row['error']}", flush=True)
        return
    check = f"acc {'exact' if row['acc_exact'] else 'MISMATCH'}, max|dy| {row['max_abs_diff']:.2g}"
    second = "torch_fallback_us" if device == "cpu" else "ternary_mm_us"
    graph = "" if device == "cpu" else (
        f"  | {f('ternary_graph_us'):>11} {f('dense_graph_us'):>7} {f('hf_bitlinear_graph_us'):>9} "
        f"{f('graph_x_vs_dense', '{:.2f}'):>7} {f('graph_x_vs_hf_bitlinear', '{:.2f}'):>8} "
        f"{f('graph_GBps', '{:.0f}'):>5}")
    print(
        f"{shape:>13} {row['m']:>4} {f('ternary_us'):>11} {f(second):>11} {f('dense_us'):>10} "
        f"{f('hf_bitlinear_us'):>13} {f('x_vs_dense', '{:.2f}'):>8} {f('x_vs_hf_bitlinear', '{:.2f}'):>9} "
        f"{f('mm_GBps', '{:.0f}'):>8}{graph}  {check}",
        flush=True,
    )


def timed_generate(model, ids, new_tokens: int) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if ids.is_cuda:
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t


def e2e_gpu(args) -> dict:
    """Decode tokens/s of a 1B-shaped random Llama: bf16 dense vs TernaryLinear (same weights, ternarized)."""
    dense, cfg = random_llama(args.hidden, args.layers, args.intermediate, 32000, torch.bfloat16, "cuda")
    ternary = copy.deepcopy(dense)
    convert(ternary)
    ids = torch.randint(3, 32000, (1, args.prompt), device="cuda")
    with torch.no_grad():
        qat_logits = ternary(ids).logits.float()  # posttrain's BitLinear: transformers' BitLinear math
        load_fast_ternary(ternary)
        diff = (ternary(ids).logits.float() - qat_logits).abs().max().item()
    result = {"config": cfg.to_dict() | {"dtype": "bfloat16"}, "ternary_vs_bitlinear_max_logit_diff": diff}
    for name, model in (("dense_bf16", dense), ("ternary", ternary)):
        timed_generate(model, ids, 8)  # warm-up (and the autotuner, for the ternary kernels)
        short = statistics.median(timed_generate(model, ids, 1) for _ in range(3))
        long = statistics.median(timed_generate(model, ids, args.new_tokens) for _ in range(3))
        result[f"{name}_decode_tok_s"] = (args.new_tokens - 1) / (long - short)
        result[f"{name}_generate_s"] = long
    result["ternary_vs_dense"] = result["ternary_decode_tok_s"] / result["dense_bf16_decode_tok_s"]
    for name, model in (("dense_bf16", dense), ("ternary", ternary)):  # launch overhead removed: CUDA graphs
        try:
            with torch.no_grad():
                expected = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
            rates = []
            for _ in range(3):
                decoded = graph_generate(model, ids, args.new_tokens)  # the library's path, as users call it
                rates.append(decoded.tokens_per_second())
                tokens = decoded.tokens
            result[f"{name}_graph_decode_tok_s"] = statistics.median(rates)
            result[f"{name}_graph_tokens_match_generate"] = bool(torch.equal(tokens[:, : expected.shape[1]], expected))
        except Exception as err:  # noqa: BLE001 - capture may fail on another transformers version
            result[f"{name}_graph_error"] = repr(err)[:300]
            traceback.print_exc()
    if "ternary_graph_decode_tok_s" in result and "dense_bf16_graph_decode_tok_s" in result:
        result["graph_ternary_vs_dense"] = (
            result["ternary_graph_decode_tok_s"] / result["dense_bf16_graph_decode_tok_s"]
        )
    return result


def tiny_models(tmp: str):
    """The tiny model dense (fp32, as users run it), its export_bitnet, and that export via load_fast_ternary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.tiny import resolve_tiny_model

    path = resolve_tiny_model("tiny:llama")
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    qat = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    convert(qat)
    folder = export_bitnet(qat, tok, Path(tmp) / "tiny-bitnet")
    with torch.compiler.set_stance("force_eager"):
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    return tok, dense, hf, load_fast_ternary(folder)


def timed_decode_loop(model, ids, new_tokens: int) -> float:
    """Seconds for new_tokens greedy steps of the bare model forward with a KV cache (no generate bookkeeping)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values: renamed in newer transformers
        out = model(ids, use_cache=True)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - t


def alternate(models: dict, fn, rounds: int, new_tokens: int) -> dict:
    """tokens/s per model over alternating rounds: medians, bests, per-round ratios of the second to the first."""
    rates = {k: [] for k in models}
    for r in range(rounds):
        for name in list(models)[:: 1 if r % 2 == 0 else -1]:  # alternate who goes first
            rates[name].append(new_tokens / fn(models[name]))
    (a, ra), (b, rb) = rates.items()
    paired = [y / x for x, y in zip(ra, rb)]
    return {
        f"{a}_tok_s_median": statistics.median(ra),
        f"{b}_tok_s_median": statistics.median(rb),
        f"{a}_tok_s_best": max(ra),
        f"{b}_tok_s_best": max(rb),
        "ratio_of_medians": statistics.median(rb) / statistics.median(ra),
        "ratio_of_bests": max(rb) / max(ra),
        "median_paired_ratio": statistics.median(paired),
        f"rounds_{b}_faster": sum(p >= 1 for p in paired),
        "tok_s": rates,
    }


def random_llama(hidden: int, layers: int, intermediate: int, vocab: int, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs (a 1B model initializes slowly on the CPU)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), cfg


def e2e_cpu_mid(args) -> dict:
    """A mid-sized random Llama on this CPU, where the linear layers dominate: dense fp32 vs TernaryLinear."""
    hidden, layers, intermediate = (int(v) for v in args.cpu_mid.split(","))
    dense, cfg = random_llama(hidden, layers, intermediate, 4096, torch.float32, "cpu")
    ternary = copy.deepcopy(dense)
    convert(ternary)
    load_fast_ternary(ternary)  # posttrain BitLinear -> TernaryLinear, packed in memory
    ids = torch.randint(3, 4096, (1, 16))
    n = 32
    for model in (dense, ternary):
        timed_generate(model, ids, 4)
    result = alternate({"dense_fp32": dense, "ternary": ternary}, lambda m: timed_generate(m, ids, n), 5, n)
    return {"hidden": hidden, "layers": layers, "intermediate": intermediate, "vocab": 4096, "new_tokens": n} | result


def e2e_cpu(args) -> dict:
    """Tiny model decode on this CPU: dense fp32 vs ternary (C kernel), alternating, same prompt, greedy."""
    with tempfile.TemporaryDirectory() as tmp:
        tok, dense, hf, ternary = tiny_models(tmp)
        ids = tok("What is 12 + 7?", return_tensors="pt").input_ids
        n = args.new_tokens
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
            same = torch.equal(ternary.generate(ids, **kw), hf.generate(ids, **kw))
        bound = [m._cpu is not None for m in ternary.modules() if isinstance(m, TernaryLinear)]
        models = {"dense_fp32": dense, "ternary": ternary}
        for model in models.values():  # warm-up
            timed_generate(model, ids, n)
        generate = alternate(models, lambda m: timed_generate(m, ids, n), args.rounds, n)
        forward = alternate(models, lambda m: timed_decode_loop(m, ids, n), args.rounds, n)
    result = {
        "threads": torch.get_num_threads(),
        "new_tokens": n,
        "rounds": args.rounds,
        "greedy_equal_to_transformers_bitnet": same,
        "ternary_uses_c_kernel": all(bound),
        "tiny_generate": generate,
        "tiny_forward_loop": forward,
    }
    if args.cpu_mid:
        result["mid_model_generate"] = e2e_cpu_mid(args)
    return result


def tiny_layers_cpu() -> list[dict]:
    """Module call time of the tiny model's layer shapes (m = 1): nn.Linear fp32 vs TernaryLinear (C kernel)."""
    from posttrain.ternary import BitLinear

    rows = []
    for K, N in ((64, 64), (64, 32), (64, 192), (192, 64)):
        torch.manual_seed(0)
        dense = torch.nn.Linear(K, N, bias=False)
        tern = TernaryLinear.from_qat(BitLinear(K, N, bias=False))
        x = torch.randn(1, 1, K)
        with torch.no_grad():
            d = cpu_time([lambda layer=dense, x=x: layer(x)], 0.5)
            t = cpu_time([lambda layer=tern, x=x: layer(x)], 0.5)
        rows.append({"in": K, "out": N, "nn_linear_us": d * 1e6, "ternary_linear_us": t * 1e6, "ratio": d / t})
        print(f"  {K:>4}x{N:<4} nn.Linear {d * 1e6:6.2f} us   TernaryLinear {t * 1e6:6.2f} us   x{d / t:.2f}")
    return rows


def print_e2e(e2e: dict) -> None:
    print("\nend to end:")
    for key, value in e2e.items():
        if key == "config":
            continue
        if isinstance(value, dict):
            value = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in value.items() if k != "tok_s"}
        print(f"  {key}: {value}", flush=True)


def environment(device: str) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    env["triton"] = kernel.import_triton()[0].__version__ if kernel.triton_available() else None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["threads"] = torch.get_num_threads()
        env["c_kernel"] = cpu_kernel.available()
    return env


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ms", default="1,16", help="token counts of the kernel table (add e.g. 512 for prefill)")
    p.add_argument("--shapes", default=None, help="in x out list, e.g. 2560x6912,8192x28672 (default per device)")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (cuda), 48 (cpu)")
    p.add_argument("--rounds", type=int, default=31, help="cpu end to end: alternating rounds")
    p.add_argument("--cpu-mid", default="1024,8,2816", help="cpu: hidden,layers,intermediate of a mid model ('' skips)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (cpu default 1: the C kernel is single-threaded, the tiny model's ops gain nothing from "
        "threads, and torch's OpenMP threads stall on a shared machine; 0 keeps torch's default)",
    )
    p.add_argument("--json", default=None, help="output file (default $OUT/bench_ternary.json when OUT is set)")
    args = p.parse_args()
    args.new_tokens = args.new_tokens or (64 if args.device == "cuda" else 48)
    return args


def main() -> None:
    args = parse_args()
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    device = args.device
    if device == "cuda":  # transformers' BitLinear recompiles per shape: keep it compiled for every row
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
    results = {"env": environment(device), "kernels": [], "e2e": None}
    print(json.dumps(results["env"]), flush=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if not args.skip_kernels:
        print_header(device)
        for K, N in shapes:
            for m in (int(v) for v in args.ms.split(",")):
                results["kernels"].append(kernel_row(K, N, m, device, dtype))
    if not args.skip_e2e:
        try:
            if device == "cpu":
                print("\ntiny-model layers, module call, m = 1:", flush=True)
                results["tiny_layers"] = tiny_layers_cpu()
            results["e2e"] = e2e_gpu(args) if device == "cuda" else e2e_cpu(args)
            print_e2e(results["e2e"])
        except Exception as err:  # noqa: BLE001
            results["e2e"] = {"error": repr(err)[:500]}
            traceback.print_exc()
    out = args.json or (os.path.join(os.environ["OUT"], "bench_ternary.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
