"""The entry point registers the parts, without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from repsim.errors import RecipeError
from repsim.plugins import registry
from repsim_vitdet.params import PRESETS


def test_registered_through_the_entry_point() -> None:
    assert {"coco", "coco_shapes"} <= set(registry("dataset").names())
    assert registry("evaluator").get("vitdet").provider == "repsim-vitdet"


def test_plugin_import_does_not_import_torch() -> None:
    code = ("import sys; from repsim.plugins import registry; registry('evaluator'); "
            "import repsim_vitdet.plugin; print('torch' in sys.modules, 'pycocotools' in "
            "sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_presets_fill_what_is_not_given_and_single_values_become_lists() -> None:
    part = registry("evaluator").get("vitdet")
    paper = part.validate({"preset": "paper", "backbone": "finetune", "blocks": [8, 9, 10, 11]})
    assert paper.image_size == 1024 and paper.steps == 184375 and paper.layer_decay == 0.7
    assert paper.backbone == ["finetune"] and paper.blocks == [[8, 9, 10, 11]]
    smoke = part.validate({"steps": 50, "checkpoint_every": 25, "milestones": [40]})
    assert smoke.image_size == PRESETS["smoke"]["image_size"] and smoke.steps == 50
    with pytest.raises(RecipeError, match="a block appears twice"):
        part.validate({"blocks": [[1, 1]]})
    with pytest.raises(RecipeError, match="must not repeat"):
        part.validate({"backbone": ["frozen", "frozen"]})
