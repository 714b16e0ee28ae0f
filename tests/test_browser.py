"""report.html renders in a real headless browser: a screenshot that is not blank and shows the figures.

Needs Debian's ``chromium`` package (``.ci/run`` installs it); skipped with a reason when no browser is
installed. Set HYDRA_PROBE_SCREENSHOT=path.png to keep the screenshot for a look.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import tiny

import hydra_probe as hp

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)

pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless browser installed (apt-get install chromium)")


def screenshot(html_path, png_path, tmp_path, width=1280, height=6000) -> None:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu",
           "--hide-scrollbars", "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
           f"--window-size={width},{height}", f"--screenshot={png_path}", html_path.resolve().as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png_path.is_file(), f"the browser wrote no screenshot (exit {p.returncode}): {p.stderr[-2000:]}"


def test_report_html_renders_with_its_figures(tmp_path):
    from PIL import Image

    m = tiny.model("gpt2", layers=2, heads=2, d=16, initializer_range=0.3)
    task = hp.tasks.ioi(m, 6, corruption="swap")
    out = hp.triangulate(m, task, top=2, progress=False).save(tmp_path / "report")
    png = tmp_path / "shot.png"
    screenshot(out / "report.html", png, tmp_path)
    if os.environ.get("HYDRA_PROBE_SCREENSHOT"):
        shutil.copy(png, os.environ["HYDRA_PROBE_SCREENSHOT"])
    img = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    nonwhite = (img.min(axis=2) < 235).mean()
    assert nonwhite > 0.02, f"the page looks blank ({nonwhite:.1%} non-white pixels)"
    # the figures rendered: saturated colours (plots, heatmaps) cover a real part of the page
    sat = (img.max(axis=2) - img.min(axis=2)) / 255
    assert (sat > 0.35).mean() > 0.01, f"few coloured pixels ({(sat > 0.35).mean():.2%}); are the figures missing?"
    # text rendered at the top (the title): dark pixels in the first 120 rows
    assert (img[:120].max(axis=2) < 80).mean() > 0.002
