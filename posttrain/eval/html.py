"""report.html: the whole evaluation in one self-contained page, next to report.md and results.json.

    html = render_html(results, samples, plots)   # results: results.json's dict; samples: {variant: {task: rows}}

The page opens from a file with no network: inline CSS and script (report_assets.py), PNG plots as base64
data URIs, the per-item records as JSON inside the page. Sections: the summary table (sortable; 95%
intervals and marks for differences from the baseline that survive the Holm correction, from
results["stats"]), the plots, the flips per variant and metric, a per-item drill-down (filter to the items
that flipped against the baseline, text search), and the settings, variants and versions. Every piece of
text goes through html.escape; the embedded JSON has each "<" escaped so no item text can close its tag.
A results dict without "stats", samples or "training" (a bench-only folder) renders the sections it has.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from posttrain.eval import metric_catalog as cat
from posttrain.eval.records import json_safe
from posttrain.eval.report_assets import CSS, JS

# Rows per variant and task that the page embeds (flipped items beyond it are kept); samples/ holds them all.
MAX_SAMPLE_ROWS = 5000
# Longer strings in an item (prompt, reference, output) are cut in the page; samples/ has them whole.
MAX_TEXT_CHARS = 4000

FLIP_LABELS = {"right_to_wrong": "right → wrong", "wrong_to_right": "wrong → right"}


def render_html(results: dict, samples: dict, plots: list[Path]) -> str:
    stats = results.get("stats") or {}
    sections = [
        _header(results),
        _summary_section(results, stats),
        _plots_section(plots),
        _flips_section(stats),
        _drilldown_section(results, samples or {}, stats),
        _settings_section(results),
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<link rel="icon" href="data:,">',  # no favicon request when the file is opened
            "<title>posttrain evaluation report</title>",
            f"<style>{CSS}</style></head><body>",
            *[s for s in sections if s],
            f"<script>{JS}</script>",
            "</body></html>",
        ]
    )


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _header(results: dict) -> str:
    env = results.get("environment") or {}
    versions = [f"{k} {env[k]}" for k in ("posttrain", "torch", "transformers", "peft", "trl", "lm_eval") if env.get(k)]
    return (
        "<header><h1>posttrain evaluation report</h1>"
        f'<p class="meta">Generated {_e(env.get("created", "?"))} · {len(results.get("variants", {}))} variants'
        f" · device {_e(env.get('device', '?'))} · {_e(' · '.join(versions))}</p>"
        '<p class="meta">The same numbers are in results.json and report.md next to this file; per-item records'
        " are in samples/.</p></header>"
    )


def table_keys(variants: dict) -> list[str]:
    """The summary table's columns, as report.md has them."""
    keys = {k for m in variants.values() for k in m if not cat.is_stderr(k)}
    return sorted((k for k in keys if cat.metric_name(k) not in cat.DETAIL_ONLY), key=cat.sort_key)


def _summary_section(results: dict, stats: dict) -> str:
    variants = results.get("variants") or {}
    directions = results.get("directions") or {}
    keys = table_keys(variants)
    arrows = {True: " ↑", False: " ↓", None: ""}
    labels = {k: cat.column_label(k) + arrows[cat.higher_is_better(k, directions)] for k in keys}
    head = ['<th data-type="text">variant</th>'] + [
        f'<th data-type="num" title="{_e(k)}">{_e(labels[k])}</th>' for k in keys
    ]
    best = {k: _best(variants, k, cat.higher_is_better(k, directions)) for k in keys}
    rows = []
    for name, metrics in variants.items():
        is_baseline = name == stats.get("baseline")
        label = f'{_e(name)} <span class="small">(baseline)</span>' if is_baseline else _e(name)
        cells = [f'<td data-v="{_e(name)}">{label}</td>']
        cells += [_summary_cell(name, metrics, k, name in best[k], stats, directions) for k in keys]
        row_class = ' class="baseline"' if is_baseline else ""
        rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    return (
        '<section id="summary"><h2>Summary</h2>'
        f'<table id="summary-table" class="sortable"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>{_legend(stats)}</section>"
    )


def _best(variants: dict, key: str, higher: bool | None) -> set[str]:
    values = {n: m[key] for n, m in variants.items() if cat.is_number(m.get(key))}
    if higher is None or len(set(values.values())) < 2:
        return set()
    target = max(values.values()) if higher else min(values.values())
    return {n for n, v in values.items() if v == target}


def _summary_cell(name: str, metrics: dict, key: str, best: bool, stats: dict, directions: dict) -> str:
    value = metrics.get(key)
    if value is None:
        return '<td class="num" data-v="">–</td>'
    text = _e(cat.format_value(key, value))
    stderr = metrics.get(f"{key}_stderr")
    if cat.is_number(stderr):
        text += f" ± {_e(cat.format_value(key, stderr))}"
    if best:
        text = f'<span class="best">{text}</span>'
    interval = ((stats.get("intervals") or {}).get(name) or {}).get(key)
    if interval and cat.is_number(interval.get("low")) and cat.is_number(interval.get("high")):
        low, high = (cat.format_value(key, interval[v]) for v in ("low", "high"))
        method = _e(interval.get("method"))
        text += f'<br><span class="ci" title="95% interval ({method})">[{_e(low)}, {_e(high)}]</span>'
    comparison = ((stats.get("comparisons") or {}).get(name) or {}).get(key)
    mark, tip = _significance(key, comparison, stats, directions)
    sort_value = repr(float(value)) if cat.is_number(value) else ""
    return f'<td class="num" data-v="{sort_value}"{tip}>{mark}{text}</td>'


def _significance(key: str, comparison: dict | None, stats: dict, directions: dict) -> tuple[str, str]:
    """(mark, title attribute) of one cell against the baseline; no comparison: nothing."""
    if not comparison:
        return "", ""
    tip = (
        f"vs {stats.get('baseline')}: diff {_num(comparison.get('diff'), '+.4g')}, p {_num(comparison.get('p'))}, "
        f"Holm p {_num(comparison.get('p_holm'))}, {comparison.get('test', '?')}, n {comparison.get('n', '?')}"
    )
    attr = f' title="{_e(tip)}"'
    if not comparison.get("significant"):
        return "", attr
    higher = cat.higher_is_better(key, directions)
    diff = comparison.get("diff")
    if higher is None or not cat.is_number(diff):
        return '<span class="different">◆</span> ', attr
    better = diff > 0 if higher else diff < 0
    return ('<span class="better">▲</span> ' if better else '<span class="worse">▼</span> '), attr


def _num(value, spec: str = ".3g") -> str:
    return format(value, spec) if cat.is_number(value) else "?"


def _legend(stats: dict) -> str:
    text = (
        "Click a column header to sort. ↑ higher is better, ↓ lower is better; bold: best in its column; "
        "± is the standard error."
    )
    if stats:
        text += (
            f" [low, high]: 95% interval (Wilson for 0/1 metrics, bootstrap otherwise). "
            f'<span class="better">▲</span> significantly better, <span class="worse">▼</span> significantly '
            f'worse, <span class="different">◆</span> significantly different (no better direction) than the '
            f"baseline <b>{_e(stats.get('baseline'))}</b>: paired test, Holm-corrected p &lt; "
            f"{_e(stats.get('alpha', 0.05))}. Hover a cell for the difference, p, Holm p and test."
        )
    return f'<p class="small">{text} Definitions: docs/EVAL.md.</p>'


def _plots_section(plots: list[Path]) -> str:
    images = []
    for path in plots or []:
        path = Path(path)
        mime = "image/svg+xml" if path.suffix.lower() == ".svg" else "image/png"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        images.append(f'<figure><img alt="{_e(path.stem)}" src="data:{mime};base64,{data}"></figure>')
    if not images:
        return ""
    return f'<section id="plots" class="plots"><h2>Plots</h2>{"".join(images)}</section>'


def _flips_section(stats: dict) -> str:
    rows = []
    for variant, comparisons in (stats.get("comparisons") or {}).items():
        for key, c in comparisons.items():
            if "right_to_wrong" not in c and "wrong_to_right" not in c:
                continue  # a continuous metric: no items flip
            rows.append(
                f"<tr><td>{_e(variant)}</td><td>{_e(key)}</td><td>{_e(c.get('task'))}</td>"
                f'<td class="num">{len(c.get("right_to_wrong") or [])}</td>'
                f'<td class="num">{len(c.get("wrong_to_right") or [])}</td>'
                f'<td class="num">{_e(_num(c.get("diff"), "+.4g"))}</td>'
                f'<td class="num">{_e(_num(c.get("p_holm")))}</td>'
                f"<td>{'yes' if c.get('significant') else 'no'}</td></tr>"
            )
    if not rows:
        return ""
    return (
        f'<section id="flips"><h2>Flips against the baseline ({_e(stats.get("baseline"))})</h2>'
        '<p class="small">right → wrong: items the baseline gets right and the variant gets wrong; wrong → right: '
        "the reverse. Pick the variant and task below and tick the filter to read them.</p>"
        '<table id="flips-table"><thead><tr><th>variant</th><th>metric</th><th>task</th><th>right → wrong</th>'
        "<th>wrong → right</th><th>diff</th><th>Holm p</th><th>significant</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def flip_index(stats: dict) -> dict:
    """{variant: {task: {item id: [{"kind", "label"}, ...]}}}: the flipped items of each variant; the baseline
    gets every item that flipped in any variant, labelled with that variant."""
    index: dict = {}
    baseline = stats.get("baseline")
    for variant, comparisons in (stats.get("comparisons") or {}).items():
        for key, c in comparisons.items():
            task = str(c.get("task"))
            for kind, label in FLIP_LABELS.items():
                for item in c.get(kind) or []:
                    mark = f"{cat.metric_name(key)}: {label}"
                    index.setdefault(variant, {}).setdefault(task, {}).setdefault(str(item), []).append(
                        {"kind": kind, "label": mark}
                    )
                    if baseline is not None:
                        index.setdefault(baseline, {}).setdefault(task, {}).setdefault(str(item), []).append(
                            {"kind": kind, "label": f"{variant} {mark}"}
                        )
    return index


def _drilldown_section(results: dict, samples: dict, stats: dict) -> str:
    flips = flip_index(stats)
    embedded: dict = {}
    for variant, tasks in samples.items():
        for task, rows in (tasks or {}).items():
            flipped = flips.get(variant, {}).get(task, {})
            kept = list(rows[:MAX_SAMPLE_ROWS]) + [r for r in rows[MAX_SAMPLE_ROWS:] if str(r.get("id")) in flipped]
            rows_json = [json_safe(r, _clip_text) for r in kept]
            embedded.setdefault(variant, {})[task] = {"rows": rows_json, "total": len(rows)}
    if not embedded:
        return ""
    data = json.dumps({"baseline": stats.get("baseline"), "samples": embedded, "flips": flips}, allow_nan=False)
    # "<" escaped as \u003c: no item text can end the script element; JSON.parse reads it back unchanged.
    data = data.replace("<", "\\u003c")
    return (
        '<section id="samples"><h2>Items</h2>'
        '<div class="controls"><label>variant <select id="dd-variant"></select></label>'
        '<label>task <select id="dd-task"></select></label>'
        '<label><input type="checkbox" id="dd-flipped"> flipped vs baseline only</label>'
        '<label>search <input type="search" id="dd-search" placeholder="id, prompt, reference, output"></label>'
        '<span id="dd-count" class="small"></span></div>'
        '<div class="scroll"><table id="dd-table"><thead><tr><th>id</th><th>prompt</th><th>reference</th>'
        "<th>output / choice</th><th>metrics</th><th>flips vs baseline</th></tr></thead>"
        '<tbody id="dd-body"></tbody></table></div>'
        f'<script type="application/json" id="report-data">{data}</script></section>'
    )


def _clip_text(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return text[:MAX_TEXT_CHARS] + f" … [{len(text) - MAX_TEXT_CHARS} more characters in samples/]"


def _flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict) and value:
        return [row for k, v in value.items() for row in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return [row for i, v in enumerate(value) for row in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value))]


def _kv_table(title: str, table_id: str, rows: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    body = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in rows)
    return f'<h3>{_e(title)}</h3><table id="{table_id}"><tbody>{body}</tbody></table>'


def _settings_section(results: dict) -> str:
    models = results.get("models") or {}
    model_rows = "".join(
        f"<tr><td>{_e(n)}</td><td>{_e(m.get('kind', '?'))}</td><td><code>{_e(m.get('source', '?'))}</code></td>"
        + (f"<td><code>{_e(m['base'])}</code></td></tr>" if m.get("base") else "<td></td></tr>")
        for n, m in models.items()
        if isinstance(m, dict)
    )
    variants = (
        '<h3>Variants</h3><table id="models-table"><thead><tr><th>variant</th><th>kind</th><th>loaded from</th>'
        f"<th>base</th></tr></thead><tbody>{model_rows}</tbody></table>"
        if model_rows
        else ""
    )
    settings = _kv_table("Settings", "settings-table", _flatten(results.get("settings") or {}))
    stats = results.get("stats") or {}
    method = _kv_table(
        "Statistics", "stats-table", [(k, str(stats[k])) for k in ("baseline", "alpha", "correction") if k in stats]
    )
    env = _kv_table("Environment and versions", "environment-table", _flatten(results.get("environment") or {}))
    return f'<section id="settings"><h2>Settings and versions</h2>{variants}{settings}{method}{env}</section>'
