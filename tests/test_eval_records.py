# ruff: noqa: F401, F811  -- pytest fixtures are imported from test_eval_fixtures, then requested by name
"""Per-item records (samples/<variant>/<task>.jsonl), the statistics built on them, the baseline, and the bad
inputs that must fail with one line before anything is written."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
from test_eval_fixtures import one_torch_thread, tiny, tiny_data, write_jsonl

from posttrain.cli import main
from posttrain.errors import PosttrainError
from posttrain.eval import load_suite, load_variant, run_bench, run_eval
from posttrain.eval.stats import mcnemar_exact

TASKS = {"perplexity", "mc-qa", "gen-echo", "preference", "drift"}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def gen_file(tiny, tiny_data, tmp_path_factory):
    """Generation rows whose answer is the base model's own greedy output on every other prompt, so the base
    gets those right and a different model most likely gets them wrong: flips to check."""
    out = tmp_path_factory.mktemp("probe")
    task = {"name": "g", "data": str(tiny_data["gen"]), "max_new_tokens": 4}  # as the suite below
    run_eval([f"base={tiny['base']}"], {"generation": [task]}, out)
    probe = read_jsonl(out / "samples" / "base" / "gen-g.jsonl")
    prompts = [json.loads(line)["prompt"] for line in tiny_data["gen"].read_text().splitlines()]
    answers = [r["output"] if i % 2 == 0 else "cat" for i, r in enumerate(probe)]
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    return write_jsonl(tiny_data["root"] / "gen_self.jsonl", rows)


@pytest.fixture(scope="module")
def suite(tiny, tiny_data, gen_file):
    return {
        "perplexity": {"data": str(tiny_data["text"]), "context": 32, "stride": 32, "limit": 6},
        "multiple_choice": [{"name": "qa", "data": str(tiny_data["mc"]), "limit": 10}],
        "generation": [{"name": "echo", "data": str(gen_file), "max_new_tokens": 4}],
        "preference": {"data": str(tiny_data["pref"]), "reference": str(tiny["base"]), "limit": 6},
        "drift": {"base": str(tiny["base"]), "data": str(tiny_data["text"]), "context": 32, "limit": 6},
    }


@pytest.fixture(scope="module")
def evaluated(tiny, suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    results = run_eval([f"base={tiny['base']}", f"other={tiny['other']}"], suite, out)
    samples = {v: {p.stem: read_jsonl(p) for p in (out / "samples" / v).glob("*.jsonl")} for v in ("base", "other")}
    return out, results, samples


def test_one_row_per_item_in_data_order(evaluated, tiny_data, gen_file):
    out, _, samples = evaluated
    expected = {"perplexity": (tiny_data["text"], 6), "drift": (tiny_data["text"], 6), "mc-qa": (tiny_data["mc"], 10),
                "gen-echo": (gen_file, 4), "preference": (tiny_data["pref"], 6)}
    for variant in ("base", "other"):
        assert set(samples[variant]) == TASKS
        for task, (path, n) in expected.items():
            rows = samples[variant][task]
            assert [r["id"] for r in rows] == [f"{path}:{i}" for i in range(1, n + 1)], (variant, task)
            assert all({"id", "prompt", "reference", "metrics"} <= set(r) for r in rows)
    gen = samples["other"]["gen-echo"][0]
    first = json.loads(gen_file.read_text().splitlines()[0])
    assert isinstance(gen["output"], str) and gen["reference"] == first["answer"]
    mc = samples["other"]["mc-qa"][0]
    assert len(mc["choice_scores"]) == len(mc["choices"])
    assert mc["metrics"]["acc"] == float(mc["choice"] == mc["answer"])


def mean_of(rows: list[dict], metric: str) -> float:
    return sum(r["metrics"][metric] for r in rows) / len(rows)


def pooled(rows: list[dict], num: str, den: str) -> float:
    return sum(r["metrics"][num] for r in rows) / sum(r["metrics"][den] for r in rows)


def test_table_numbers_are_the_rows_aggregated(evaluated):
    _, results, samples = evaluated
    for variant in ("base", "other"):
        table, rows = results["variants"][variant], samples[variant]
        assert table["gen/echo/exact_match"] == pytest.approx(mean_of(rows["gen-echo"], "exact_match"))
        assert table["gen/echo/contains"] == pytest.approx(mean_of(rows["gen-echo"], "contains"))
        assert table["mc/qa/acc"] == pytest.approx(mean_of(rows["mc-qa"], "acc"))
        assert table["mc/qa/acc_norm"] == pytest.approx(mean_of(rows["mc-qa"], "acc_norm"))
        assert table["preference/accuracy"] == pytest.approx(mean_of(rows["preference"], "accuracy"))
        assert table["preference/margin"] == pytest.approx(mean_of(rows["preference"], "margin"))
        assert table["perplexity/perplexity"] == pytest.approx(math.exp(pooled(rows["perplexity"], "nll", "tokens")))
        bits = pooled(rows["perplexity"], "nll", "bytes") / math.log(2)
        assert table["perplexity/bits_per_byte"] == pytest.approx(bits)
        assert table["drift/kl"] == pytest.approx(pooled(rows["drift"], "kl_sum", "tokens"), abs=1e-9)
        assert table["drift/top1_agreement"] == pytest.approx(pooled(rows["drift"], "agreements", "tokens"))
    assert results["variants"]["base"]["gen/echo/exact_match"] == 0.5  # its own outputs on every other prompt


def test_flips_and_p_values_follow_from_the_rows(evaluated):
    _, results, samples = evaluated
    stats = results["stats"]
    assert stats["baseline"] == "base" and set(stats["comparisons"]) == {"other"}
    assert set(stats["intervals"]) == {"base", "other"}
    binary = 0
    for key, c in stats["comparisons"]["other"].items():
        assert c["p"] <= c["p_holm"] <= 1.0 and c["n"] == len(samples["base"][c["task"]])
        if "right_to_wrong" not in c:
            assert c["test"] == "paired-permutation"
            continue
        binary += 1
        metric = key.rsplit("/", 1)[1]
        base = {r["id"]: r["metrics"][metric] for r in samples["base"][c["task"]]}
        other = {r["id"]: r["metrics"][metric] for r in samples["other"][c["task"]]}
        assert c["right_to_wrong"] == [i for i in base if base[i] == 1 and other[i] == 0], key
        assert c["wrong_to_right"] == [i for i in base if base[i] == 0 and other[i] == 1], key
        assert c["p"] == pytest.approx(mcnemar_exact(len(c["right_to_wrong"]), len(c["wrong_to_right"])))
    assert binary == 5  # exact_match, contains, acc, acc_norm, preference accuracy
    assert stats["comparisons"]["other"]["gen/echo/exact_match"]["right_to_wrong"]  # the base's own answers


def test_report_shows_intervals_and_the_comparison(evaluated):
    out, results, _ = evaluated
    report = (out / "report.md").read_text()
    assert "## Against the baseline (base)" in report and "| other | mc/qa/acc | " in report
    assert "Holm" in report and "Wilson" in report
    assert (out / "report.html").is_file() and not list(out.glob(".partial-*"))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["stats"]["comparisons"]["other"].keys() == results["stats"]["comparisons"]["other"].keys()


def test_suite_run_evaluate_keeps_its_signature(tiny, suite):
    """during_training.py scores a light object with .name, .model and .tokenizer through SuiteRun.evaluate."""
    from posttrain.eval.runner import SuiteRun

    light = {k: suite[k] for k in ("perplexity", "multiple_choice", "generation")}
    loaded = load_variant(str(tiny["base"]), "cpu", "auto", name="base")
    variant = SimpleNamespace(name="training", model=loaded.model, tokenizer=loaded.tokenizer)
    run = SuiteRun(load_suite(light))
    metrics = run.evaluate(variant)
    assert all(isinstance(v, float) for v in metrics.values()) and "gen/echo/exact_match" in metrics
    again, samples = run.evaluate_items(variant)
    assert again == metrics and set(samples) == {"perplexity", "mc-qa", "gen-echo"}


def test_baseline_from_the_suite_or_the_flag(tiny, tiny_data, tmp_path):
    suite = {"multiple_choice": [{"name": "qa", "data": str(tiny_data["mc"]), "limit": 4}], "baseline": "other"}
    models = [f"base={tiny['base']}", f"other={tiny['other']}"]
    results = run_eval(models, suite, tmp_path / "a")
    assert results["stats"]["baseline"] == "other" and set(results["stats"]["comparisons"]) == {"base"}
    results = run_eval(models, suite, tmp_path / "b", baseline="base")  # the flag wins over the suite
    assert results["stats"]["baseline"] == "base"


def test_a_baseline_not_in_the_run_is_one_line_and_writes_nothing(tiny, tiny_data, tmp_path, capsys):
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(f"multiple_choice: [{{name: qa, data: {tiny_data['mc']}}}]\nbaseline: sft\n")
    models = [f"base={tiny['base']}", f"other={tiny['other']}"]
    with pytest.raises(PosttrainError, match=r"suite.yaml: baseline: 'sft' is not a variant of this run \['base', "
                                             r"'other'\]"):
        run_eval(models, suite_file, tmp_path / "out")
    code = main(["eval", *models, "--suite", str(suite_file), "--out", str(tmp_path / "out"), "--baseline", "nope"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "--baseline 'nope' is not a variant of this run ['base', 'other']" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_split_names_the_key_and_writes_nothing(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"multiple_choice: [{{name: qa, data: {empty}}}]\n")
    code = main(["eval", str(tiny["base"]), "--suite", str(suite), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "multiple_choice[0].data" in err and "split 'train' has no rows" in err and "split: ..." in err
    with pytest.raises(PosttrainError, match=r"generation\[0\]\.data: .*not 'validation'"):
        run_eval([str(tiny["base"])], {"generation": [{"name": "g", "data": {"path": "tiny:chat",
                                                                              "split": "validation"}}]}, tmp_path / "o")
    with pytest.raises(PosttrainError, match=r"limit must be >= 1"):
        run_eval([str(tiny["base"])], {"multiple_choice": [{"name": "qa", "data": str(empty), "limit": 0}]}, tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_bench_keeps_records_and_stats_and_eval_replaces_stale_records(tiny, tiny_data, tmp_path):
    out = tmp_path / "out"
    models = [f"base={tiny['base']}", f"other={tiny['other']}"]
    first = run_eval(models, {"multiple_choice": [{"name": "a", "data": str(tiny_data["mc"]), "limit": 4}]}, out)
    run_bench([f"base={tiny['base']}"], out, prompt_tokens=4, new_tokens=2, repeats=1, warmup=0, device="cpu")
    after = json.loads((out / "results.json").read_text())
    assert after["stats"]["comparisons"] == json.loads(json.dumps(first["stats"]["comparisons"]))
    assert (out / "samples" / "base" / "mc-a.jsonl").is_file() and (out / "samples" / "other" / "mc-a.jsonl").is_file()
    run_eval([f"base={tiny['base']}"], {"multiple_choice": [{"name": "b", "data": str(tiny_data["mc"]), "limit": 4}]},
             out)
    assert sorted(p.name for p in (out / "samples" / "base").iterdir()) == ["mc-b.jsonl"]  # mc-a is stale: gone
    assert (out / "samples" / "other" / "mc-a.jsonl").is_file()  # other's row stays in the table, so do its records


def test_a_crash_in_the_html_leaves_no_records_or_results(tiny, tiny_data, tmp_path, monkeypatch):
    import posttrain.eval.html as html

    def broken(*args, **kwargs):
        raise RuntimeError("no html")

    monkeypatch.setattr(html, "render_html", broken)
    with pytest.raises(RuntimeError, match="no html"):
        run_eval([str(tiny["base"])], {"multiple_choice": [{"name": "a", "data": str(tiny_data["mc"]), "limit": 2}]},
                 tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_training_curves_come_from_the_run_folder(tiny, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny["base"], run)
    history = {"train_loss_history": [[1, 2.5], [2, 2.0]], "eval_history": [{"step": 2, "mc/a/acc": 0.5}]}
    (run / "metrics.json").write_text(json.dumps(history))
    suite = {"multiple_choice": [{"name": "a", "data": str(tiny_data["mc"]), "limit": 2}]}
    results = run_eval([f"run={run}", f"base={tiny['base']}"], suite, tmp_path / "out")
    assert results["training"] == {"run": {"train_loss": [[1, 2.5], [2, 2.0]], "eval": [{"step": 2, "mc/a/acc": 0.5}]}}


def test_a_pipeline_comparing_a_missing_stage_fails_clearly(tmp_path):
    from posttrain.pipeline import load_pipeline

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("recipe: pipeline\noutput_dir: runs/x\nstages:\n  - {name: base, config: a.yaml}\n"
                        "  - {name: report, compare: [base, sft], suite: s.yaml}\n")
    with pytest.raises(PosttrainError, match=r"stages\[1\] refers to 'sft', which is not an earlier stage"):
        load_pipeline(pipeline)
