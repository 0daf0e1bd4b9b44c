"""results.json + report.md + PNG plots, written so that a crash never leaves a complete-looking report.

Everything is first written into a hidden temporary folder inside `out_dir`; then the old results.json is
removed, the plots and report.md are moved into place, and results.json is moved last: its presence means
the report next to it is complete. `eval` and `bench` writing into the same folder join one table: each
command replaces the metric keys it owns and keeps the other's (see `merge_results`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from posttrain.eval import metric_catalog as cat
from posttrain.eval.plots import write_plots


def merge_results(new: dict, out_dir: Path, owns: Callable[[str], bool]) -> dict:
    """Fold a previous results.json in `out_dir` into `new`.

    owns(key): whether the current command produces that metric key. For a variant run now, old values of
    keys it owns are dropped (a changed suite must not leave stale numbers) and the others are kept; variants
    not run now keep their rows.
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
    merged["directions"] = {**old.get("directions", {}), **new.get("directions", {})}
    merged["settings"] = {**old.get("settings", {}), **new.get("settings", {})}
    merged["models"] = {**old.get("models", {}), **new.get("models", {})}
    return merged


def write_report(results: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        (tmp / "report.md").write_text(render_markdown(results))
        plots = write_plots(results, tmp)
        (tmp / "results.json").write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
        (out_dir / "results.json").unlink(missing_ok=True)
        for stale in out_dir.glob("plot_*.png"):
            stale.unlink()
        for name in [*[p.name for p in plots], "report.md", "results.json"]:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _json_safe(obj):
    """NaN/inf (e.g. the stderr of a single question) become null: results.json stays strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def render_markdown(results: dict) -> str:
    variants = results["variants"]
    directions = results.get("directions", {})
    keys = sorted(
        {k for m in variants.values() for k in m if not cat.is_stderr(k) and cat.metric_name(k) not in cat.DETAIL_ONLY},
        key=cat.sort_key,
    )
    best = {k: _best(variants, k, cat.higher_is_better(k, directions)) for k in keys}
    lines = ["# posttrain evaluation report", "", _environment_line(results.get("environment", {})), ""]
    header = ["variant"] + [
        f"{cat.column_label(k)} {_arrow(cat.higher_is_better(k, directions))}".strip() for k in keys
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in variants.items():
        cells = [name] + [_cell(metrics, k, name in best[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bold: best in its column (↑ higher is better, ↓ lower is better; no arrow: no better direction). "
        "± is the standard error (lm-eval's sample stderr). Definitions: docs/EVAL.md.",
        "",
    ]
    lines += _model_lines(results.get("models", {}))
    lines += _settings_lines(results.get("settings", {}))
    return "\n".join(lines) + "\n"


def _best(variants: dict, key: str, higher: bool | None) -> set[str]:
    values = {n: m[key] for n, m in variants.items() if cat.is_number(m.get(key))}
    if higher is None or len(set(values.values())) < 2:
        return set()  # nothing to choose between: no bold
    target = max(values.values()) if higher else min(values.values())
    return {n for n, v in values.items() if v == target}


def _arrow(higher: bool | None) -> str:
    return {True: "↑", False: "↓", None: ""}[higher]


def _cell(metrics: dict, key: str, bold: bool) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    text = cat.format_value(key, value)
    stderr = metrics.get(f"{key}_stderr")
    if cat.is_number(stderr):
        text += f" ± {cat.format_value(key, stderr)}"
    return f"**{text}**" if bold else text


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
