"""The paper's locations in one place: ${REPSIM_*} in recipes from the environment, the user's
paths file, or the defaults; unset or malformed references are errors naming file, field and
variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from repsim.errors import RecipeError
from repsim.paths import config_file, hint, resolve
from repsim.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No paths file and none of the variables, whatever the machine has."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("REPSIM_IMAGENET", "REPSIM_COCO", "REPSIM_CHECKPOINTS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def recipe(tmp_path: Path, root: str, checkpoint: str = "${REPSIM_CHECKPOINTS}/a.pth") -> Path:
    path = tmp_path / "r.toml"
    path.write_text(f"""
[data]
dataset = "imagefolder"
params = {{ root = "{root}" }}

[models.a]
model = "timm"
params = {{ arch = "resnet18", checkpoint = "{checkpoint}" }}

[layers]
blocks = "layer*"

[[metrics]]
name = "minibatch_cka"
""")
    return path


def test_defaults_apply_when_nothing_is_set(tmp_path: Path) -> None:
    r = load_recipe(recipe(tmp_path, "${REPSIM_IMAGENET}"))
    assert r.data.params["root"] == "data/imagenet"
    assert r.models["a"].params["checkpoint"] == "checkpoints/a.pth"
    assert "the default" in resolve("REPSIM_COCO").source


def test_the_environment_wins_over_the_paths_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config_file().parent.mkdir(parents=True)
    config_file().write_text('imagenet = "/from/file"\ncheckpoints = "ckpt"\n')
    r = load_recipe(recipe(tmp_path, "${REPSIM_IMAGENET}"))
    assert r.data.params["root"] == "/from/file"
    # a relative entry of the paths file is relative to the file's folder
    assert r.models["a"].params["checkpoint"] == str(config_file().parent / "ckpt" / "a.pth")
    monkeypatch.setenv("REPSIM_IMAGENET", "/from/env")
    assert load_recipe(recipe(tmp_path, "${REPSIM_IMAGENET}")).data.params["root"] == "/from/env"
    assert "environment" in resolve("REPSIM_IMAGENET").source


def test_an_unset_variable_names_file_field_and_how_to_set_it(tmp_path: Path) -> None:
    path = recipe(tmp_path, "${MY_DATA}/imagenet")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg and "data.params.root" in msg and "${MY_DATA}" in msg
    assert "export MY_DATA=" in msg


def test_an_included_file_is_named_in_the_error(tmp_path: Path) -> None:
    recipe(tmp_path, "${NOT_SET_ANYWHERE}")
    top = tmp_path / "top.toml"
    top.write_text('include = ["r.toml"]\n')
    with pytest.raises(RecipeError, match=r"r\.toml: data\.params\.root uses \$\{NOT_SET"):
        load_recipe(top)


def test_a_malformed_reference_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="malformed reference"):
        load_recipe(recipe(tmp_path, "${REPSIM IMAGENET}"))


def test_a_bad_paths_file_is_named(tmp_path: Path) -> None:
    config_file().parent.mkdir(parents=True)
    config_file().write_text('imagenett = "/x"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe(tmp_path, "${REPSIM_IMAGENET}"))
    assert str(config_file()) in str(info.value) and "imagenett" in str(info.value)


def test_the_paper_recipes_use_the_locations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPSIM_CHECKPOINTS", "/ckpt")
    monkeypatch.setenv("REPSIM_IMAGENET", "/in1k")
    monkeypatch.setenv("REPSIM_COCO", "/coco")
    r = load_recipe(RECIPES / "paper.toml")
    assert r.data.params["root"] == "/in1k"
    files = [m.params["checkpoint"] for m in r.models.values() if "checkpoint" in m.params]
    assert len(files) == 8 and all(f.startswith("/ckpt/") for f in files)
    vitdet = [e for e in r.evaluators if e.name == "vitdet"]
    assert vitdet and all(e.params["data"]["params"]["root"] == "/coco" for e in vitdet)
    from repsim.finetune.config import load_finetune_recipe

    ft = load_finetune_recipe(RECIPES / "paper/finetune_mae.toml")
    assert str(ft.model.params["checkpoint"]).startswith("/ckpt/")


def test_hint_names_the_variable_of_a_missing_file() -> None:
    text = hint("checkpoints/vit-b-300ep.pth.tar")
    assert text is not None and "REPSIM_CHECKPOINTS" in text and "paths.toml" in text
    assert hint("elsewhere/file.pth") is None
