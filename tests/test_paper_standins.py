"""The stand-in rehearsal: the paper's recipe with miniatures for the official models, digits for
ImageNet and coco_shapes for COCO, run end to end so every change exercises it. The whole
recipe is marked slow (about a minute warm); a cut-down variant of four figures runs by
default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repsim.cli import cli
from repsim.pages import SECTIONS
from repsim.recipe import CheckedRecipe, load_recipe
from repsim.standins import DETECTOR_VIT, miniature_depth, stand_in

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(autouse=True)
def no_data_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ImageNet, COCO or checkpoints anywhere; the miniatures train into a fresh cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REPSIM_THREADS", "1")
    for name in ("REPSIM_IMAGENET", "REPSIM_COCO", "REPSIM_CHECKPOINTS"):
        monkeypatch.delenv(name, raising=False)


def test_every_official_part_is_replaced_and_nothing_is_needed_from_disk() -> None:
    paper = load_recipe(RECIPES / "paper.toml")
    rehearsal, lines = stand_in(paper)
    assert set(rehearsal.models) == set(paper.models) | {DETECTOR_VIT}
    for label, m in rehearsal.models.items():
        assert m.model.startswith("minizoo_") or (m.model == "timm"
                                                  and "checkpoint" not in m.params), label
        assert m.reduce == (paper.models[label].reduce if label in paper.models else None)
    assert rehearsal.models["mae_finetuned"].model == "minizoo_mae_ft"
    assert rehearsal.models["mae_ft"].model == "minizoo_mae_ft"
    assert rehearsal.models["resnet50_dino"].params["arch"] == "resnet10t"
    assert rehearsal.data.dataset == "digits"
    assert {e.params["data"]["dataset"] for e in rehearsal.evaluators if e.name == "vitdet"} \
        == {"coco_shapes"}
    # the same figures: layer groups, metrics and evaluators as the paper's
    assert set(rehearsal.layers) == set(paper.layers)
    assert [m.key for m in rehearsal.metrics] == [m.key for m in paper.metrics]
    assert [e.key for e in rehearsal.evaluators] == [e.key for e in paper.evaluators]
    # blocks 8-11 of a 12-block ViT move to the same relative depth of the miniature
    depth = miniature_depth()
    last = sorted({b * depth // 12 for b in (8, 9, 10, 11)})
    concat = next(e for e in rehearsal.evaluators if e.key == "linear_probe_concat")
    assert concat.params["layers"] == [[f"blocks.{b}" for b in last]]
    assert all(b < depth for b in last)
    frozen = next(e for e in rehearsal.evaluators if e.key == "vitdet_frozen")
    assert frozen.params["blocks"] == [[-1], last] and frozen.params["models"] == [DETECTOR_VIT]
    # the detector's ViT is in no model pair
    assert all(DETECTOR_VIT not in pair for pair in rehearsal.model_pairs())
    assert rehearsal.run.output == Path("runs/paper-standins")
    assert any("minizoo_mocov3" in ln for ln in lines)
    checked = CheckedRecipe(rehearsal, RECIPES / "paper.toml", missing_ok=True)
    assert checked.missing == []


def _sections(run_dir: Path) -> dict[str, str]:
    """Each section of the report's markdown: its title -> its text."""
    md = (run_dir / "report/report.md").read_text()
    parts = md.split("\n## ")[1:]
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts}


def test_four_figures_rehearse_end_to_end(runner, tmp_path: Path) -> None:
    """Fig. 1 (ViT miniatures, bootstrap), Fig. 2c (a probe on blocks mapped to the miniature's
    depth), Tables 6-7 (the detector on coco_shapes) and Fig. 11 (CNN stand-ins, CKA against
    depth), through the CLI as a user runs it."""
    recipe = tmp_path / "four.toml"
    figures = ", ".join(f'"{RECIPES / "paper" / f}.toml"'
                        for f in ("fig1", "fig2c", "fig7_tables6_7", "fig11"))
    recipe.write_text(f'include = [{figures}]\n[run]\noutput = "runs/four"\n')
    result = runner.invoke(cli, ["run", str(recipe), "--stand-ins"])
    assert result.exit_code == 0, result.output
    assert "Stand-in rehearsal" in result.output and "GFLOP/s" in result.output
    run_dir = tmp_path / "runs/four-standins"
    resolved = json.loads((run_dir / "resolved.json").read_text())
    assert resolved["data"]["dataset"] == "digits"
    for name in ("linear_probe_concat", "cka_vs_depth", "vitdet_frozen", "vitdet_finetune"):
        assert (run_dir / f"evaluators/{name}/result.json").is_file(), name
    sections = _sections(run_dir)
    assert len(sections) == len(SECTIONS) + 1  # and provenance
    fig1 = sections["Fig. 1 — CKA between the blocks of every pair of models"]
    assert "fig1_blocks.png" in fig1 and "bootstrap interval" in fig1
    assert "resnet50_dino" not in fig1  # the CNNs are Fig. 11's, not Fig. 1's
    assert "Not in this run" not in sections["Fig. 11 — CKA against relative depth"]
    assert "Not in this run" not in sections["Fig. 2c / 5 — linear probes"]
    assert "Not in this run" not in sections["Tables 6–7 / Fig. 7 — ViTDet transfer"]
    assert "*Not in this run: the recipe has no knn evaluator.*" in \
        sections["Fig. 3 / 12 — k-NN accuracy per block"]
    assert (tmp_path / "cache/cpu_throughput.json").is_file()


@pytest.mark.slow
def test_the_paper_recipe_rehearses_end_to_end(runner, tmp_path: Path) -> None:
    """`repsim run recipes/paper.toml --stand-ins`: every figure of the papers present; only the
    miniature study's own section (paper_observations) is marked not in this run."""
    result = runner.invoke(cli, ["run", str(RECIPES / "paper.toml"), "--stand-ins", "--quiet"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs/paper-standins"
    for e in load_recipe(RECIPES / "paper.toml").evaluators:
        assert (run_dir / f"evaluators/{e.key}/result.json").is_file(), e.key
    sections = _sections(run_dir)
    missing = [title for title, text in sections.items() if "Not in this run" in text]
    assert missing == ["The papers' observations, measured"], missing
    vitdet = sections["Tables 6–7 / Fig. 7 — ViTDet transfer"]
    assert "AP" in vitdet
    page = (run_dir / "report/index.html").read_text()
    assert page.count("data:image/png;base64,") >= 10
