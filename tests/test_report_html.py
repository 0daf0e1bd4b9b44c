"""report.html as text: self-contained (no network references, plots as data URIs), a row per variant, marks
for significant differences, item text escaped, and bench-only results (no stats, no items) rendered.
tests/test_report_browser.py opens the same synthetic page in Chromium.
"""

import base64
import json
import re
import struct
import zlib

import pytest

from posttrain.eval import html as report_html
from posttrain.eval.html import render_html

HOSTILE_PROMPT = "<script>window.pwned = 1</script> & 'quotes' \"too\""
HOSTILE_OUTPUT = "</script><script>window.pwned = 2</script><!--"
N_ITEMS = 12


def write_png(path, rgb=(200, 40, 40)):
    """A valid 1x1 PNG: enough for a data URI the browser decodes, no matplotlib needed."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" + bytes(rgb))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def item_id(i):
    return f"data.jsonl:{i + 1}"


def comparison(task, diff, significant, right_to_wrong=(), wrong_to_right=(), test="mcnemar-exact"):
    return {
        "diff": diff, "p": 0.01 if significant else 0.4, "p_holm": 0.03 if significant else 0.8,
        "significant": significant, "test": test, "n": N_ITEMS, "task": task,
        "right_to_wrong": [item_id(i) for i in right_to_wrong], "wrong_to_right": [item_id(i) for i in wrong_to_right],
    }


def continuous(task, diff):
    """A comparison of a metric that is not 0/1: a permutation test and no flips."""
    c = comparison(task, diff, True, test="paired-permutation")
    del c["right_to_wrong"], c["wrong_to_right"]
    return c


def synthetic_report():
    """(results, samples): three variants, base the baseline; sft flips items 1, 2 (right -> wrong) and 5
    (wrong -> right) on gen-add's exact_match and item 2 on contains; dpo is significantly better on mc."""
    variants = {
        "base": {"gen/add/exact_match": 0.5, "gen/add/contains": 0.6, "mc/add-mc/acc": 0.4,
                 "perplexity/perplexity": 30.5, "size/disk_bytes": 2_000_000},
        "sft": {"gen/add/exact_match": 0.3333, "gen/add/contains": 0.5, "mc/add-mc/acc": 0.45,
                "perplexity/perplexity": 12.25, "size/disk_bytes": 2_100_000},
        "dpo": {"gen/add/exact_match": 0.5833, "gen/add/contains": 0.6, "mc/add-mc/acc": 0.9,
                "perplexity/perplexity": 14.0, "size/disk_bytes": 2_100_000},
    }
    intervals = {
        name: {key: {"low": value * 0.8, "high": value * 1.1, "method": "wilson"} for key, value in m.items()
               if key != "size/disk_bytes"}
        for name, m in variants.items()
    }
    comparisons = {
        "sft": {
            "gen/add/exact_match": comparison("gen-add", -0.1667, True, right_to_wrong=(1, 2), wrong_to_right=(5,)),
            "gen/add/contains": comparison("gen-add", -0.1, False, right_to_wrong=(2,)),
            "mc/add-mc/acc": comparison("mc-add-mc", 0.05, False, wrong_to_right=(3,)),
            "perplexity/perplexity": continuous("perplexity", -18.25),
        },
        "dpo": {
            "gen/add/exact_match": comparison("gen-add", 0.0833, False, wrong_to_right=(7,)),
            "mc/add-mc/acc": comparison("mc-add-mc", 0.5, True, wrong_to_right=(0, 4, 6, 8, 9, 10)),
        },
    }
    results = {
        "variants": variants,
        "directions": {},
        "environment": {"created": "2026-11-30T12:00:00", "posttrain": "0.1.0", "torch": "2.13.0", "device": "cpu",
                        "python": "3.11.7"},
        "models": {n: {"kind": "full", "source": f"/runs/{n}"} for n in variants},
        "settings": {"suite": {"generation": [{"name": "add", "max_new_tokens": 16, "chat_template": True}]}},
        "stats": {"baseline": "base", "alpha": 0.05, "correction": "holm", "intervals": intervals,
                  "comparisons": comparisons},
    }
    return results, synthetic_samples(variants)


def synthetic_samples(variants):
    samples = {}
    for v, name in enumerate(variants):
        gen = [
            {"id": item_id(i), "prompt": HOSTILE_PROMPT if i == 0 else f"What is {i} + {i}?", "reference": [str(2 * i)],
             "output": HOSTILE_OUTPUT if i == 0 else f"answer {2 * i + v}",
             "metrics": {"exact_match": float((i + v) % 2), "contains": 1.0}}
            for i in range(N_ITEMS)
        ]
        mc = [
            {"id": item_id(i), "prompt": f"Pick {i}", "reference": 1, "choice_scores": [-1.5, -0.25, float("nan")],
             "choice": 1, "metrics": {"acc": 1.0}}
            for i in range(N_ITEMS)
        ]
        samples[name] = {"gen-add": gen, "mc-add-mc": mc}
    return samples


def flipped_ids(results, variant, task):
    comps = results["stats"]["comparisons"].get(variant, {}).values()
    kinds = ("right_to_wrong", "wrong_to_right")
    return {i for c in comps if c["task"] == task for kind in kinds for i in c.get(kind, [])}


def embedded_data(page):
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


@pytest.fixture()
def page_and_plots(tmp_path):
    results, samples = synthetic_report()
    plots = [write_png(tmp_path / "plot_gen.png"), write_png(tmp_path / "plot_training.png", (40, 40, 200))]
    return render_html(results, samples, plots), plots, results


def test_no_network_references(page_and_plots):
    page, _, _ = page_and_plots
    refs = re.findall(r"""\b(?:src|href|action|poster)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert not re.search(r"https?://", page), "report.html must not reference the network"
    assert "@import" not in page and "url(" not in page


def test_plots_embedded_as_data_uris(page_and_plots):
    page, plots, _ = page_and_plots
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(u) for u in uris] == [p.read_bytes() for p in plots]


def test_row_per_variant_baseline_and_marks(page_and_plots):
    page, _, results = page_and_plots
    table = page[page.index('id="summary-table"') : page.index("</table>", page.index('id="summary-table"'))]
    rows = re.findall(r"<tr( class=\"baseline\")?><td data-v=\"([^\"]*)\">", table)
    assert [name for _, name in rows] == list(results["variants"])
    assert [name for cls, name in rows if cls] == ["base"]
    assert table.count('class="worse"') == 1 and table.count('class="better"') == 2  # sft em, dpo acc, sft ppl
    assert "Holm p 0.03" in table and "mcnemar-exact" in table
    assert "[0.4, 0.55]" in table  # base exact_match's interval
    assert "Flips against the baseline" in page and "Settings and versions" in page


def test_item_text_escaped_and_round_trips(page_and_plots):
    page, _, results = page_and_plots
    assert len(re.findall(r"<script\b", page, re.I)) == 2  # the data block and the page's own script
    assert "</script><script>window" not in page and "<!--" not in page
    data = embedded_data(page)
    first = data["samples"]["sft"]["gen-add"]["rows"][0]
    assert first["prompt"] == HOSTILE_PROMPT and first["output"] == HOSTILE_OUTPUT
    assert data["samples"]["sft"]["mc-add-mc"]["rows"][0]["choice_scores"][2] is None  # NaN -> null
    assert set(data["flips"]["sft"]["gen-add"]) == flipped_ids(results, "sft", "gen-add")
    assert set(data["flips"]["base"]["mc-add-mc"]) == flipped_ids(results, "sft", "mc-add-mc") | flipped_ids(
        results, "dpo", "mc-add-mc"
    )


def test_rows_capped_but_flipped_items_kept(monkeypatch):
    monkeypatch.setattr(report_html, "MAX_SAMPLE_ROWS", 3)
    results, samples = synthetic_report()
    data = embedded_data(render_html(results, samples, []))
    embedded = data["samples"]["sft"]["gen-add"]
    assert embedded["total"] == N_ITEMS
    assert [r["id"] for r in embedded["rows"]] == [item_id(i) for i in (0, 1, 2, 5)]


def test_bench_only_results_render():
    results = {
        "variants": {"a": {"bench/decode_tokens_per_s": 100.0}, "b": {"bench/decode_tokens_per_s": 80.0}},
        "environment": {"created": "2026-11-30"},
    }
    page = render_html(results, {}, [])
    assert page.count('<td data-v="a">') == 1 and page.count('<td data-v="b">') == 1
    assert 'id="report-data"' not in page and 'id="plots"' not in page and 'id="flips"' not in page


def test_training_curves_plot(tmp_path):
    from posttrain.eval.plots import write_plots

    results, _ = synthetic_report()
    assert not [p for p in write_plots(results, tmp_path) if p.name == "plot_training.png"]
    results["training"] = {
        "sft": {"train_loss": [[1, 2.5], [2, 2.1], [3, 1.9]],
                "eval": [{"step": 1, "gen/add/exact_match": 0.1}, {"step": 3, "gen/add/exact_match": 0.3}]},
        "dpo": {"train_loss": [[1, 0.69], [2, 0.6]], "eval": []},
    }
    paths = write_plots(results, tmp_path)
    training = [p for p in paths if p.name == "plot_training.png"]
    assert training and training[0].read_bytes().startswith(b"\x89PNG")
