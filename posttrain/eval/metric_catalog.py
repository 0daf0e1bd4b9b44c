"""What each metric key means for the report: its family, which direction is better, how to print it.

Keys are `<family>/<metric>` or `<family>/<task>/<metric>`; a key ending in `_stderr` is the standard error of
the key without that suffix and is shown as `±` next to it, never as its own column. The full definitions are
in docs/EVAL.md; this table only carries what the report and the plots need.
"""

from __future__ import annotations

import math

# metric name (last key component) -> higher is better? (None: no better direction, e.g. a parameter count)
DIRECTIONS: dict[str, bool | None] = {
    "perplexity": False,
    "bits_per_byte": False,
    "word_perplexity": False,
    "acc": True,
    "acc_norm": True,
    "exact_match": True,
    "contains": True,
    "accuracy": True,
    "margin": True,
    "reward_chosen": True,
    "reward_rejected": False,
    "kl": False,
    "top1_agreement": True,
    "params_total": None,
    "params_trainable": None,
    "disk_bytes": False,
    "bits_per_weight": False,
    "linear_bits_per_weight": False,
    "load_seconds": False,
    "peak_memory_bytes": False,
    "prefill_tokens_per_s": True,
    "decode_tokens_per_s": True,
    "ttft_seconds": False,
}

# Shown in the report's table; everything is in results.json.
DETAIL_ONLY = {"word_perplexity", "reward_chosen", "reward_rejected"}

FAMILY_TITLES = {
    "perplexity": "Perplexity (held-out text)",
    "mc": "Multiple choice",
    "gen": "Generation",
    "preference": "Preference (DPO implicit reward)",
    "drift": "Drift from base",
    "lm_eval": "lm-eval tasks",
    "size": "Size",
    "bench": "Speed and memory",
}
FAMILY_ORDER = list(FAMILY_TITLES)

# The quality axis of the quality-vs-size plot, in order of preference.
QUALITY_KEYS = ("perplexity/perplexity", "perplexity/bits_per_byte", "drift/kl")


def metric_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def family(key: str) -> str:
    return key.split("/", 1)[0]


def is_stderr(key: str) -> bool:
    return key.endswith("_stderr")


def higher_is_better(key: str, overrides: dict[str, bool] | None = None) -> bool | None:
    if overrides and key in overrides:
        return overrides[key]
    return DIRECTIONS.get(metric_name(key))


def column_label(key: str) -> str:
    """'mc/arc/acc' -> 'arc acc'; 'perplexity/bits_per_byte' -> 'bits_per_byte'; 'drift/kl' -> 'drift kl'."""
    parts = key.split("/")
    if len(parts) == 2 and parts[0] in ("preference", "drift"):
        return " ".join(parts)  # 'accuracy' or 'kl' alone would not say what was measured
    return " ".join(parts[1:]) if len(parts) > 1 else key


def sort_key(key: str) -> tuple:
    fam = family(key)
    rank = FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER)
    name = metric_name(key)
    metric_rank = list(DIRECTIONS).index(name) if name in DIRECTIONS else len(DIRECTIONS)
    return rank, key.rsplit("/", 1)[0], metric_rank, key


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_value(key: str, value) -> str:
    if not is_number(value):
        return str(value)
    name = metric_name(key)
    if name.endswith("_bytes"):
        return human_bytes(value)
    if name.startswith("params"):
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
