"""predict's report.html in a real browser (headless Chromium from the Debian packages, installed by
.ci/run): one card per scored image, and the slider re-decides them as predict's rule does."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.cli import predict as P
from tests.test_predict import FakeDetector, solid

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs chromium and sets SPG_REQUIRE_CHROMIUM, so there a missing browser fails instead of skipping
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("SPG_REQUIRE_CHROMIUM"),
                                reason="no chromium (apt-get install chromium; .ci/run does)")


def browse(url: str, *extra: str) -> str:
    assert CHROMIUM is not None, "SPG_REQUIRE_CHROMIUM is set but no chromium is installed"
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          *extra, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_page_has_a_card_per_image_and_the_slider_redecides(tmp_path):
    reds = [20, 60, 100, 140, 180, 220, 250]
    files = [solid(tmp_path / "in" / f"{r:03d}.png", red=r) for r in reds]
    out = tmp_path / "out"
    P.predict_files(files, FakeDetector(threshold=0.5), out, P.Options())
    page = out / "report.html"
    with open(out / "scores.csv", newline="") as f:
        scores = np.array([float(r["score"]) for r in csv.DictReader(f)])
    # a threshold equal to a score flags that image too (score >= threshold)
    for threshold in (None, 0.3, 0.75, 0.0, float(scores[2])):
        url = page.as_uri() + ("" if threshold is None else f"?threshold={threshold!r}")
        dom = browse(url, "--dump-dom")
        assert dom.count('class="card') == len(files)
        want = int((scores >= (0.5 if threshold is None else threshold)).sum())
        assert re.search(r'id="flagged">flagged: (\d+) of (\d+)<', dom).groups() == (str(want), str(len(files)))
        assert dom.count('class="card anomalous"') == want
    browse(page.as_uri(), f"--screenshot={tmp_path / 'report.png'}", "--window-size=1200,800")
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_the_evaluate_page_shows_each_categorys_metrics_and_only_files_beside_it(tmp_path):
    from html.parser import HTMLParser

    from pipeline.evaluation import html_report

    out = tmp_path / "run"
    (out / "overlays").mkdir(parents=True)
    for name in ("roc_pr.png", "per_category.png", "overlays/wood.png"):  # no overlay for tile
        solid(out / name, red=100)
    by_category = {
        "wood": {"image_auroc": 0.8125, "pixel_auroc": 0.9, "n_images": 12, "n_anomalous": 8,
                 "seed_ensemble": {"image_auroc": 0.75, "pixel_auroc": 0.91},
                 "baselines": {"mutual": {"image_auroc": 0.6667, "pixel_auroc": 0.95}},
                 "image_f1_at_aux_threshold": 0.5},
        "tile": {"image_auroc": None, "pixel_auroc": 0.875, "n_images": 6, "n_anomalous": 0,
                 "null_reasons": {"image_auroc": "no anomalous images in this category"},
                 "seed_ensemble": {"image_auroc": None, "pixel_auroc": 0.5}},
    }
    result = {"image_auroc": 0.8125, "aux_threshold": 0.25, "seed_ensemble": {"image_auroc": 0.75}}
    page = out / "report.html"
    page.write_bytes(html_report.evaluate_page(out, result, by_category, "a → b"))
    dom = browse(page.as_uri(), "--dump-dom")

    class Cells(HTMLParser):
        """(section id, scoring, key) -> cell text, and every img src."""
        def __init__(self):
            super().__init__()
            self.section, self.row, self.key, self.cells, self.srcs, self.titles = None, None, None, {}, [], {}

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "section":
                self.section = a.get("id")
            elif tag == "tr":
                self.row = a.get("data-scoring")
            elif tag == "td":
                self.key = a.get("data-key")
                self.titles[(self.section, self.row, self.key)] = a.get("title")
            elif tag == "img":
                self.srcs.append(a["src"])

        def handle_data(self, data):
            if self.key is not None:
                self.cells[(self.section, self.row, self.key)] = data.strip()
                self.key = None

    cells = Cells()
    cells.feed(dom)
    assert dom.count('class="category"') == 2
    det = "detector (mean of the seeds' maps)"
    assert cells.cells[("category-wood", det, "image_auroc")] == "0.750"
    assert cells.cells[("category-wood", "guides (mean over seeds)", "image_auroc")] == "0.812"  # 0.8125 to 3 places
    assert cells.cells[("category-wood", "baseline mutual", "pixel_auroc")] == "0.950"
    assert cells.cells[("category-tile", "guides (mean over seeds)", "image_auroc")] == "–"
    assert cells.titles[("category-tile", "guides (mean over seeds)", "image_auroc")] == \
        "no anomalous images in this category"
    assert cells.cells[(None, det, "image_auroc")] == "0.750"
    assert "12 images, 8 anomalous" in dom and "no overlay for this category" in dom
    # every picture is a file beside the page: nothing fetched from elsewhere
    assert sorted(cells.srcs) == ["overlays/wood.png", "per_category.png", "roc_pr.png"]
    assert all((out / src).is_file() for src in cells.srcs)
    browse(page.as_uri(), f"--screenshot={tmp_path / 'evaluate.png'}", "--window-size=1200,800")
    assert (tmp_path / "evaluate.png").stat().st_size > 1000
