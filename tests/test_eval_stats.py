"""posttrain.eval.stats against known values: exact McNemar, Wilson, Holm, the paired permutation test, the
bootstrap intervals, and the layout of results["stats"] built from per-item rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from posttrain.eval import stats


def rows(metric: str, values: list[float], ids: list[str] | None = None) -> list[dict]:
    ids = ids or [f"data.jsonl:{i + 1}" for i in range(len(values))]
    return [{"id": i, "metrics": {metric: v}} for i, v in zip(ids, values)]


def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs():
    from scipy.stats import binomtest
    from statsmodels.stats.contingency_tables import mcnemar

    p = stats.mcnemar_exact(10, 2)
    assert p == pytest.approx(binomtest(2, 12, 0.5).pvalue)
    assert p == pytest.approx(0.03857421875)  # 2 * sum_{k<=2} C(12, k) / 2**12 = 2 * 79 / 4096
    assert p == pytest.approx(mcnemar([[30, 10], [2, 40]], exact=True).pvalue)
    assert stats.mcnemar_exact(2, 10) == p  # two-sided: the direction does not matter
    assert stats.mcnemar_exact(0, 0) == 1.0  # no discordant pairs: nothing to test


def test_wilson_matches_the_textbook_interval():
    # Newcombe (1998), Stat. Med. 17:857, example (c): 81 of 263, score interval 0.2553 to 0.3662.
    ci = stats.wilson([1.0] * 81 + [0.0] * 182)
    assert (round(ci["low"], 4), round(ci["high"], 4)) == (0.2553, 0.3662)
    # 0 of 10: the Wilson interval starts at 0 and, unlike the Wald interval, is not empty.
    none = stats.wilson([0.0] * 10)
    assert none["low"] == pytest.approx(0.0, abs=1e-12) and none["high"] == pytest.approx(0.2775, abs=1e-4)


def test_holm_steps_down_over_every_test():
    comparisons = {
        "a": {"k1": {"p": 0.01}, "k2": {"p": 0.04}},
        "b": {"k1": {"p": 0.03}, "k2": {"p": 0.005}},
    }
    stats.holm(comparisons)
    # sorted p 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    assert comparisons["b"]["k2"]["p_holm"] == pytest.approx(0.02)
    assert comparisons["a"]["k1"]["p_holm"] == pytest.approx(0.03)
    assert comparisons["b"]["k1"]["p_holm"] == pytest.approx(0.06)
    assert comparisons["a"]["k2"]["p_holm"] == pytest.approx(0.06)
    significant = {(v, k): c["significant"] for v, by_key in comparisons.items() for k, c in by_key.items()}
    assert significant == {("a", "k1"): True, ("a", "k2"): False, ("b", "k1"): False, ("b", "k2"): True}


def test_paired_permutation_is_exact_for_few_items():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    # Every difference positive: of the 2**5 sign patterns only all-plus and all-minus are as extreme.
    assert stats.paired_permutation(x + 1.0, x) == pytest.approx(2 / 32)
    assert stats.paired_permutation(x, x) == 1.0
    # The test is on the pairs: a constant shift on a spread-out sample is still every pair moving one way.
    assert stats.paired_permutation(x * 100 + 0.5, x * 100) == pytest.approx(2 / 32)


def test_bootstrap_interval_is_seeded_and_holds_the_estimate():
    values = [0.3, -0.1, 0.8, 0.2, 0.5, -0.4, 0.9, 0.1, 0.0, 0.6]
    first = stats.interval(rows("margin", values), "margin", seed=3)
    assert first == stats.interval(rows("margin", values), "margin", seed=3)
    assert first["method"] == "bootstrap" and first["low"] < np.mean(values) < first["high"]
    assert stats.interval(rows("margin", [0.2] * 5), "margin") == {"low": 0.2, "high": 0.2, "method": "bootstrap"}
    one = stats.interval(rows("margin", [0.2]), "margin")
    assert math.isnan(one["low"]) and math.isnan(one["high"])  # one item: no interval (null in results.json)


def test_pooled_metrics_are_ratios_of_sums():
    docs = [
        {"id": "t:1", "metrics": {"nll": 10.0, "tokens": 5, "bytes": 20}},
        {"id": "t:2", "metrics": {"nll": 30.0, "tokens": 25, "bytes": 100}},
    ]
    assert stats.aggregate(docs, "perplexity") == pytest.approx(math.exp(40 / 30))  # not the mean of per-doc values
    assert stats.aggregate(docs, "bits_per_byte") == pytest.approx(40 / math.log(2) / 120)
    assert stats.per_item(docs[0], "perplexity") == pytest.approx(2.0)  # the test compares NLL per token


def test_compute_stats_layout_and_flips():
    base = rows("exact_match", [1, 1, 0, 0, 1, 0])
    better = rows("exact_match", [1, 0, 1, 1, 1, 1])
    margins = {"a": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "b": [0.6, 0.7, 0.8, 0.9, 1.0, 1.1]}
    samples = {
        name: {"gen-add": gen, "preference": rows("margin", margins[name])}
        for name, gen in (("a", base), ("b", better))
    }
    result = stats.compute_stats(samples, "a", seed=0)
    assert (result["baseline"], result["alpha"], result["correction"]) == ("a", 0.05, "holm")
    assert set(result["intervals"]) == {"a", "b"} and set(result["comparisons"]) == {"b"}
    assert result["intervals"]["a"]["gen/add/exact_match"]["method"] == "wilson"
    assert result["intervals"]["a"]["preference/margin"]["method"] == "bootstrap"
    em = result["comparisons"]["b"]["gen/add/exact_match"]
    assert em["right_to_wrong"] == ["data.jsonl:2"] and em["wrong_to_right"] == ["data.jsonl:3", "data.jsonl:4",
                                                                                  "data.jsonl:6"]
    assert em["test"] == "mcnemar-exact" and em["n"] == 6 and em["task"] == "gen-add"
    assert em["diff"] == pytest.approx(5 / 6 - 3 / 6) and em["p"] == pytest.approx(stats.mcnemar_exact(1, 3))
    margin = result["comparisons"]["b"]["preference/margin"]
    assert margin["test"] == "paired-permutation" and "right_to_wrong" not in margin
    assert margin["diff"] == pytest.approx(0.5) and margin["p"] == pytest.approx(2 / 64)
    for c in result["comparisons"]["b"].values():
        assert c["p"] <= c["p_holm"] <= 1 and isinstance(c["significant"], bool)


def test_items_are_matched_by_id_not_by_position():
    base = rows("acc", [1, 0, 1], ids=["q1", "q2", "q3"])
    shuffled = rows("acc", [1, 1, 0], ids=["q3", "q1", "q2"])  # the same answers in another order
    c = stats.compare(base, shuffled, "acc")
    assert c["right_to_wrong"] == [] and c["wrong_to_right"] == [] and c["p"] == 1.0 and c["diff"] == 0
