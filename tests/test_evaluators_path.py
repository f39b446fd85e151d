"""Path efficiency: exact values on straight and right-angle paths, groups, files, exclusions."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import save_file

from repsim.errors import CheckpointError
from repsim.evaluators.path import (DEFAULT_BLOCK, DEFAULT_LAYER_TYPES, find_snapshots,
                                    path_efficiency, path_efficiency_report)


def snaps(*points, key="blocks.0.attn.qkv.weight"):
    return [{key: torch.tensor(p, dtype=torch.float32)} for p in points]


def test_straight_path_is_exactly_one():
    assert path_efficiency(snaps([0.0, 0.0], [1.0, 2.0], [3.0, 6.0]))["all"] == 1.0


def test_right_angle_of_equal_legs():
    eff = path_efficiency(snaps([0.0, 0.0], [1.0, 0.0], [1.0, 1.0]))["all"]
    assert eff == pytest.approx(1 / math.sqrt(2), rel=1e-15)


def test_going_back_and_forth():
    # 0 -> 2 -> 1: displacement 1, path length 3.
    assert path_efficiency(snaps([0.0], [2.0], [1.0]))["all"] == pytest.approx(1 / 3)


def test_groups_by_type_and_block():
    # attention moves straight (0 -> 1 -> 2); the MLP weight makes a right angle.
    states = [{"blocks.0.attn.qkv.weight": torch.tensor(attn),
               "blocks.0.mlp.fc1.weight": torch.tensor(mlp),
               "blocks.1.norm1.weight": torch.tensor([1.0])}
              for attn, mlp in [([0.0], [0.0, 0.0]), ([1.0], [1.0, 0.0]), ([2.0], [1.0, 1.0])]]
    eff = path_efficiency(states)
    assert eff["attention"] == 1.0
    assert eff["mlp"] == pytest.approx(1 / math.sqrt(2))
    assert eff["blocks.0/attention"] == 1.0
    # Block 0 together: steps of norm sqrt(2) each, displacement sqrt(4 + 2).
    assert eff["blocks.0"] == pytest.approx(math.sqrt(6) / (2 * math.sqrt(2)))
    assert eff["all"] == eff["blocks.0"]  # the norm weight never moves
    assert math.isnan(eff["norm"]) and math.isnan(eff["blocks.1"])


def test_new_head_buffers_and_unshared_keys_are_excluded():
    base = snaps([0.0], [1.0], [2.0])
    for i, s in enumerate(base):
        s["head.weight"] = torch.tensor([[0.0, 5.0][i % 2]])  # the new classifier wanders
        s["blocks.0.norm1.running_mean"] = torch.tensor([float(i % 2)])
    r = path_efficiency_report(base)
    assert r.efficiency["all"] == 1.0
    assert r.excluded == ["blocks.0.norm1.running_mean", "head.weight"]
    # Only keys the pretrained checkpoint holds with the same shape count.
    base[0]["blocks.0.extra.weight"] = torch.zeros(3)
    for s in base[1:]:
        s["blocks.0.extra.weight"] = torch.randn(3)
    reference = {"blocks.0.attn.qkv.weight": torch.zeros(1),
                 "blocks.0.extra.weight": torch.zeros(4)}
    assert path_efficiency(base, reference=reference)["all"] == 1.0
    assert path_efficiency(base)["all"] < 1.0


def test_snapshot_missing_a_key_is_an_error():
    states = snaps([0.0], [1.0])
    states[1] = {"other": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="lacks"):
        path_efficiency(states)


def test_files_folder_and_glob_in_natural_order(tmp_path):
    points = {0: [0.0, 0.0], 2: [1.0, 0.0], 10: [1.0, 1.0]}  # epoch_10 must come last
    for epoch, p in points.items():
        save_file({"blocks.0.attn.qkv.weight": torch.tensor(p)},
                  tmp_path / f"epoch_{epoch}.safetensors")
    by_folder = find_snapshots(str(tmp_path))
    names = [f.rsplit("/", 1)[1] for f in by_folder]
    assert names == [f"epoch_{e}.safetensors" for e in (0, 2, 10)]
    assert find_snapshots(str(tmp_path / "epoch_*.safetensors")) == by_folder
    assert path_efficiency(by_folder)["all"] == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(CheckpointError, match="no snapshot"):
        find_snapshots(str(tmp_path / "nothing_*.safetensors"))


@pytest.mark.parametrize("name,kind,block", [
    ("blocks.3.attn.qkv.weight", "attention", "blocks.3"),
    ("blocks.3.attn.proj.bias", "attention", "blocks.3"),
    ("blocks.3.norm1.weight", "norm", "blocks.3"),
    ("blocks.11.mlp.fc1.weight", "mlp", "blocks.11"),
    ("blocks.3.ls1.gamma", "other", "blocks.3"),
    ("patch_embed.proj.weight", "embed", None),
    ("cls_token", "embed", None),
    ("pos_embed", "embed", None),
    ("norm.weight", "norm", None),
    ("layer2.1.conv1.weight", "conv", "layer2.1"),
    ("layer2.1.bn1.weight", "norm", "layer2.1"),
    ("stages.1.blocks.2.conv_dw.weight", "conv", "stages.1.blocks.2"),
    ("stages.1.blocks.2.mlp.fc2.weight", "mlp", "stages.1.blocks.2"),
    ("encoder.layer.7.attention.attention.query.weight", "attention", "encoder.layer.7"),
])
def test_default_layer_types_and_blocks(name, kind, block):
    found = next((t for t, p in DEFAULT_LAYER_TYPES.items() if re.search(p, name)), "other")
    assert found == kind
    m = re.search(DEFAULT_BLOCK, name)
    assert (m.group(1) if m else None) == block


def test_snapshots_come_from_a_models_provenance(tmp_path) -> None:
    from repsim.evaluators.context import InMemoryContext
    from repsim.evaluators.params import PathEfficiencyParams
    from repsim.evaluators.path import PathEfficiencyEvaluator

    paths = []
    for i, w in enumerate(([0.0, 0.0], [1.0, 0.0], [1.0, 1.0])):  # a right angle of equal legs
        paths.append(str(tmp_path / f"epoch_{i}.safetensors"))
        save_file({"blocks.0.attn.qkv.weight": torch.tensor(w)}, paths[-1])
    ctx = InMemoryContext(models=["ft"], model_info={"ft": {"provenance": {"snapshots": paths}}})
    ev = PathEfficiencyEvaluator(PathEfficiencyParams(models=["ft"]))
    result = ev.evaluate(ctx)
    row = next(r for r in result.tables["efficiency"][1] if r[0] == "ft" and r[1] == "all")
    assert row[2] == pytest.approx(2 ** -0.5)
