"""Self-contained pages a person looks at: predict's images as cards with a threshold slider, and an
evaluate run's metrics, curves and overlays (:func:`evaluate_page`).

``predict`` writes ``report.html`` beside ``scores.csv``. No CDN, no server: the scores are embedded in
the page as JSON, the images are linked by paths relative to the page (the run's own ``overlays/``,
``maps/``, ``masks/``), and the script is inline. The cards are sorted by score, highest first, each
with its decision and score (its overlay, or its map where predict wrote no overlay, as for images it
did not flag by default); a click opens its overlay, map and mask at full size. The slider re-decides
every card from the embedded scores (anomalous when ``score >= threshold``, predict's rule) and counts
the flagged ones; it starts at the run's threshold. ``?threshold=X`` in the page's URL sets the slider
on load, as moving it would (a bookmarkable view; the browser test uses it).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Collection, Mapping, Sequence

from pipeline.files import write_bytes

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1em 2em; background: #fafafa; }
header { position: sticky; top: 0; background: #fafafa; padding: .5em 0; border-bottom: 1px solid #ddd; }
#cards { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 1em; }
.card { width: 180px; background: white; border: 3px solid #4a4; border-radius: 6px; padding: 4px; cursor: pointer; }
.card.anomalous { border-color: #d33; }
.card img { width: 100%; display: block; }
.card .name { font-size: 11px; overflow-wrap: anywhere; }
.card .verdict { font-weight: bold; }
#viewer { display: none; position: fixed; inset: 0; background: rgba(0,0,0,.85); padding: 2em; overflow: auto; }
#viewer img { max-width: 32%; margin: .5%; background: white; }
#viewer p { color: white; }
</style></head><body>
<header>
<h1>__TITLE__</h1>
<label>threshold <input id="slider" type="range" min="__MIN__" max="__MAX__" step="any" value="__THRESHOLD__">
<span id="value"></span></label>
&nbsp; <span id="flagged"></span> &nbsp; <span class="note">(run threshold __THRESHOLD__, __SOURCE__)</span>
</header>
<div id="cards"></div>
<div id="viewer" title="click to close"><p id="viewer-name"></p><div id="viewer-images"></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const rows = JSON.parse(document.getElementById("data").textContent);
const cards = document.getElementById("cards");
const slider = document.getElementById("slider");
const viewer = document.getElementById("viewer");
function text(tag, cls, value) { const e = document.createElement(tag); e.className = cls; e.textContent = value; return e; }
for (const row of rows) {
  const card = document.createElement("div");
  card.className = "card";
  card.dataset.score = row.score;
  const img = document.createElement("img");
  img.src = row.overlay || row.map; img.alt = row.name; img.loading = "lazy";  // unflagged: no overlay by default
  card.append(img, text("div", "verdict", ""), text("div", "score", row.score.toPrecision(6)), text("div", "name", row.name));
  card.addEventListener("click", () => {
    document.getElementById("viewer-name").textContent = row.name + "  score " + row.score;
    const box = document.getElementById("viewer-images");
    box.replaceChildren();
    for (const src of [row.overlay, row.map, row.mask]) {
      if (!src) continue;
      const full = document.createElement("img"); full.src = src; box.append(full);
    }
    viewer.style.display = "block";
  });
  cards.append(card);
}
viewer.addEventListener("click", () => { viewer.style.display = "none"; });
function decide() {
  const t = parseFloat(slider.value);
  let flagged = 0;
  for (const card of cards.children) {
    const anomalous = parseFloat(card.dataset.score) >= t;
    card.classList.toggle("anomalous", anomalous);
    card.querySelector(".verdict").textContent = anomalous ? "anomalous" : "normal";
    flagged += anomalous ? 1 : 0;
  }
  document.getElementById("value").textContent = t.toPrecision(6);
  document.getElementById("flagged").textContent = "flagged: " + flagged + " of " + cards.children.length;
}
slider.addEventListener("input", decide);
const asked = new URLSearchParams(location.search).get("threshold");
if (asked !== null) { slider.value = asked; slider.dispatchEvent(new Event("input")); } else { decide(); }
</script></body></html>
"""


def predict_page(out: Path, rows: Sequence[Mapping], threshold: float, source: str, title: str) -> Path:
    """Write ``out/report.html`` from scores.csv's rows (path, score, map, overlay, mask, paths relative
    to ``out``); returns its path."""
    data = sorted(({"name": str(r["path"]), "score": float(r["score"]), "overlay": r["overlay"], "map": r["map"],
                    "mask": r.get("mask") or ""} for r in rows), key=lambda r: -r["score"])
    scores = [r["score"] for r in data] or [threshold]
    low, high = min(min(scores), threshold), max(max(scores), threshold)
    # "</" cannot end the JSON block early: the only place it could appear is inside a file name
    blob = json.dumps(data).replace("</", "<\\/")
    page = (PAGE.replace("__TITLE__", html.escape(title)).replace("__MIN__", repr(low)).replace("__MAX__", repr(high))
            .replace("__THRESHOLD__", repr(float(threshold))).replace("__SOURCE__", html.escape(source))
            .replace("__DATA__", blob))
    path = Path(out) / "report.html"
    write_bytes(path, page.encode())
    return path


COLUMNS = {"image_auroc": "image AUROC", "image_ap": "image AP", "image_f1_max": "image F1-max",
           "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP", "pixel_aupro": "AUPRO"}
"""The metric columns of the evaluate page's tables."""
OPERATOR = {"aux_threshold": "aux threshold", "image_f1_at_aux_threshold": "F1 at it",
            "image_precision_at_aux_threshold": "precision at it", "image_recall_at_aux_threshold": "recall at it",
            "good_passed_at_full_recall": "good passed, every defect caught",
            "good_passed_at_1pct_miss": "good passed, 1 % of defects missed"}
"""The operator's view: the detector's decisions at its threshold."""


def scorings(metrics: Mapping) -> dict[str, Mapping]:
    """The rows of an evaluate page's table, from one metrics.json (or one category of per_category.json):
    the detector's scoring, then the guides, baselines, fused modes and controls, each where present."""
    rows: dict[str, Mapping] = {}
    if isinstance(metrics.get("seed_ensemble"), Mapping):
        rows["detector (mean of the seeds' maps)"] = {**metrics["seed_ensemble"],
                                                      "null_reasons": metrics.get("null_reasons", {})}
    rows["guides (mean over seeds)"] = metrics
    for group, label in (("baselines", "baseline"), ("fused", "fused"), ("controls", "control")):
        for name, entry in (metrics.get(group) or {}).items():
            if isinstance(entry, Mapping):
                rows[f"{label} {name}"] = entry
    return rows


def _cell(entry: Mapping, key: str) -> str:
    value = entry.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td data-key="{key}">{value:.3f}</td>'
    why = (entry.get("null_reasons") or {}).get(key, "not reported")
    return f'<td data-key="{key}" title="{html.escape(str(why))}">–</td>'


def _table(rows: Mapping[str, Mapping]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS.values())
    body = "".join(f'<tr data-scoring="{html.escape(name)}"><th>{html.escape(name)}</th>'
                   + "".join(_cell(entry, k) for k in COLUMNS) + "</tr>" for name, entry in rows.items())
    return f'<table><tr><th>scoring</th>{head}</tr>{body}</table>'


EVALUATE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1em 2em; background: #fafafa; }
table { border-collapse: collapse; margin: .5em 0 1em; background: white; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
tr th:first-child { text-align: left; }
td[title] { color: #999; cursor: help; }
img { max-width: 100%; background: white; }
section.category { border-top: 2px solid #ccc; margin-top: 1.5em; }
</style></head><body>
<h1>__TITLE__</h1>
<p>Means over categories (a dash is undefined: hover for why). Written by the evaluate stage from
metrics.json and per_category.json beside this page; every image is a file in this folder.</p>
__SUMMARY__
<h2>Decisions at the detector's threshold</h2>
__OPERATOR__
<h2>ROC and PR, pooled over the images and a pixel sample</h2>
<img src="roc_pr.png" alt="ROC and PR curves">
<h2>Per category</h2>
<img src="per_category.png" alt="metrics per category">
__CATEGORIES__
</body></html>
"""


def evaluate_page(out: Path, result: Mapping, by_category: Mapping[str, Mapping], title: str,
                  written: Collection[Path] = ()) -> bytes:
    """``out/report.html``'s bytes for one evaluate run: the metrics of every scoring (means and per
    category), the detector's decisions at its threshold, and the run's own roc_pr.png, per_category.png
    and overlays/<category>.png, linked relative to the page (no CDN, no script). An overlay is linked
    when it is on disk or among ``written``, the files the run is about to write beside the page."""
    operator = "".join(f"<tr><th>{html.escape(label)}</th>{_cell(result, key)}</tr>" for key, label in OPERATOR.items())
    sections = []
    for category, entry in by_category.items():
        name = html.escape(category)
        sizes = (f" ({entry['n_images']} images, {entry['n_anomalous']} anomalous)"
                 if "n_images" in entry and "n_anomalous" in entry else "")
        overlay = Path(out) / "overlays" / f"{category}.png"
        picture = (f'<img src="overlays/{html.escape(category)}.png" alt="overlays of {name}">'
                   if overlay in written or overlay.exists()
                   else "<p>no overlay for this category</p>")
        decisions = "".join(f"<tr><th>{html.escape(label)}</th>{_cell(entry, key)}</tr>"
                            for key, label in OPERATOR.items() if key != "aux_threshold")
        sections.append(f'<section class="category" id="category-{name}"><h3>{name}{sizes}</h3>'
                        f"{_table(scorings(entry))}<table>{decisions}</table>{picture}</section>")
    page = (EVALUATE_PAGE.replace("__TITLE__", html.escape(title)).replace("__SUMMARY__", _table(scorings(result)))
            .replace("__OPERATOR__", f"<table>{operator}</table>").replace("__CATEGORIES__", "".join(sections)))
    return page.encode()
