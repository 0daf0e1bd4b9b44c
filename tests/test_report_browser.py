"""report.html in a real headless browser (Debian's Chromium driven by Playwright): the page loads with no console
or page errors and no network request, the summary table has a row per variant and sorts on a header click,
and the "flipped vs baseline only" filter shows exactly the items that flipped. The page is rendered from
synthetic results (tests/test_report_html.py), so the test takes seconds.

Playwright cannot download its own browser here; it drives /usr/bin/chromium (`apt-get install chromium`,
which .ci/run does). Without either the tests skip, unless POSTTRAIN_REQUIRE_BROWSER=1 (CI sets it): then they
fail, so that CI never passes without having opened the page.
"""

import os
from pathlib import Path

import pytest
from test_report_html import HOSTILE_PROMPT, N_ITEMS, flipped_ids, item_id, synthetic_report, write_png

from posttrain.eval.html import render_html

CHROMIUM = Path("/usr/bin/chromium")


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("POSTTRAIN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"POSTTRAIN_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


class Opened:
    """A page opened from a file, with what it logged and every request that would have left the machine."""

    def __init__(self, browser, path: Path):
        self.errors: list[str] = []
        self.blocked: list[str] = []
        self.page = browser.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", self._only_local)
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")

    def _only_local(self, route):
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def texts(self, selector: str) -> list[str]:
        return self.page.locator(selector).all_inner_texts()


@pytest.fixture()
def report(browser, tmp_path):
    results, samples = synthetic_report()
    plots = [write_png(tmp_path / "plot_gen.png"), write_png(tmp_path / "plot_training.png", (40, 40, 200))]
    path = tmp_path / "report.html"
    path.write_text(render_html(results, samples, plots), encoding="utf-8")
    opened = Opened(browser, path)
    yield opened, results
    opened.page.close()


def test_loads_offline_without_errors(report):
    opened, results = report
    page = opened.page
    assert opened.errors == [] and opened.blocked == []
    names = [t.strip() for t in opened.texts("#summary-table tbody tr td:first-child")]
    assert names == [f"{n} (baseline)" if n == "base" else n for n in results["variants"]]
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#plots img").count() == 2
    assert page.evaluate("window.pwned") is None  # the hostile prompt stayed text
    page.select_option("#dd-task", "gen-add")
    assert HOSTILE_PROMPT in opened.texts("#dd-body tr:first-child td")[1]
    # The route sees what the page would fetch: a request to the network is caught, not let through.
    page.evaluate("fetch('https://example.invalid/x').catch(() => null)")
    page.wait_for_timeout(200)
    assert opened.blocked == ["https://example.invalid/x"]


def test_header_click_sorts(report):
    opened, results = report
    key = "mc/add-mc/acc"
    header = opened.page.locator(f'#summary-table th[title="{key}"]')
    ascending = [n for n, _ in sorted(results["variants"].items(), key=lambda kv: kv[1][key])]

    def order():
        return [t.split(" (")[0].strip() for t in opened.texts("#summary-table tbody tr td:first-child")]

    header.click()
    assert order() == ascending and header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert order() == ascending[::-1] and header.get_attribute("aria-sort") == "descending"
    opened.page.locator('#summary-table th[data-type="text"]').click()
    assert order() == sorted(results["variants"])
    assert opened.errors == []


@pytest.mark.parametrize(("variant", "task"), [("sft", "gen-add"), ("dpo", "mc-add-mc"), ("sft", "mc-add-mc")])
def test_flipped_filter_shows_exactly_the_flipped_items(report, variant, task):
    opened, results = report
    page = opened.page
    page.select_option("#dd-variant", variant)
    page.select_option("#dd-task", task)
    assert page.locator("#dd-body tr").count() == N_ITEMS
    page.check("#dd-flipped")
    expected = flipped_ids(results, variant, task)
    assert expected and set(opened.texts("#dd-body tr td:first-child")) == expected
    assert page.locator("#dd-body tr").count() == len(expected) == page.locator("#dd-body tr.flipped").count()
    assert page.locator("#dd-count").inner_text().startswith(f"showing {len(expected)} of {N_ITEMS}")
    page.uncheck("#dd-flipped")
    assert page.locator("#dd-body tr").count() == N_ITEMS
    assert opened.errors == []


def test_baseline_filter_and_search(report):
    opened, results = report
    page = opened.page
    page.select_option("#dd-variant", "base")
    page.select_option("#dd-task", "mc-add-mc")
    page.check("#dd-flipped")  # the baseline lists what flipped in any variant
    expected = flipped_ids(results, "sft", "mc-add-mc") | flipped_ids(results, "dpo", "mc-add-mc")
    assert set(opened.texts("#dd-body tr td:first-child")) == expected
    page.uncheck("#dd-flipped")
    page.fill("#dd-search", "pick 7")
    assert opened.texts("#dd-body tr td:first-child") == [item_id(7)]
    page.fill("#dd-search", "")
    assert page.locator("#dd-body tr").count() == N_ITEMS
    assert opened.errors == []


def test_bench_only_page_loads(browser, tmp_path):
    results = {"variants": {"a": {"bench/decode_tokens_per_s": 100.0}}, "environment": {"created": "2026-11-30"}}
    path = tmp_path / "report.html"
    path.write_text(render_html(results, {}, []), encoding="utf-8")
    opened = Opened(browser, path)
    assert opened.errors == [] and opened.blocked == []
    assert opened.texts("#summary-table tbody tr td:first-child") == ["a"]
    opened.page.close()
