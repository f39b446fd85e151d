"""Training the detector: it learns, frozen means frozen, checkpoints resume exactly, DDP runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from repsim.evaluators.access import ModelAccess
from repsim.evaluators.context import InMemoryContext
from repsim.plugins import build_part
from repsim.run.device import DeviceSettings
from repsim_vitdet.evaluator import weights_hash
from repsim_vitdet.model import build_detector
from repsim_vitdet.train import fit

# A handful of generated images, trained on and scored on (overfitting).
HANDFUL = {"dataset": "coco_shapes", "params": {"train_images": 4, "size": 64}}


def context(module: torch.nn.Module, label: str = "vit", family: str = "vit") -> InMemoryContext:
    from repsim.models.base import LoadedModel, Preprocess

    loaded = LoadedModel(module, Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3), label,
                         num_prefix_tokens=1, family=family)
    access = ModelAccess(label, loaded, DeviceSettings(torch.device("cpu")))
    return InMemoryContext(models=[label], model_access={label: access})


def evaluate(ctx: InMemoryContext, params) -> dict:
    from repsim_vitdet.evaluator import VitDetEvaluator

    return VitDetEvaluator(params).evaluate(ctx)


def test_overfitting_a_handful_with_a_frozen_random_vit(tiny_vit, vitdet_params) -> None:
    vit = tiny_vit()
    before = weights_hash(vit)
    params = vitdet_params(data=HANDFUL, eval_split="train", steps=120, checkpoint_every=60,
                           milestones=[100], warmup_steps=10, lr=1e-3, scale_range=(1.0, 1.0),
                           flip=False)
    res = evaluate(context(vit), params)
    run = res.data["runs"][0]
    box, mask = run["ap"]["bbox"], run["ap"]["segm"]
    assert box["AP50"] > 0.3 and box["AP"] > 0.1, box  # chance is ~0
    assert mask["AP50"] > 0.2, mask
    assert run["loss"][-1] < run["loss"][0]
    assert run["backbone_change"] == 0.0 and weights_hash(vit) == before
    headers, rows = res.tables["frozen_last"]  # Table 6's layout
    assert headers[1:4] == ["box AP", "box AP_large", "box AP_small"] and rows[0][0] == "vit"
    assert rows[0][1] == pytest.approx(100 * box["AP"], abs=0.01)
    assert "ap_by_blocks" in res.figures and res.figures["ap_by_blocks"]() is not None


def test_finetuning_changes_the_backbone_copy_only(tiny_vit, vitdet_params) -> None:
    vit = tiny_vit()
    before = weights_hash(vit)
    params = vitdet_params(data=HANDFUL, backbone=["frozen", "finetune"], blocks=[[-1], [1, 3]],
                           steps=2, checkpoint_every=1, milestones=[], warmup_steps=0,
                           eval_images=2)
    res = evaluate(context(vit), params)
    change = {(r["backbone"], tuple(r["blocks"])): r["backbone_change"] for r in res.data["runs"]}
    assert change[("frozen", (-1,))] == change[("frozen", (1, 3))] == 0.0
    assert change[("finetune", (-1,))] > 0 and change[("finetune", (1, 3))] > 0
    assert weights_hash(vit) == before  # the run's model is never trained
    assert set(res.tables) == {"coco_ap", "frozen_last", "frozen_blocks1-3", "finetune_last",
                               "finetune_blocks1-3"}
    assert len(res.tables["coco_ap"][1]) == 4 * 2  # every variant, box and mask


def test_a_non_vit_model_is_a_recipe_error(vitdet_params) -> None:
    from repsim.errors import RecipeError

    cnn = build_part("model", "timm", arch="resnet18", kwargs={"num_classes": 0}).module
    with pytest.raises(RecipeError, match="model 'cnn' is not a timm Vision Transformer"):
        evaluate(context(cnn, "cnn", "cnn"), vitdet_params(models=["cnn"]))
    with pytest.raises(RecipeError, match="no model of the run is a timm ViT"):
        evaluate(context(cnn, "cnn", "cnn"), vitdet_params())


def _detector(vit: torch.nn.Module, params) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(copy.deepcopy(vit), blocks=[3], frozen=False, num_classes=3,
                          image_size=params.image_size, channels=params.channels,
                          box_convs=params.box_convs, box_fc=params.box_fc,
                          mask_convs=params.mask_convs, proposals_train=params.proposals_train,
                          proposals_test=params.proposals_test,
                          roi_batch_size=params.roi_batch_size, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_resuming_from_a_checkpoint_is_exact(tiny_vit, vitdet_params, tmp_path: Path) -> None:
    vit = tiny_vit()
    data = build_part("dataset", "coco_shapes", split="train", train_images=4, size=64)
    settings = {"milestones": [], "warmup_steps": 0, "checkpoint_every": 1, "batch_size": 2,
                "micro_batch_size": 1}  # two micro-batches per step: accumulation too
    once = _detector(vit, vitdet_params(**settings, steps=2))
    fit(once, data, vitdet_params(**settings, steps=2), seed=0, checkpoint=None)
    path = tmp_path / "ckpt.pt"
    first = _detector(vit, vitdet_params(**settings, steps=1))
    fit(first, data, vitdet_params(**settings, steps=1), seed=0, checkpoint=path)
    resumed = _detector(vit, vitdet_params(**settings, steps=2))
    history = fit(resumed, data, vitdet_params(**settings, steps=2), seed=0, checkpoint=path)
    assert history.resumed_at == 1 and len(history.loss) == 2
    for (name, a), b in zip(once.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_distributed_training_wraps_in_ddp(tiny_vit, vitdet_params, tmp_path: Path) -> None:
    import torch.distributed as dist

    params = vitdet_params(steps=1, checkpoint_every=1, milestones=[], warmup_steps=0,
                           batch_size=2, micro_batch_size=2)
    data = build_part("dataset", "coco_shapes", split="train", train_images=2, size=64)
    det = _detector(tiny_vit(), params)
    start = copy.deepcopy(det.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        fit(det, data, params, seed=0, checkpoint=tmp_path / "c.pt", distributed=True)
        saved = torch.load(tmp_path / "c.pt", weights_only=True)["model"]
    finally:
        dist.destroy_process_group()
    assert all(k.startswith("module.") for k in saved)  # it trained through DDP
    assert any(not torch.equal(v, det.state_dict()[k]) for k, v in start.items())
