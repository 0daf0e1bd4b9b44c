"""PNG plots of results.json: one bar chart per metric family, quality against size on disk, and the training
curves of the variants that are posttrain run folders (results["training"]).

Bar charts put one panel per metric (variants on the x axis, one colour per variant throughout every figure),
write the value on each bar, draw stderr as error bars, and say in the panel title which direction is better.
matplotlib's Agg backend is used so plotting works on headless machines.
"""

from __future__ import annotations

import math
from pathlib import Path

from posttrain.eval import metric_catalog as cat


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    variants = results["variants"]
    directions = results.get("directions", {})
    names = list(variants)
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    by_family: dict[str, list[str]] = {}
    for key in sorted({k for m in variants.values() for k in m if not cat.is_stderr(k)}, key=cat.sort_key):
        if cat.metric_name(key) not in cat.DETAIL_ONLY:
            by_family.setdefault(cat.family(key), []).append(key)
    paths = [_family_plot(fam, keys, variants, directions, colors, out_dir) for fam, keys in by_family.items()]
    scatter = _quality_vs_size(variants, colors, out_dir)
    curves = _training_curves(results.get("training") or {}, directions, colors, out_dir)
    return [p for p in [*paths, scatter, curves] if p is not None]


def _family_plot(fam: str, keys: list[str], variants: dict, directions: dict, colors: dict, out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    width = max(4.2, 0.9 * len(variants) + 1.8)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _bar_panel(ax, key, variants, cat.higher_is_better(key, directions), colors)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    return _save(fig, cat.FAMILY_TITLES.get(fam, fam), out_dir / f"plot_{_safe(fam)}.png")


def _bar_panel(ax, key: str, variants: dict, higher: bool | None, colors: dict) -> None:
    names = [n for n, m in variants.items() if cat.is_number(m.get(key))]
    values = [float(variants[n][key]) for n in names]
    errors = [
        float(variants[n].get(f"{key}_stderr") or 0) if cat.is_number(variants[n].get(f"{key}_stderr")) else 0
        for n in names
    ]
    bars = ax.bar(
        range(len(names)),
        values,
        color=[colors[n] for n in names],
        yerr=errors if any(errors) else None,
        capsize=4,
        edgecolor="black",
        linewidth=0.5,
    )
    for bar, value, err in zip(bars, values, errors):
        top = value + err if value >= 0 else value - err  # above the error bar, so the two never overlap
        ax.annotate(
            cat.format_value(key, value),
            (bar.get_x() + bar.get_width() / 2, top),
            xytext=(0, 3 if value >= 0 else -3),
            textcoords="offset points",
            ha="center",
            va="bottom" if value >= 0 else "top",
            fontsize=8,
        )
    ax.set_xticks(
        range(len(names)), names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center"
    )
    hint = {True: " (higher is better)", False: " (lower is better)", None: ""}[higher]
    ax.set_title(cat.column_label(key) + hint, fontsize=10)
    if cat.metric_name(key).endswith("_bytes") or cat.metric_name(key).startswith("params"):
        ax.yaxis.set_major_formatter(lambda v, _: cat.format_value(key, v))
    if any(v < 0 for v in values):
        ax.axhline(0, color="black", linewidth=0.8)  # bars hang from zero: show where it is
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _quality_vs_size(variants: dict, colors: dict, out_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    keys = [
        k
        for k in cat.QUALITY_KEYS
        if sum(cat.is_number(m.get(k)) and cat.is_number(m.get("size/disk_bytes")) for m in variants.values()) >= 1
    ]
    # Up to three panels: the first text-quality keys, then task accuracies.
    keys += sorted(
        {
            k
            for m in variants.values()
            for k in m
            if cat.family(k) in ("mc", "lm_eval", "gen") and cat.metric_name(k) in ("acc", "exact_match")
        }
    )
    keys = keys[:3]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, m in variants.items():
            if cat.is_number(m.get(key)) and cat.is_number(m.get("size/disk_bytes")):
                ax.scatter(m["size/disk_bytes"], m[key], s=70, color=colors[name], edgecolor="black", zorder=3)
                ax.annotate(name, (m["size/disk_bytes"], m[key]), xytext=(6, 4), textcoords="offset points", fontsize=9)
        better = {True: "higher is better", False: "lower is better", None: ""}[cat.higher_is_better(key)]
        ax.set_ylabel(f"{cat.column_label(key)} ({better})" if better else cat.column_label(key))
        ax.set_xlabel("size on disk (safetensors)")
        ax.xaxis.set_major_formatter(lambda v, _: cat.human_bytes(v))
        ax.margins(x=0.25, y=0.2)
        ax.grid(alpha=0.3)
    return _save(fig, "Quality against size on disk", out_dir / "plot_quality_vs_size.png")


def _training_series(training: dict) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """[(panel key, {variant: [(step, value), ...]})]: train loss first, then each eval-history metric."""
    loss = {name: [_point(p) for p in run.get("train_loss") or [] if _point(p)] for name, run in training.items()}
    evals: dict[str, dict[str, list]] = {}
    for name, run in training.items():
        for entry in run.get("eval") or []:
            step = entry.get("step")
            for key, value in entry.items():
                if key != "step" and not cat.is_stderr(key) and cat.is_number(step) and cat.is_number(value):
                    evals.setdefault(key, {}).setdefault(name, []).append((step, value))
    panels = [("train loss", loss)] if any(loss.values()) else []
    return panels + [(key, evals[key]) for key in sorted(evals, key=cat.sort_key)]


def _point(pair) -> tuple[float, float] | None:
    ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(cat.is_number, pair))
    return (pair[0], pair[1]) if ok else None


def _training_curves(training: dict, directions: dict, colors: dict, out_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    panels = _training_series(training)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (key, series) in zip(axes.flat, panels):
        for name, points in series.items():
            if points:
                steps, values = zip(*sorted(points))
                # Eval history has a few points: markers show where each evaluation ran.
                ax.plot(steps, values, color=colors.get(name), label=name, marker="o" if len(points) <= 30 else None)
        higher = False if key == "train loss" else cat.higher_is_better(key, directions)
        hint = {True: " (higher is better)", False: " (lower is better)", None: ""}[higher]
        ax.set_title((key if key == "train loss" else cat.column_label(key)) + hint, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return _save(fig, "Training curves", out_dir / "plot_training.png")


def _save(fig, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=13, fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
