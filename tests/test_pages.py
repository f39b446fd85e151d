"""The run report: sections in the papers' order, each present or marked missing with the reason;
one self-contained page (figures embedded, nothing fetched) and a markdown twin."""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from repsim.errors import RecipeError
from repsim.pages import SECTIONS, build_report
from repsim.recipe import check_recipe
from repsim.run import Run


def make_run(tmp_path: Path, write_recipe) -> Path:
    path = write_recipe(run="bootstrap = 20\ntrain_examples = 24", extra=textwrap.dedent("""
        [[evaluators]]
        name = "knn"
        params = { k = 5 }
        """), layers='blocks = "blocks.*"\nnorm1 = "blocks.*.norm1"')
    return Run(check_recipe(path), tmp_path / "run", progress=False, quiet=True).execute()


def test_report_holds_every_section_in_order(write_recipe, tmp_path: Path) -> None:
    run = make_run(tmp_path, write_recipe)
    page = (run / "report/index.html").read_text()  # the run wrote it at the end
    positions = [page.index(f'id="{s.key}"') for s in SECTIONS]
    assert positions == sorted(positions)
    assert "Not in this run: the recipe has no vitdet evaluator." in page
    fig1 = page[page.index('id="fig1"'):page.index('id="fig2"')]
    assert "data:image/png;base64," in fig1 and "N = 40 examples" in fig1 and "minibatch 8" in fig1
    assert "bootstrap interval" in fig1  # the intervals the run computed
    knn = page[page.index('id="fig3"'):page.index('id="fig2a"')]
    assert "data:image/png;base64," in knn and "knn: " in knn
    assert not re.search(r"""(src|href)=["']https?:""", page)  # nothing fetched
    md = (run / "report/report.md").read_text()
    assert "## Fig. 1" in md and "![fig1_blocks](fig1_blocks.png)" in md
    assert (run / "report/fig1_blocks.png").stat().st_size > 1000


def test_report_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a repsim run directory"):
        build_report(tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium is not installed (Debian package chromium)")
def test_report_renders_in_a_headless_browser(write_recipe, tmp_path: Path) -> None:
    run = make_run(tmp_path, write_recipe)
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2400",
                    (run / "report/index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
