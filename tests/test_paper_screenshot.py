"""The run report opened in a real browser: headless Chromium renders report/index.html (no
network: everything is embedded) into a PNG that must show text and figures, not a blank page.
Skipped with the reason where Chromium is not installed (Debian: `apt-get install chromium`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from repsim.cli import cli

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str | None:
    found = next((p for p in map(shutil.which, CANDIDATES) if p), None)
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


def screenshot(page: Path, out: Path, profile: Path) -> None:
    """Render ``page`` at 1200 px wide into ``out`` with a throw-away profile and nothing that
    reaches the network."""
    browser = chromium()
    assert browser is not None
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={out}",
           "--window-size=1200,3000", "--hide-scrollbars", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.is_file(), f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr}"


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: "
                    "`apt-get install chromium`); the report's screenshot test needs it")
def test_the_report_renders_text_and_figures_in_chromium(runner, write_recipe,
                                                         tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    extra = '\n[[evaluators]]\nname = "knn"\nparams = { k = 5, group = "blocks" }\n'
    result = runner.invoke(cli, ["run", str(write_recipe(extra=extra)), "--quiet"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "run/report/index.html"
    shot = tmp_path / "report.png"
    screenshot(page, shot, tmp_path / "profile")

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    px = np.asarray(image).astype(int)  # rows x columns x RGB
    white = (px.min(axis=2) > 245).mean()
    dark = int((px.max(axis=2) < 80).sum())  # text and the darkest heatmap cells
    # colour: the magma heatmaps and the k-NN curves, not only grey text
    coloured = int((px.max(axis=2) - px.min(axis=2) > 60).sum())
    assert white < 0.97, "the page is blank"
    assert dark > 2000, "no text or dark figure cells were drawn"
    assert coloured > 10000, "no figure was drawn"
    # the title sits at the top: dark pixels in the first 120 rows
    assert (px[:120].max(axis=2) < 80).sum() > 200, "no title at the top of the page"
