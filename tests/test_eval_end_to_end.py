# ruff: noqa: F401, F811  -- pytest fixtures are imported from test_eval_fixtures, then requested by name
"""run_eval / run_bench over a base model and a LoRA adapter folder: the files a user gets, and the errors."""

from __future__ import annotations

import json
import re

import pytest
from test_eval_fixtures import one_torch_thread, tiny, tiny_adapter, tiny_data, write_jsonl

from posttrain.errors import PosttrainError
from posttrain.eval import run_bench, run_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def suite_file(tiny, tiny_data):
    path = tiny_data["root"] / "suite.yaml"
    path.write_text(f"""
perplexity: {{data: text.jsonl, context: 32, stride: 16}}
multiple_choice: [{{name: tinymc, data: mc.jsonl, batch_size: 8}}]
generation: [{{name: echo, data: gen.jsonl, max_new_tokens: 4}}]
preference: {{data: pref.jsonl, reference: {tiny["base"]}, beta: 0.1}}
drift: {{base: {tiny["base"]}, data: text.jsonl, context: 32}}
""")
    return path


@pytest.fixture(scope="module")
def evaluated(tiny, tiny_adapter, suite_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    results = run_eval([f"base={tiny['base']}", f"lora={tiny_adapter}"], suite_file, out)
    return out, results


def test_results_json_has_every_variant_and_metric(evaluated):
    out, results = evaluated
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["variants"] == results["variants"]
    base, lora = on_disk["variants"]["base"], on_disk["variants"]["lora"]
    for key in (
        "perplexity/perplexity",
        "perplexity/bits_per_byte",
        "mc/tinymc/acc",
        "mc/tinymc/acc_norm",
        "mc/tinymc/acc_stderr",
        "gen/echo/exact_match",
        "gen/echo/contains",
        "preference/accuracy",
        "preference/margin",
        "drift/kl",
        "drift/top1_agreement",
        "size/disk_bytes",
        "size/params_total",
    ):
        assert key in base and key in lora, key
    assert base["preference/accuracy"] == 0.0 and base["preference/margin"] == 0.0  # base is the reference
    assert base["drift/kl"] == 0.0 and base["drift/top1_agreement"] == 1.0
    assert lora["drift/kl"] > 0 and lora["perplexity/perplexity"] != base["perplexity/perplexity"]
    assert lora["size/params_trainable"] < lora["size/params_total"]
    assert lora["size/disk_bytes"] > base["size/disk_bytes"]  # base weights + the adapter file
    assert on_disk["directions"]["perplexity/perplexity"] is False and on_disk["directions"]["mc/tinymc/acc"] is True
    env = on_disk["environment"]
    assert env["torch"] and env["transformers"] and env["python"] and env["device"]


def test_report_marks_best_per_column(evaluated):
    out, results = evaluated
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| variant"))
    assert "perplexity ↓" in header and "tinymc acc ↑" in header and "drift kl ↓" in header
    lines = report.splitlines()
    table = lines[lines.index(header) + 2 : lines.index(header) + 4]  # the main table's two variant rows
    rows = {line.split("|")[1].strip(): line for line in table}
    assert set(rows) == {"base", "lora"}
    cols = [c.strip() for c in header.split("|")[1:-1]]
    kl_col = cols.index("drift kl ↓")
    assert rows["base"].split("|")[kl_col + 1].strip().startswith("**0**")  # zero drift from itself, the best
    acc_col = cols.index("tinymc acc ↑")
    assert re.fullmatch(r"(\*\*)?[\d.]+(\*\*)? \[[\d.]+, [\d.]+\]", rows["lora"].split("|")[acc_col + 1].strip())
    assert "context 32 tokens, stride 16" in report
    assert "| lora | adapter |" in report and "on base" in report  # the Variants section says what was loaded


def test_plots_are_written(evaluated):
    out, _ = evaluated
    plots = sorted(p.name for p in out.glob("*.png"))
    for name in (
        "plot_perplexity.png",
        "plot_mc.png",
        "plot_drift.png",
        "plot_preference.png",
        "plot_size.png",
        "plot_quality_vs_size.png",
    ):
        assert name in plots
    assert all((out / p).read_bytes()[:8] == PNG_MAGIC for p in plots)
    assert not list(out.glob(".partial-*"))


def test_bench_joins_the_same_report(evaluated, tiny):
    out, _ = evaluated
    results = run_bench([f"base={tiny['base']}"], out, prompt_tokens=8, new_tokens=4, repeats=1, warmup=0, device="cpu")
    base = results["variants"]["base"]
    for key in (
        "bench/prefill_tokens_per_s",
        "bench/decode_tokens_per_s",
        "bench/ttft_seconds",
        "bench/load_seconds",
        "bench/peak_memory_bytes",
    ):
        assert base[key] >= 0, key
    assert "perplexity/perplexity" in base  # eval's numbers are kept
    assert "bench/decode_tokens_per_s" not in results["variants"]["lora"]
    assert "decode_tokens_per_s ↑" in (out / "report.md").read_text()
    assert (out / "plot_bench.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_again_keeps_bench_numbers_and_drops_stale_eval_numbers(tiny, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_bench([f"base={tiny['base']}"], out, prompt_tokens=4, new_tokens=2, repeats=1, warmup=0, device="cpu")
    run_eval([f"base={tiny['base']}"], {"multiple_choice": [{"name": "a", "data": str(tiny_data["mc"])}]}, out)
    run_eval([f"base={tiny['base']}"], {"multiple_choice": [{"name": "b", "data": str(tiny_data["mc"])}]}, out)
    base = json.loads((out / "results.json").read_text())["variants"]["base"]
    assert "bench/decode_tokens_per_s" in base and "mc/b/acc" in base
    assert "mc/a/acc" not in base  # the suite changed: its old task is gone, not left stale


def test_a_crash_leaves_no_complete_looking_report(tiny, suite_file, tmp_path, monkeypatch):
    import posttrain.eval.report as report

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_plots", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_eval(
            [str(tiny["base"])],
            {"perplexity": {"data": str(suite_file.parent / "text.jsonl"), "context": 16, "stride": 16}},
            tmp_path / "out",
        )
    assert not (tmp_path / "out" / "results.json").exists()
    assert not list((tmp_path / "out").glob(".partial-*"))


def test_bad_suite_key_fails_before_loading_models(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("perplexity: {data: x.jsonl, contxt: 8}\n")
    with pytest.raises(PosttrainError, match=r"unknown key 'perplexity.contxt': did you mean 'perplexity.context'\?"):
        run_eval(["/no/such/model"], suite, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_model_path_is_a_user_error(tiny, tmp_path, tiny_data):
    suite = {"perplexity": {"data": str(tiny_data["text"])}}
    with pytest.raises(PosttrainError, match="model path '/no/such/model' does not exist"):
        run_eval(["/no/such/model"], suite, tmp_path / "out")
    with pytest.raises(PosttrainError, match="model path '/no/such/model' does not exist"):
        run_eval([str(tiny["base"]), "/no/such/model"], suite, tmp_path / "out")  # found before evaluating the first
    assert not (tmp_path / "out").exists()


def test_lm_eval_tasks_join_the_table(tiny, tiny_data, tmp_path):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(
        f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tiny_data['mc']}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    suite = {
        "multiple_choice": [{"name": "ours", "data": str(tiny_data["mc"])}],
        "lm_eval": {"tasks": ["local_mc"], "include_path": str(tasks)},
    }
    results = run_eval([f"base={tiny['base']}"], suite, tmp_path / "out")
    base = results["variants"]["base"]
    assert base["lm_eval/local_mc/acc"] == base["mc/ours/acc"]  # the same task scored both ways
    assert "lm_eval/local_mc/acc_stderr" in base
    assert "local_mc acc ↑" in (tmp_path / "out" / "report.md").read_text()


def test_single_question_stderr_is_null_not_nan(tiny, tiny_data, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [json.loads(tiny_data["mc"].read_text().splitlines()[0])])
    run_eval([f"base={tiny['base']}"], {"multiple_choice": [{"name": "one", "data": str(one)}]}, tmp_path / "out")
    text = (tmp_path / "out" / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["variants"]["base"]["mc/one/acc_stderr"] is None


def test_suite_of_tiny_sources_runs_end_to_end(tmp_path):
    """Data from posttrain.data.sources's `tiny:` sources (chat rows as generation tasks, the multiple-choice task, and
    conversational preference pairs) on the offline tiny model, named as a run config names it."""
    suite = tmp_path / "suite.yaml"
    suite.write_text("""
generation: [{name: add, data: {path: tiny:chat, split: test}, max_new_tokens: 4, limit: 12}]
multiple_choice: [{name: add-mc, data: {path: tiny:multiple_choice, split: test}, limit: 12}]
preference: {data: {path: tiny:preference, split: test}, reference: tiny:llama, limit: 12}
""")
    results = run_eval(["base=tiny:llama"], suite, tmp_path / "out")
    base = results["variants"]["base"]
    assert 0.0 <= base["gen/add/exact_match"] <= base["gen/add/contains"] <= 1.0
    assert 0.0 <= base["mc/add-mc/acc"] <= 1.0 and "mc/add-mc/acc_norm" in base
    assert base["preference/accuracy"] == 0.0 and base["preference/margin"] == 0.0  # the reference itself
    report = (tmp_path / "out" / "report.md").read_text()
    assert "gen/add: tiny:chat[test]" in report and "mc/add-mc: tiny:multiple_choice[test]" in report
