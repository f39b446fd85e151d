"""Fine-tuning: a snapshot per epoch, path lengths, fine-tuned entries built from the registry."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from repsim_minizoo import cache, zoo
from repsim_minizoo.config import TINY
from repsim_minizoo.finetune import PathMeter, finetune, param_group_of
from repsim_minizoo.vit import build_vit


def test_snapshots_every_epoch_and_path_lengths() -> None:
    backbone = build_vit(TINY.arch, 0, num_classes=0).state_dict()
    saved: dict[int, dict[str, torch.Tensor]] = {}
    state, record = finetune(backbone, TINY.arch, TINY.finetune, 0,
                             lambda e, s: saved.setdefault(e, {k: v.clone() for k, v in s.items()}),
                             progress=False)
    assert sorted(saved) == list(range(TINY.finetune.epochs + 1))  # epoch 0 = the start
    assert torch.equal(saved[0]["blocks.0.attn.qkv.weight"], backbone["blocks.0.attn.qkv.weight"])
    assert all(torch.equal(saved[TINY.finetune.epochs][k], state[k]) for k in state)
    groups = record["path"]["groups"]
    assert {"all", "attn", "mlp", "norm", "embed", "head", "blocks.0.attn"} <= groups.keys()
    for g in groups.values():  # a path is never shorter than the straight line
        assert 0 < g["displacement"] <= g["path_length"] * (1 + 1e-9)
        assert 0 < g["efficiency"] <= 1 + 1e-9
    assert record["steps"] == TINY.finetune.epochs * math.ceil(1437 / TINY.finetune.batch_size)


def test_path_meter_of_a_straight_and_a_detour_path() -> None:
    lin = torch.nn.Linear(1, 1, bias=False)
    meter = PathMeter(lin)
    with torch.no_grad():
        for delta in (1.0, 1.0, -1.0):  # +1, +1, −1: displacement 1, path length 3
            lin.weight += delta
            meter.step()
    summary = meter.summary()["tensors"]["weight"]
    assert summary["displacement"] == 1.0 and summary["path_length"] == 3.0
    assert summary["efficiency"] == 1 / 3


def test_parameter_groups() -> None:
    assert param_group_of("blocks.3.attn.qkv.weight") == ["all", "attn", "blocks.3.attn"]
    assert param_group_of("blocks.3.norm1.bias") == ["all", "norm"]
    assert param_group_of("blocks.0.mlp.fc1.weight") == ["all", "mlp"]
    assert param_group_of("pos_embed") == ["all", "embed"]
    assert param_group_of("head.weight") == ["all", "head"]


def test_finetuned_entry_caches_snapshots_and_builds(tmp_cache: Path) -> None:
    from repsim.plugins import registry

    model = registry("model").get("minizoo_mae_ft").create({"preset": "tiny", "progress": False})
    prov = model.provenance
    snaps = [Path(p) for p in prov["snapshots"]]
    assert [p.name for p in snaps] == [f"epoch_{e:03d}.safetensors"
                                       for e in range(TINY.finetune.epochs + 1)]
    assert all(p.is_file() and tmp_cache in p.parents for p in snaps)
    assert 0 < prov["path_efficiency"]["attn"] <= 1
    assert cache.entry_path("mae", zoo.pretrained_key("mae", TINY, 0)).is_file()  # its start
    first = registry("model").get("minizoo_mae_ft").create({"preset": "tiny", "epoch": 0,
                                                            "progress": False})
    pre = registry("model").get("minizoo_mae").create({"preset": "tiny", "progress": False})
    w = "blocks.1.attn.qkv.weight"
    assert torch.equal(first.module.state_dict()[w], pre.module.state_dict()[w])
    assert not torch.equal(model.module.state_dict()[w], pre.module.state_dict()[w])
    x = torch.stack([model.preprocess(torch.rand(1, 8, 8)) for _ in range(3)])
    assert model.module(x).shape == (3, 10)  # class scores
