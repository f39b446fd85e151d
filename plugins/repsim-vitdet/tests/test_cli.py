"""``repsim run`` / ``validate`` with ``vitdet``: what a run writes, and bad input → exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from repsim.cli import cli

RECIPE = """\
[run]
seed = 0
batch_size = 4
examples = 4
output = "{out}"
device = "cpu"

[data]
dataset = "coco_shapes"
params = {{ val_images = 4, size = 64 }}

[models.vit]
model = "timm"

[models.vit.params]
arch = "vit_tiny_patch16_224"
kwargs = {{ img_size = 64, depth = 2, embed_dim = 32, num_heads = 2, num_classes = 0 }}

[models.cnn]
model = "timm"
params = {{ arch = "resnet18", kwargs = {{ num_classes = 0 }} }}
reduce = "gap"
layers = {{ blocks = "layer4" }}

[layers]
blocks = "blocks.*"

[[evaluators]]
name = "vitdet"
params = {{ {params} }}
"""
TINY = ('image_size = 64, channels = 16, box_fc = 32, mask_convs = 1, batch_size = 2, '
        'micro_batch_size = 2, steps = 2, checkpoint_every = 1, milestones = [], '
        'warmup_steps = 0, progress = false, roi_batch_size = 16, '
        'data = { dataset = "coco_shapes", params = { train_images = 2, val_images = 2, '
        'size = 64 } }')


def run(tmp_path: Path, params: str, command: str = "run") -> object:
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(out=tmp_path / "run", params=params))
    return CliRunner().invoke(cli, [command, str(path)])


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_run_writes_the_tables_and_the_figure(tmp_path: Path) -> None:
    result = run(tmp_path, TINY + ', models = ["vit"], blocks = [[-1], [0, 1]]')
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "evaluators" / "vitdet"
    for name in ("coco_ap.md", "frozen_last.md", "frozen_blocks0-1.md", "ap_by_blocks.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "result.json").read_text())
    assert [r["blocks"] for r in saved["data"]["runs"]] == [[-1], [0, 1]]
    assert set(saved["data"]["runs"][0]["ap"]) == {"bbox", "segm"}
    assert "box AP" in (out / "frozen_last.md").read_text()


def test_non_vit_model_given_to_vitdet(tmp_path: Path) -> None:
    assert_user_error(run(tmp_path, TINY + ', models = ["cnn"]'),
                      "model 'cnn' is not a timm Vision Transformer")


def test_missing_annotation_file(tmp_path: Path) -> None:
    params = TINY.replace('data = { dataset = "coco_shapes", params = { train_images = 2, '
                          'val_images = 2, size = 64 } }',
                          f'data = {{ dataset = "coco", params = {{ root = "{tmp_path}" }} }}')
    assert_user_error(run(tmp_path, params + ', models = ["vit"]'),
                      "instances_val2017.json' does not exist")


@pytest.mark.parametrize("params, needle", [
    ('data = { dataset = "cocoo" }', "unknown dataset 'cocoo'"),
    ('data = { dataset = "coco_shapes", params = { sizes = 3 } }', "sizes"),
    ('backbone = "thawed"', "backbone"),
    ("steps = 10, checkpoint_every = 3", "multiple of checkpoint_every"),
    ('data = { dataset = "coco", params = { root = "no/such/coco" } }',
     "data.params.root: 'no/such/coco' does not exist"),
])
def test_validate_catches_bad_parameters(tmp_path: Path, params: str, needle: str) -> None:
    assert_user_error(run(tmp_path, params, command="validate"), needle)


@pytest.mark.slow
def test_smoke_recipe_learns_to_detect(tmp_path: Path) -> None:
    """The CPU recipe of the README end to end (minutes): every variant well above chance."""
    recipe = Path(__file__).parents[1] / "recipes" / "vitdet_smoke.toml"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "evaluators"
    runs = [r for key in ("vitdet_frozen", "vitdet_finetune")
            for r in json.loads((out / key / "result.json").read_text())["data"]["runs"]]
    assert [(r["backbone"], r["blocks"]) for r in runs] == [
        ("frozen", [-1]), ("frozen", [8, 9, 10, 11]), ("finetune", [-1])]
    for r in runs:
        assert r["ap"]["bbox"]["AP50"] > 0.1 and r["ap"]["segm"]["AP50"] > 0.1, r
