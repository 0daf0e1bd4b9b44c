"""Confidence intervals and paired tests of each variant against a baseline, from the per-item records.

Every statistic comes from scipy or statsmodels; this module only decides which one fits each metric:
- a 0/1 metric per item (exact_match, contains, acc, acc_norm, preference accuracy): 95% Wilson interval
  (statsmodels `proportion_confint(method="wilson")`); against the baseline the exact McNemar test, i.e. a
  two-sided binomial test (scipy `binomtest`, p = 1/2) on the discordant items, p = 1 when there are none;
  the items that flipped (right to wrong, wrong to right) are listed by id.
- a mean of a continuous per-item value (preference margin): bias-corrected and accelerated (BCa) bootstrap
  interval (scipy `bootstrap`); against the baseline a paired permutation test of the mean difference (scipy
  `permutation_test`, permutation_type="samples": each item's two values swap places; exact up to 13 items).
- a pooled ratio (perplexity = exp(sum NLL / sum tokens), bits_per_byte, drift kl and top1_agreement, which
  pool over every token of every text): a paired bootstrap over texts of that same ratio for the interval;
  the paired permutation test runs on each text's own ratio (for perplexity its NLL per token, the log of
  its perplexity), since a permutation swaps whole texts, not tokens. `diff` is always the difference of the
  table's numbers (variant - baseline).
Holm's step-down correction (statsmodels `multipletests(method="holm")`) runs over every test in the table,
and `significant` is its decision at alpha. Resampling uses a fixed seed (the suite's `seed`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from posttrain.eval import metric_catalog as cat

BINARY = {"exact_match", "contains", "acc", "acc_norm", "accuracy"}
MEANS = {"margin"}
# metric name -> (per-item numerator, denominator, the table's transform of sum(numerator) / sum(denominator))
RATIOS = {
    "perplexity": ("nll", "tokens", np.exp),
    "bits_per_byte": ("nll", "bytes", lambda r: r / math.log(2)),
    "kl": ("kl_sum", "tokens", lambda r: r),
    "top1_agreement": ("agreements", "tokens", lambda r: r),
}
N_RESAMPLES = 9999
BATCH = 1000  # resamples per vectorized call: all 9999 at once costs more in memory traffic than it saves


def table_key(task: str, metric: str) -> str:
    """('gen-add', 'exact_match') -> 'gen/add/exact_match'; ('drift', 'kl') -> 'drift/kl'."""
    family, _, name = task.partition("-")
    return f"{family}/{name}/{metric}" if name else f"{family}/{metric}"


def measured(rows: list[dict]) -> list[str]:
    """The table's metrics that these rows carry per item (detail-only ones are left out)."""
    names = rows[0]["metrics"] if rows else {}
    return [m for m in names if m in BINARY | MEANS | set(RATIOS) and m not in cat.DETAIL_ONLY]


def compute_stats(samples: dict, baseline: str, seed: int = 0, alpha: float = 0.05) -> dict:
    """results["stats"] from samples {variant: {task: [row, ...]}}; see docs/EVAL.md for the layout."""
    intervals = {
        variant: {
            table_key(task, m): interval(rows, m, seed, alpha) for task, rows in tasks.items() for m in measured(rows)
        }
        for variant, tasks in samples.items()
    }
    comparisons: dict = {}
    for variant, tasks in samples.items():
        if variant == baseline:
            continue
        for task, rows in tasks.items():
            base_rows = samples.get(baseline, {}).get(task)
            for m in measured(rows) if base_rows else []:
                result = compare(base_rows, rows, m, seed)
                if result is not None:
                    comparisons.setdefault(variant, {})[table_key(task, m)] = {**result, "task": task}
    holm(comparisons, alpha)
    return {"baseline": baseline, "alpha": alpha, "correction": "holm", "intervals": intervals,
            "comparisons": comparisons}


def aggregate(rows: list[dict], metric: str) -> float:
    """The table's number from the per-item rows: a mean, or for a pooled metric the ratio of sums."""
    if metric in RATIOS:
        num, den, transform = RATIOS[metric]
        return float(transform(sum(r["metrics"][num] for r in rows) / sum(r["metrics"][den] for r in rows)))
    return float(np.mean([r["metrics"][metric] for r in rows]))


def interval(rows: list[dict], metric: str, seed: int = 0, alpha: float = 0.05) -> dict:
    if metric in BINARY:
        return {**wilson([r["metrics"][metric] for r in rows], alpha), "method": "wilson"}
    if metric in RATIOS:
        num, den, transform = RATIOS[metric]
        data = (np.array([r["metrics"][num] for r in rows], float), np.array([r["metrics"][den] for r in rows], float))

        def statistic(n, d, axis=-1):
            return transform(np.sum(n, axis=axis) / np.sum(d, axis=axis))

        low, high = bootstrap(data, statistic, seed, alpha)
    else:
        low, high = bootstrap((np.array([r["metrics"][metric] for r in rows], float),), np.mean, seed, alpha)
    return {"low": low, "high": high, "method": "bootstrap"}


def wilson(values: list[float], alpha: float = 0.05) -> dict:
    """95% (1 - alpha) Wilson score interval of the proportion of ones among 0/1 values."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(int(round(sum(values))), len(values), alpha=alpha, method="wilson")
    return {"low": float(low), "high": float(high)}


def bootstrap(data: tuple, statistic, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """BCa bootstrap interval of statistic over items (paired: one resample of items for every array);
    the percentile interval where BCa is undefined (every item alike); NaN for fewer than two items."""
    from scipy.stats import bootstrap as scipy_bootstrap

    if len(data[0]) < 2:
        return math.nan, math.nan
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a degenerate BCa warns, then comes back NaN: the next method answers
            ci = scipy_bootstrap(data, statistic, paired=len(data) > 1, vectorized=True, n_resamples=N_RESAMPLES,
                                 confidence_level=1 - alpha, method=method, batch=BATCH,
                                 random_state=np.random.default_rng(seed))
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            break
    return low, high


def compare(base_rows: list[dict], rows: list[dict], metric: str, seed: int = 0) -> dict | None:
    """The paired test of one metric, items matched by id (in the baseline's order); None if no id matches."""
    by_id = {r["id"]: r for r in rows}
    pairs = [(b, by_id[b["id"]]) for b in base_rows if b["id"] in by_id]
    if not pairs:
        return None
    diff = aggregate([v for _, v in pairs], metric) - aggregate([b for b, _ in pairs], metric)
    if metric in BINARY:
        right_to_wrong = [b["id"] for b, v in pairs if b["metrics"][metric] >= 0.5 > v["metrics"][metric]]
        wrong_to_right = [b["id"] for b, v in pairs if b["metrics"][metric] < 0.5 <= v["metrics"][metric]]
        return {"diff": diff, "p": mcnemar_exact(len(right_to_wrong), len(wrong_to_right)), "test": "mcnemar-exact",
                "n": len(pairs), "right_to_wrong": right_to_wrong, "wrong_to_right": wrong_to_right}
    x, y = (np.array([per_item(r, metric) for r in side]) for side in zip(*pairs))
    finite = np.isfinite(x) & np.isfinite(y)
    return {"diff": diff, "p": paired_permutation(y[finite], x[finite], seed), "test": "paired-permutation",
            "n": int(finite.sum())}


def per_item(row: dict, metric: str) -> float:
    """The value a paired test compares for one item: the metric itself, or the item's own ratio."""
    if metric in RATIOS:
        num, den, _ = RATIOS[metric]
        d = row["metrics"][den]
        return row["metrics"][num] / d if d else math.nan
    return float(row["metrics"][metric])


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact McNemar: two-sided binomial test of the discordant pairs at 1/2; 1.0 when there are none."""
    from scipy.stats import binomtest

    n = right_to_wrong + wrong_to_right
    return float(binomtest(wrong_to_right, n, 0.5).pvalue) if n else 1.0


def paired_permutation(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(x - y) = 0; 1.0 when no item differs."""
    from scipy.stats import permutation_test

    if len(x) == 0 or not np.any(x != y):
        return 1.0

    def mean_difference(a, b, axis=-1):
        return np.mean(a - b, axis=axis)

    result = permutation_test((x, y), mean_difference, permutation_type="samples", vectorized=True,
                              n_resamples=N_RESAMPLES, batch=BATCH, random_state=np.random.default_rng(seed))
    return float(min(1.0, result.pvalue))


def holm(comparisons: dict, alpha: float = 0.05) -> None:
    """Holm's correction over every test in comparisons, in place: p_holm and significant."""
    from statsmodels.stats.multitest import multipletests

    tests = [t for by_key in comparisons.values() for t in by_key.values()]
    if not tests:
        return
    reject, corrected, _, _ = multipletests([t["p"] for t in tests], alpha=alpha, method="holm")
    for t, r, p in zip(tests, reject, corrected):
        t["p_holm"], t["significant"] = float(p), bool(r)
