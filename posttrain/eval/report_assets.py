"""The stylesheet and script that report.html carries inline (posttrain/eval/html.py writes the page).

Both are plain CSS and vanilla JavaScript with no external references: the page opens from a file with no
network. The script reads its data from the page's `<script type="application/json" id="report-data">`
and builds the sample rows with textContent only, so item text is never parsed as HTML.
"""

from __future__ import annotations

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 1.5em 3em; color: #1d1d1f; background: #fff; }
h1 { margin: 0.8em 0 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; margin: 0.2em 0; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #d6d6d6; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f5; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B4"; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BE"; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.ci, .small { color: #666; font-size: 0.85em; }
.best { font-weight: 700; }
.better { color: #0a7d28; font-weight: 700; } .worse { color: #c0211b; font-weight: 700; }
.different { color: #8a5a00; font-weight: 700; }
tr.baseline { background: #f7f9fc; }
.plots img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; display: block; }
.controls { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; margin: 0.6em 0; }
.scroll { max-height: 70vh; overflow: auto; border: 1px solid #ddd; }
.scroll table { margin: 0; }
.scroll thead th { position: sticky; top: 0; z-index: 1; }
#dd-table td { max-width: 32em; white-space: pre-wrap; word-break: break-word; }
tr.flipped { background: #fff8e1; }
.flip { display: inline-block; border-radius: 3px; padding: 0 0.3em; margin: 0 0.2em 0.2em 0; font-size: 0.85em; }
.flip.right_to_wrong { background: #fde2e1; color: #8c1812; }
.flip.wrong_to_right { background: #ddf4e2; color: #0c5a22; }
code { background: #f3f3f5; padding: 0 0.2em; }
"""

JS = """
"use strict";
(function () {
  function byId(id) { return document.getElementById(id); }

  // Summary table: click a header to sort; numeric columns by data-v, missing values last either way.
  function sortKey(cell, numeric) {
    var raw = cell.getAttribute("data-v");
    if (raw === null || raw === "") { return null; }
    if (!numeric) { return raw; }
    var value = parseFloat(raw);
    return isNaN(value) ? null : value;
  }
  function sortTable(table, th, col) {
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var numeric = th.getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = sortKey(a.cells[col], numeric), y = sortKey(b.cells[col], numeric);
      if (x === null || y === null) { return (x === null) - (y === null); }
      var order = numeric ? x - y : String(x).localeCompare(String(y));
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener("click", function () { sortTable(table, th, col); });
    });
  });

  // Sample drill-down.
  var dataNode = byId("report-data");
  var variantSelect = byId("dd-variant");
  if (!dataNode || !variantSelect) { return; }
  var DATA = JSON.parse(dataNode.textContent);
  var taskSelect = byId("dd-task"), flippedBox = byId("dd-flipped"), search = byId("dd-search");
  var body = byId("dd-body"), count = byId("dd-count");

  function text(value) {
    if (value === undefined || value === null) { return ""; }
    return typeof value === "string" ? value : JSON.stringify(value);
  }
  function option(select, value) {
    var node = document.createElement("option");
    node.value = value; node.textContent = value; select.appendChild(node);
  }
  function fillTasks() {
    var current = taskSelect.value;
    while (taskSelect.firstChild) { taskSelect.removeChild(taskSelect.firstChild); }
    var tasks = Object.keys(DATA.samples[variantSelect.value] || {});
    tasks.forEach(function (task) { option(taskSelect, task); });
    if (tasks.indexOf(current) >= 0) { taskSelect.value = current; }
  }
  function answer(row) {
    if (row.output !== undefined) { return text(row.output); }
    if (row.choice === undefined) { return ""; }
    var scores = (row.choice_scores || []).map(function (s) { return s === null ? "?" : s.toPrecision(4); });
    return "choice " + row.choice + (scores.length ? "  (scores " + scores.join(", ") + ")" : "");
  }
  function metricsText(metrics) {
    return Object.keys(metrics || {}).map(function (k) { return k + " " + text(metrics[k]); }).join("\\n");
  }
  function cell(tr, value) {
    var td = document.createElement("td"); td.textContent = value; tr.appendChild(td); return td;
  }
  function sampleRow(row, flips) {
    var tr = document.createElement("tr");
    [text(row.id), text(row.prompt), text(row.reference), answer(row), metricsText(row.metrics)]
      .forEach(function (value) { cell(tr, value); });
    var marks = cell(tr, "");
    (flips || []).forEach(function (flip) {
      var span = document.createElement("span");
      span.className = "flip " + flip.kind; span.textContent = flip.label; marks.appendChild(span);
    });
    if (flips) { tr.className = "flipped"; }
    return tr;
  }
  function haystack(row) {
    if (row._search === undefined) {
      row._search = [row.id, row.prompt, row.reference, row.output].map(text).join("\\n").toLowerCase();
    }
    return row._search;
  }
  function render() {
    var set = (DATA.samples[variantSelect.value] || {})[taskSelect.value] || { rows: [], total: 0 };
    var flips = (DATA.flips[variantSelect.value] || {})[taskSelect.value] || {};
    var query = search.value.toLowerCase(), onlyFlipped = flippedBox.checked;
    var fragment = document.createDocumentFragment(), shown = 0;
    set.rows.forEach(function (row) {
      var rowFlips = flips[text(row.id)];
      if (onlyFlipped && !rowFlips) { return; }
      if (query && haystack(row).indexOf(query) < 0) { return; }
      fragment.appendChild(sampleRow(row, rowFlips)); shown += 1;
    });
    while (body.firstChild) { body.removeChild(body.firstChild); }
    body.appendChild(fragment);
    var note = "showing " + shown + " of " + set.rows.length + " items";
    if (set.total > set.rows.length) {
      note += " (the page holds " + set.rows.length + " of " + set.total + " items; all are in samples/)";
    }
    count.textContent = note;
  }
  Object.keys(DATA.samples).forEach(function (variant) { option(variantSelect, variant); });
  variantSelect.addEventListener("change", function () { fillTasks(); render(); });
  taskSelect.addEventListener("change", render);
  flippedBox.addEventListener("change", render);
  search.addEventListener("input", render);
  fillTasks();
  render();
})();
"""
