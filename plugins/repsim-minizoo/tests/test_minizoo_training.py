"""A few optimiser steps of each objective lower its loss; training is deterministic per seed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from repsim_minizoo import objectives
from repsim_minizoo.config import PRETRAINED, TINY, Preset
from repsim_minizoo.data import digits
from repsim_minizoo.train import param_groups, pretrain
from repsim_minizoo.vit import build_vit

# Over a handful of steps DINO's centring flattens the teacher's targets on purpose, which raises
# the loss; with the centre held at zero the student's fit to the teacher is what is measured.
SMOKE_OVERRIDES = {"dino": {"centre_momentum": 1.0}}


@pytest.mark.parametrize("name", PRETRAINED)
def test_a_few_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    images, labels = digits("train", TINY.arch.img_size)
    images, labels = images[:32], labels[:32]
    module = objectives.load(name)
    cfg = module.Config(**{**TINY.objective_overrides.get(name, {}),
                           **SMOKE_OVERRIDES.get(name, {})})
    vit = build_vit(TINY.arch, 0, num_classes=None if module.OBJECTIVE.keeps_head else 0)
    obj = module.OBJECTIVE(vit, cfg)
    obj.train()
    opt = torch.optim.AdamW(param_groups(obj, 0.0), lr=3e-3)

    def loss() -> torch.Tensor:  # the same views and masks every time: a fixed objective
        return obj.loss(images, labels, torch.Generator().manual_seed(7), 1.0)

    with torch.no_grad():
        first = float(loss())
    for _ in range(8):
        step_loss = loss()
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        obj.after_step(1.0)
    assert torch.isfinite(step_loss)
    with torch.no_grad():
        assert float(loss()) < first


def _short(name: str) -> Preset:
    return dataclasses.replace(TINY, schedules={name: dataclasses.replace(TINY.schedules[name],
                                                                         steps=3)})


def test_pretraining_is_deterministic_and_shares_the_initialisation() -> None:
    a, rec_a = pretrain("mae", _short("mae"), seed=0, progress=False)
    b, rec_b = pretrain("mae", _short("mae"), seed=0, progress=False)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rec_a["loss_curve"] == rec_b["loss_curve"]
    assert {"loss_first", "loss_final", "train_seconds", "cpu_seconds"} <= rec_a.keys()
    # every objective starts from the same backbone: the untrained network of the same seed
    init = build_vit(TINY.arch, 0, num_classes=0).state_dict()
    sup = build_vit(TINY.arch, 0).state_dict()
    assert all(torch.equal(init[k], sup[k]) for k in init)
    c, _ = pretrain("mae", _short("mae"), seed=1, progress=False)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("name", ["mocov3", "supervised"])  # EMA + projector heads; plain
def test_weights_do_not_depend_on_the_thread_count(name: str, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    """Training pins its own thread count: the ambient torch threads and $REPSIM_THREADS of the
    machine do not change a single bit of the weights."""
    runs = []
    for ambient in (1, 2):
        monkeypatch.setenv("REPSIM_THREADS", str(ambient))
        torch.set_num_threads(ambient)
        runs.append(pretrain(name, _short(name), seed=0, progress=False))
    (a, rec_a), (b, rec_b) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rec_a["loss_curve"] == rec_b["loss_curve"]
    assert rec_a["threads"] == rec_b["threads"] == 1
    assert torch.get_num_threads() == 2  # the caller's setting is given back
