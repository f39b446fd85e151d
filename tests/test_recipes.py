"""The shipped recipes stay valid: every name resolves and every parameter validates."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from repsim.errors import RecipeError
from repsim.recipe import check_recipe, embedded_recipes

RECIPES = Path(__file__).parents[1] / "recipes"


def test_embedded_recipes_are_the_shipped_ones() -> None:
    assert set(embedded_recipes()) == {p.stem for p in RECIPES.glob("*.toml")}


def test_paper_recipe_only_lacks_the_data_and_checkpoint_files() -> None:
    with pytest.raises(RecipeError) as info:
        check_recipe(RECIPES / "paper.toml")
    problems = [ln for ln in str(info.value).splitlines() if ln.startswith("- ")]
    assert problems, str(info.value)
    assert all("does not exist" in p for p in problems), str(info.value)
    missing = " ".join(problems)
    assert "data/imagenet" in missing and "dino_vitbase16_pretrain.pth" in missing


def test_mini_recipe_validates() -> None:
    checked = check_recipe(RECIPES / "mini.toml")
    assert len(checked.recipe.models) >= 2 and checked.recipe.metrics


FIGURES = sorted(p for p in (RECIPES / "paper").glob("*.toml")  # the figures' own recipes
                 if "include" in tomllib.loads(p.read_text()) and p.stem.startswith(("fig", "park")))


@pytest.mark.parametrize("path", FIGURES, ids=[p.stem for p in FIGURES])
def test_each_figure_recipe_only_lacks_the_data_and_checkpoint_files(path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        check_recipe(path)
    problems = [ln for ln in str(info.value).splitlines() if ln.startswith("- ")]
    assert problems and all("does not exist" in p for p in problems), str(info.value)


def test_the_paper_recipe_is_its_figures_with_shared_models_once() -> None:
    from repsim.recipe import load_recipe

    paper = load_recipe(RECIPES / "paper.toml")
    figures = [load_recipe(p) for p in FIGURES]
    assert set(paper.models) == {m for f in figures for m in f.models}
    assert [m.key for m in paper.metrics] == ["minibatch_cka"]  # included by every figure, once
    assert {e.key for e in paper.evaluators} == {e.key for f in figures for e in f.evaluators}
    assert paper.run.output == Path("runs/paper")
    assert load_recipe(RECIPES / "paper/fig3.toml").run.output == Path("runs/paper/fig3")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_include_merges_and_the_including_file_wins(tmp_path: Path) -> None:
    from repsim.recipe import load_recipe

    write(tmp_path / "base.toml", '[run]\nseed = 3\nbatch_size = 8\n[data]\ndataset = "digits"\n'
          '[models.a]\nmodel = "timm"\nparams = { arch = "vit_tiny_patch16_224" }\n'
          '[layers]\nblocks = "blocks.*"\n[[metrics]]\nname = "minibatch_cka"\n')
    top = write(tmp_path / "top.toml", 'include = ["base.toml"]\n[run]\nseed = 5\n'
                '[[metrics]]\nname = "minibatch_cka"\n[[metrics]]\nname = "linear_cka"\n')
    r = load_recipe(top)
    assert (r.run.seed, r.run.batch_size) == (5, 8)
    assert [m.name for m in r.metrics] == ["minibatch_cka", "linear_cka"]


def test_include_errors_name_the_files(tmp_path: Path) -> None:
    from repsim.recipe import load_recipe

    a = write(tmp_path / "a.toml", 'include = ["b.toml"]\n')
    write(tmp_path / "b.toml", 'include = ["a.toml"]\n')
    with pytest.raises(RecipeError, match=r"include cycle .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_recipe(a)
    gone = write(tmp_path / "c.toml", 'include = ["nowhere.toml"]\n')
    with pytest.raises(RecipeError, match="c.toml: included recipe 'nowhere.toml' does not exist"):
        load_recipe(gone)
    write(tmp_path / "m1.toml", '[models.a]\nmodel = "timm"\n')
    write(tmp_path / "m2.toml", '[models.a]\nmodel = "callable"\n')
    clash = write(tmp_path / "d.toml", 'include = ["m1.toml", "m2.toml"]\n')
    with pytest.raises(RecipeError, match=r"m2.toml: models.a is defined differently in .*m1.toml"):
        load_recipe(clash)
    bad = write(tmp_path / "e.toml", 'include = "m1.toml"\n')
    with pytest.raises(RecipeError, match="must be a list"):
        load_recipe(bad)
