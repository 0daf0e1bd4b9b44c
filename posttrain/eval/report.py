"""results.json, report.md, report.html, PNG plots and the per-item records, written so that a crash never
leaves a complete-looking report.

Everything is first written into a hidden temporary folder inside `out_dir`; then the old results.json is
removed, the records (samples/<variant>/), the plots, report.md and report.html are moved into place, and
results.json is moved last: its presence means the report next to it is complete. `eval` and `bench` writing
into the same folder join one table: each command replaces the metric keys it owns and keeps the other's (see
`merge_results`); `bench` keeps the records and statistics of the last `eval`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.eval import metric_catalog as cat
from posttrain.eval.plots import write_plots
from posttrain.eval.records import json_safe, read_samples, write_samples

SAMPLES = "samples"


def merge_results(new: dict, out_dir: Path, owns: Callable[[str], bool]) -> dict:
    """Fold a previous results.json in `out_dir` into `new`.

    owns(key): whether the current command produces that metric key. For a variant run now, old values of
    keys it owns are dropped (a changed suite must not leave stale numbers) and the others are kept; variants
    not run now keep their rows. `stats` comes from the command that computes it (eval); a command without it
    (bench) keeps the previous one. Training curves are joined per variant.
    """
    old_file = out_dir / "results.json"
    if not old_file.is_file():
        return new
    try:
        old = json.loads(old_file.read_text())
    except (OSError, json.JSONDecodeError):
        return new  # an unreadable old file is replaced, not merged
    variants = {}
    for name, metrics in old.get("variants", {}).items():
        kept = {k: v for k, v in metrics.items() if not owns(k)}
        variants[name] = kept if name in new["variants"] else metrics
    for name, metrics in new["variants"].items():
        variants[name] = {**variants.get(name, {}), **metrics}
    merged = dict(new, variants=variants)
    for key in ("directions", "settings", "models", "training"):
        merged[key] = {**(old.get(key) or {}), **(new.get(key) or {})}
    if "stats" not in new and old.get("stats"):
        merged["stats"] = old["stats"]
    return merged


def write_report(results: dict, out_dir: str | Path, samples: dict | None = None) -> Path:
    """samples {variant: {task: [row, ...]}}: the records of the variants run now (eval); they replace those
    variants' samples/ folders. None (bench): samples/ stays as the last eval left it."""
    from posttrain.eval.html import render_html

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        write_samples(samples or {}, tmp / SAMPLES)
        shown = {n: s for n, s in read_samples(out_dir / SAMPLES).items() if n in results["variants"]}
        shown.update(samples or {})
        (tmp / "report.md").write_text(render_markdown(results))
        plots = write_plots(results, tmp)
        (tmp / "report.html").write_text(render_html(results, shown, plots), encoding="utf-8")
        (tmp / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
        (out_dir / "results.json").unlink(missing_ok=True)
        for stale in out_dir.glob("plot_*.png"):
            stale.unlink()
        _replace_samples(tmp / SAMPLES, out_dir / SAMPLES, set(samples or {}), set(results["variants"]))
        for name in [*[p.name for p in plots], "report.md", "report.html", "results.json"]:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_samples(new: Path, old: Path, written: set[str], kept: set[str]) -> None:
    """Move the fresh variant folders in; drop old folders of variants that are rerun or no longer reported."""
    if old.is_dir():
        for folder in old.iterdir():
            if folder.is_dir() and (folder.name in written or folder.name not in kept):
                shutil.rmtree(folder)
    for name in sorted(written):
        old.mkdir(exist_ok=True)
        os.replace(new / name, old / name)


def render_markdown(results: dict) -> str:
    variants = results["variants"]
    directions = results.get("directions", {})
    stats = results.get("stats") or {}
    keys = sorted(
        {k for m in variants.values() for k in m if not cat.is_stderr(k) and cat.metric_name(k) not in cat.DETAIL_ONLY},
        key=cat.sort_key,
    )
    best = {k: _best(variants, k, cat.higher_is_better(k, directions)) for k in keys}
    lines = ["# posttrain evaluation report", "", _environment_line(results.get("environment", {})), ""]
    lines += _header(keys, directions)
    for name, metrics in variants.items():
        intervals = (stats.get("intervals") or {}).get(name, {})
        comparisons = (stats.get("comparisons") or {}).get(name, {})
        cells = [name] + [
            _mark(k, comparisons.get(k), directions) + _cell(metrics, k, name in best[k], intervals.get(k))
            for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _legend(stats), ""]
    lines += _comparison_lines(stats)
    lines += _model_lines(results.get("models", {}))
    lines += _settings_lines(results.get("settings", {}))
    return "\n".join(lines) + "\n"


def render_summary(results: dict, keys: list[str]) -> str:
    """A short table of the chosen metric keys (the one a pipeline prints at its end): value, 95% interval,
    and the mark of a significant difference from the baseline, as in report.md."""
    variants, directions = results["variants"], results.get("directions", {})
    stats = results.get("stats") or {}
    missing = [k for k in keys if not any(k in m for m in variants.values())]
    if missing:
        known = sorted({k for m in variants.values() for k in m if not cat.is_stderr(k)})
        raise PosttrainError(f"summary names metric(s) {missing} that the report does not have; choose from {known}")
    lines = _header(keys, directions)
    best = {k: _best(variants, k, cat.higher_is_better(k, directions)) for k in keys}
    for name, metrics in variants.items():
        intervals = (stats.get("intervals") or {}).get(name, {})
        comparisons = (stats.get("comparisons") or {}).get(name, {})
        label = f"{name} (baseline)" if name == stats.get("baseline") else name
        cells = [label] + [
            _mark(k, comparisons.get(k), directions) + _cell(metrics, k, name in best[k], intervals.get(k))
            for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(keys: list[str], directions: dict) -> list[str]:
    labels = [f"{cat.column_label(k)} {_arrow(cat.higher_is_better(k, directions))}".strip() for k in keys]
    header = ["variant", *labels]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def _legend(stats: dict) -> str:
    text = (
        "Bold: best in its column (↑ higher is better, ↓ lower is better; no arrow: no better direction). "
        "± is the standard error (lm-eval's sample stderr)."
    )
    if stats:
        text += (
            " [low, high]: 95% interval (Wilson for 0/1 metrics, bootstrap otherwise). ▲ significantly better, "
            "▼ significantly worse, ◆ significantly different (no better direction) than the baseline "
            f"{stats.get('baseline')} (exact McNemar for 0/1 metrics, paired permutation otherwise; "
            f"Holm-corrected over every test in the table, p < {stats.get('alpha', 0.05)})."
        )
    return text + " Definitions: docs/EVAL.md."


def _mark(key: str, comparison: dict | None, directions: dict) -> str:
    if not comparison or not comparison.get("significant"):
        return ""
    higher, diff = cat.higher_is_better(key, directions), comparison.get("diff")
    if higher is None or not cat.is_number(diff):
        return "◆ "
    return "▲ " if (diff > 0) == higher else "▼ "


def _comparison_lines(stats: dict) -> list[str]:
    """Per variant and metric: the difference from the baseline, the test, p before and after Holm, flips."""
    rows = [(v, k, c) for v, by_key in (stats.get("comparisons") or {}).items() for k, c in by_key.items()]
    if not rows:
        return []
    lines = [
        f"## Against the baseline ({stats.get('baseline')})",
        "",
        "| variant | metric | diff | test | n | p | p (Holm) | right→wrong | wrong→right |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, key, c in sorted(rows, key=lambda r: (cat.sort_key(r[1]), r[0])):
        flips = [str(len(c[f])) if f in c else "–" for f in ("right_to_wrong", "wrong_to_right")]
        star = " *" if c.get("significant") else ""
        lines.append(
            f"| {variant} | {key} | {_signed(c.get('diff'))} | {c.get('test')} | {c.get('n')} | {_p(c.get('p'))} | "
            f"{_p(c.get('p_holm'))}{star} | {flips[0]} | {flips[1]} |"
        )
    lines += ["", "*: significant after Holm. The flipped items are listed in results.json (stats.comparisons) "
              "and their rows in samples/<variant>/<task>.jsonl.", ""]
    return lines


def _signed(value) -> str:
    return f"{value:+.4g}" if cat.is_number(value) else "–"


def _p(value) -> str:
    if not cat.is_number(value):
        return "–"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.1e}"


def _best(variants: dict, key: str, higher: bool | None) -> set[str]:
    values = {n: m[key] for n, m in variants.items() if cat.is_number(m.get(key))}
    if higher is None or len(set(values.values())) < 2:
        return set()  # nothing to choose between: no bold
    target = max(values.values()) if higher else min(values.values())
    return {n for n, v in values.items() if v == target}


def _arrow(higher: bool | None) -> str:
    return {True: "↑", False: "↓", None: ""}[higher]


def _cell(metrics: dict, key: str, bold: bool, interval: dict | None = None) -> str:
    """The value, then its 95% interval where stats has one, else ± its standard error where there is one."""
    value = metrics.get(key)
    if value is None:
        return "–"
    text = cat.format_value(key, value)
    text = f"**{text}**" if bold else text
    stderr = metrics.get(f"{key}_stderr")
    if interval and cat.is_number(interval.get("low")) and cat.is_number(interval.get("high")):
        text += f" [{cat.format_value(key, interval['low'])}, {cat.format_value(key, interval['high'])}]"
    elif cat.is_number(stderr):
        text += f" ± {cat.format_value(key, stderr)}"
    return text


def _environment_line(env: dict) -> str:
    parts = [f"{k} {env[k]}" for k in ("posttrain", "torch", "transformers", "peft", "trl", "lm_eval") if env.get(k)]
    parts += [f"device {env.get('device', '?')}", f"python {env.get('python', '?')}"]
    if env.get("git_revision"):
        parts.append(f"git {env['git_revision'][:12]}")
    return "Generated " + env.get("created", "") + " · " + " · ".join(parts)


def _model_lines(models: dict) -> list[str]:
    if not models:
        return []
    lines = ["## Variants", "", "| variant | kind | loaded from |", "|---|---|---|"]
    for name, info in models.items():
        base = f" on base `{info['base']}`" if info.get("base") else ""
        lines.append(f"| {name} | {info.get('kind', '?')} | `{info.get('source', '?')}`{base} |")
    return lines + [""]


def _data(section: dict) -> str:
    """A section's data source as the report shows it: the local file or folder (load_suite made it absolute),
    or `name[split]` for tiny and hub datasets."""
    data = section["data"]
    if not isinstance(data, dict):  # results.json written before data became a DataSource
        return str(data)
    return data["path"] if Path(data["path"]).is_absolute() else f"{data['path']}[{data['split']}]"


def _settings_lines(settings: dict) -> list[str]:
    suite = settings.get("suite") or {}
    lines = ["## Settings", ""]
    ppl = suite.get("perplexity")
    if ppl:
        lines.append(
            f"- perplexity: {_data(ppl)}, context {ppl['context']} tokens, stride {ppl['stride']} "
            "(stride == context is lm-eval's rolling perplexity)"
        )
    for task in suite.get("multiple_choice", []):
        lines.append(
            f"- mc/{task['name']}: {_data(task)}, lm-eval conventions, target delimiter {task['target_delimiter']!r}"
        )
    for task in suite.get("generation", []):
        lines.append(
            f"- gen/{task['name']}: {_data(task)}, greedy, max_new_tokens {task['max_new_tokens']}, "
            f"chat template {'on' if task['chat_template'] else 'off'}"
        )
    if suite.get("preference"):
        p = suite["preference"]
        lines.append(f"- preference: {_data(p)}, reference {p['reference']}, beta {p['beta']}")
    if suite.get("drift"):
        d = suite["drift"]
        lines.append(f"- drift: KL(base || variant) per token vs {d['base']} on {_data(d)}, context {d['context']}")
    bench = settings.get("bench")
    if bench:
        lines.append(
            f"- bench: batch 1, prompt {bench['prompt_tokens']} tokens, {bench['new_tokens']} new tokens, "
            f"{bench['warmup']} warm-up + median of {bench['repeats']} runs, device {bench['device']}"
        )
    return lines + [""] if len(lines) > 2 else []
