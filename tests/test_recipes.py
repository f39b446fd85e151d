"""The shipped recipes stay valid: every name resolves and every parameter validates."""

from __future__ import annotations

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
