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
