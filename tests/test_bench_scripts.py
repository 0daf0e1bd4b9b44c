"""The benchmark scripts' own bookkeeping, where a mistake would only show on a GPU run."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import PosttrainError

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_static_cache_decode_equals_generate():
    """graph_generate (the CUDA-graph decode bench_ternary measures): its warm-up step must not shift the
    StaticCache's write position (transformers >= 5.2x writes at the layer's own counter, not at cache_position):
    run eagerly, the same steps give generate's greedy tokens, for the dense model and with TernaryLinear swapped
    in, for a batch of two prompts too."""
    bench = load_script("bench_ternary")
    from posttrain.ternary import convert, graph_generate, load_fast_ternary

    dense, _ = bench.random_llama(128, 2, 256, 500, torch.float32, "cpu")
    ternary = bench.copy.deepcopy(dense)
    convert(ternary)
    load_fast_ternary(ternary)
    for rows in (1, 2):
        ids = torch.randint(3, 500, (rows, 8), generator=torch.Generator().manual_seed(rows))
        for model in (dense, ternary):
            with torch.no_grad():
                expected = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
            decoded = graph_generate(model, ids, 12)  # on the CPU: the same steps, eagerly
            assert torch.equal(decoded.tokens, expected) and decoded.tokens_per_second() > 0
    with pytest.raises(PosttrainError, match="CUDA"):
        graph_generate(dense, ids, 4, cuda_graph=True)
    with pytest.raises(PosttrainError, match="max_new_tokens"):
        graph_generate(dense, ids, 0)


def test_graph_generate_sliding_window_eager_exact_and_capture_refused():
    """Sliding-window cache layers count positions in a Python int that a CUDA graph would freeze: capture is
    refused with a clear error, and the eager replay (its counter put back after the warm-up) equals generate
    past the window; the model's training flag is restored."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from posttrain.ternary import graph_generate

    cfg = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0)
    model.train()
    assert torch.equal(graph_generate(model, ids, 14, cuda_graph=False).tokens, expected) and model.training
    with pytest.raises(PosttrainError, match="sliding-window"):
        graph_generate(model, ids, 4, cuda_graph=True)


def test_kernel_row_checks_and_times_on_the_cpu():
    """bench_ternary's per-shape row: the kernel is checked against the reference before anything is timed."""
    bench = load_script("bench_ternary")
    row = bench.kernel_row(256, 768, 1, "cpu", torch.float32)
    assert "error" not in row and row["acc_exact"] and row["max_abs_diff"] == 0.0
    assert row["ternary_us"] > 0 and row["dense_us"] > 0 and row["x_vs_dense"] > 0


def test_compare_skips_variants_without_a_rate():
    """bench_train's ratios: a variant that measured no step (None rate) or failed is left out, not a crash."""
    bench = load_script("bench_train")
    row = {"task": "sft", "setup_s": 1.0, "all_steps_s": 2.0, "steps": 4, "held_out_loss": 2.0, "late_train_loss": 2.0}
    results = [{**row, "variant": "posttrain", "tokens_per_s": 300.0},
               {**row, "variant": "trl_defaults", "tokens_per_s": 100.0},
               {**row, "variant": "trl_no_ckpt", "tokens_per_s": None},
               {"task": "sft", "variant": "trl_packed", "error": ["RuntimeError: x"]}]
    ratios = bench.compare(results, "sft")
    assert ratios["tokens_per_s_vs_trl_defaults"] == 3.0
    assert not any("best_trl_tuned" in key for key in ratios)
    assert bench.compare(results[1:], "sft") == {}


def test_compare_takes_the_median_over_rounds_and_reports_the_spread():
    """--rounds: a variant measured several times counts with its median rate; the spread says how much the
    machine drifted (what a single-round ratio cannot show)."""
    bench = load_script("bench_train")
    row = {"task": "sft", "setup_s": 1.0, "all_steps_s": 2.0, "steps": 4, "held_out_loss": 2.0, "late_train_loss": 2.0}
    results = [{**row, "variant": "posttrain_settle", "tokens_per_s": 1.0},  # the throwaway run: never compared
               {**row, "variant": "posttrain", "tokens_per_s": 200.0},
               {**row, "variant": "trl_defaults", "tokens_per_s": 100.0},
               {**row, "variant": "trl_defaults", "tokens_per_s": 100.0},
               {**row, "variant": "posttrain", "tokens_per_s": 400.0},
               {**row, "variant": "posttrain", "tokens_per_s": 300.0}]
    results += [{**row, "variant": "posttrain_compile", "tokens_per_s": 450.0},  # --round-extra: medians too
                {**row, "variant": "posttrain_compile", "tokens_per_s": 150.0},
                {**row, "variant": "posttrain_compile", "tokens_per_s": 600.0},
                {**row, "variant": "posttrain", "tokens_per_s": 9e9, "timing": "wall-clock"}]  # another clock: out
    ratios = bench.compare(results, "sft")
    assert ratios["tokens_per_s_vs_trl_defaults"] == 3.0
    assert ratios["tokens_per_s_round_spread"] == {"posttrain": 2.0, "trl_defaults": 1.0, "posttrain_compile": 4.0}
    assert ratios["tokens_per_s_extra_vs_posttrain"] == {"posttrain_compile": 1.5}  # 450 / 300, settle left out


def test_compare_leaves_out_a_variant_whose_first_round_failed():
    """The set-up time comes from a variant's first round (a cold reference cache for DPO); if that round failed,
    a later round's warm set-up must not stand in for it."""
    bench = load_script("bench_train")
    row = {"task": "sft", "setup_s": 1.0, "all_steps_s": 2.0, "steps": 4, "held_out_loss": 2.0, "late_train_loss": 2.0}
    results = [{"task": "sft", "variant": "posttrain", "error": ["RuntimeError: x"]},
               {**row, "variant": "trl_defaults", "tokens_per_s": 100.0},
               {**row, "variant": "posttrain", "tokens_per_s": 400.0, "setup_s": 0.1}]
    assert bench.compare(results, "sft") == {}


def test_compare_against_the_plain_loop_only_on_the_same_clock():
    """plain_loop (a bare loop over posttrain's rows) always times wall-clock; in CPU lockstep the standard variants
    count step events only, so that ratio would mix two clocks and is left out."""
    bench = load_script("bench_train")
    row = {"task": "sft", "setup_s": 1.0, "all_steps_s": 2.0, "steps": 4, "held_out_loss": 2.0, "late_train_loss": 2.0}
    plain = {**row, "variant": "plain_loop", "tokens_per_s": 500.0, "timing": "wall-clock"}
    for timing, expected in (("wall-clock", 0.6), ("step events (lockstep)", None)):
        results = [{**row, "variant": "posttrain", "tokens_per_s": 300.0, "timing": timing},
                   {**row, "variant": "trl_defaults", "tokens_per_s": 100.0, "timing": timing}, plain]
        assert bench.compare(results, "sft").get("tokens_per_s_posttrain_vs_plain_loop") == expected

def test_plain_loop_trains_every_document_once_in_posttrains_step_size(tmp_path):
    """bench_train's plain_loop baseline: the documents (truncated to max_length as posttrain does) packed into
    rows, as many rows per step as batch 8's tokens fill, each token trained once, and the loss falls."""
    bench = load_script("bench_train")
    import bench_train_explore

    size = {**bench.SIZES["smoke"], "warmup": 1}
    bench.build(tmp_path, size)
    docs = bench.token_ids(tmp_path, "train.jsonl")
    out, model = bench_train_explore.plain_loop(tmp_path, size, docs, 8, bench.tokenizer(tmp_path).pad_token_id)
    assert out["trained_tokens"] == sum(min(len(d), size["max_length"]) for d in docs)
    mean_doc, mean_row = out["trained_tokens"] / len(docs), out["trained_tokens"] / out["rows"]
    assert abs(out["rows_per_step"] * mean_row - 8 * mean_doc) <= mean_row / 2  # batch 8's tokens, to a row
    late = sum(out["losses"][-3:]) / 3  # 7.477 -> 7.435 here (6 steps from random init)
    assert out["steps"] > 2 and out["tokens_per_s"] > 0 and late < out["losses"][0] - 0.01

def test_step_profile_counts_gpu_events_once():
    """StepProfile's GPU time: kernels only, not the CPU ops that launched them nor record_function regions
    mirrored on the GPU; kernels whose names are equal once cut are summed."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    measure = load_script("bench_train_measure")
    event = lambda key, device, us, annotation=False: SimpleNamespace(  # noqa: E731
        key=key, device_type=device, self_device_time_total=us, self_cpu_time_total=0.0 if device else us,
        is_user_annotation=annotation, count=1)
    long = "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast" + "x" * 40
    averages = [event("aten::mm", DeviceType.CPU, 5000.0), event("sm90_gemm", DeviceType.CUDA, 4000.0),
                event("Optimizer.step#AdamW.step", DeviceType.CUDA, 3000.0, annotation=True),
                event(long + "A", DeviceType.CUDA, 9000.0), event(long + "B", DeviceType.CUDA, 1000.0)]
    profile = measure.StepProfile(warmup=0)
    profile.summarize(averages, steps=2)
    assert profile.summary["gpu_kernel_ms_per_step"] == 7.0  # (4000 + 9000 + 1000) us over 2 steps
    assert profile.summary["top_kernels_ms_per_step"][long[:80]] == 5.0
    assert "Optimizer.step#AdamW.step" not in profile.summary["top_kernels_ms_per_step"]


def test_cudagraph_variant_pads_rows_with_a_segment_of_their_own():
    """posttrain_cudagraphs fills every packed row to max_length the way the collator fills short rows: pad tokens
    at positions 0.. with ignored labels, so the documents and the loss are unchanged."""
    explore = load_script("bench_train_explore")
    row = {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]}
    full = explore.pad_row(row, 8, pad_token_id=0)
    assert full["input_ids"] == [5, 6, 7, 8, 9, 0, 0, 0] and full["labels"] == [5, 6, 7, 8, 9, -100, -100, -100]
    assert full["position_ids"] == [0, 1, 2, 0, 1, 0, 1, 2] and explore.pad_row(full, 8, 0) is full


def test_clock_of_a_run_no_longer_than_its_warm_up_measures_nothing():
    """A variant that stops within its warm-up steps reports no rate instead of crashing the bench."""
    from types import SimpleNamespace

    measure = load_script("bench_train_measure")
    clock = measure.Clock(warmup=5)
    callback = clock.callback()
    for step in (1, 2):
        state = SimpleNamespace(global_step=step, max_steps=2, num_input_tokens_seen=100 * step)
        callback.on_step_begin(None, state, None)
        callback.on_step_end(None, state, None)
    result = clock.result(batch=8)
    assert result["tokens_per_s"] is None and result["pairs_per_s"] is None and result["steps"] == 2


def test_gemv_tuning_reports_the_float_output_entry_fastest_first(monkeypatch):
    """bench_ternary reports, per m = 1 shape, what the one-token kernel's tuner measured: the chosen config and
    every good one's time, from the entry of the plain float output (not the self-check's integer one)."""
    bench = load_script("bench_ternary")
    from posttrain.ternary.infer import gemv

    slow, fast = gemv.GEMV_CONFIGS[0], gemv.GEMV_CONFIGS[-1]
    shape = torch.Size([3584, 4096])
    monkeypatch.setattr(gemv, "GEMV_TIMES", {
        ("cuda", torch.bfloat16, torch.int32, shape, False, False, True): {slow: 0.001},  # integer output
        ("cuda", torch.bfloat16, torch.bfloat16, shape, False, False, False): {slow: 0.0152, fast: 0.0101}})
    tuning = bench.gemv_tuning(4096, 14336)
    assert tuning["gemv_config"] == fast._asdict()
    assert tuning["gemv_tuning_us"] == [[list(fast), 10.1], [list(slow), 15.2]]
    assert bench.gemv_tuning(2560, 6912) == {}


def test_bench_ternary_kd_times_both_variants_in_one_run(capsys, tmp_path):
    """bench_ternary_kd: plain and distilling QAT on the tiny model, one JSON line each and the teacher's cost."""
    bench = load_script("bench_ternary_kd")
    result = bench.main(["--steps", "3", "--out", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"')]
    rows = [json.loads(line) for line in lines]
    assert [row.get("variant") for row in rows] == ["plain", "distill", None] and rows[-1] == result
    assert all(row["steps"] == 3 and row["steps_per_s"] > 0 for row in rows[:2])
    assert result["kd_time_ratio"] == round(result["plain_steps_per_s"] / result["distill_steps_per_s"], 3)
    assert (tmp_path / "kd" / "metrics.json").is_file() and "distill" in (tmp_path / "kd" / "metrics.json").read_text()
    assert "distill" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())


def test_bench_grpo_times_posttrain_and_trl_in_one_run(capsys, tmp_path, tiny_model_dir):
    """bench_grpo: posttrain's recipe and TRL's GRPOTrainer from the same model and settings, both orders, one JSON
    line each, the split of the time, and the same rewards (the same draws from the same RNG state)."""
    bench = load_script("bench_grpo")
    result = bench.main(["--model", str(tiny_model_dir), "--steps", "10", "--rounds", "2", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"')]
    assert [row.get("side") for row in rows] == ["posttrain", "trl", "trl", "posttrain", None] and rows[-1] == result
    for row in rows[:4]:
        assert row["steps"] == 10 and row["steps_per_s"] > 0 and row["completion_tokens_per_s"] > 0
        assert row["sampling_s"] > 0 and row["update_s"] > 0
        assert row["sampling_s"] + row["batch_making_s"] + row["update_s"] == pytest.approx(row["train_s"], abs=0.01)
    assert result["posttrain_reward_last10"] == result["trl_reward_last10"] is not None
    assert result["speedup"] == round(result["posttrain_steps_per_s"] / result["trl_steps_per_s"], 3)
    assert (tmp_path / "posttrain" / "metrics.json").is_file()
