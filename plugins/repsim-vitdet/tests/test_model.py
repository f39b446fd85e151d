"""The detector's parts: backbone, feature pyramid, optimizer groups, schedule, augmentation."""

from __future__ import annotations

import pytest
import torch

from repsim.errors import RecipeError
from repsim.plugins import build_part
from repsim_vitdet.model import ViTBackbone, build_detector, check_blocks, check_vit
from repsim_vitdet.train import Jitter, augment, draw_plan, lr_factor, optimizer


def detector(vit: torch.nn.Module, blocks: list[int], frozen: bool = True) -> torch.nn.Module:
    return build_detector(vit, blocks=blocks, frozen=frozen, num_classes=3, image_size=64,
                          channels=16, box_convs=1, box_fc=32, mask_convs=1,
                          proposals_train=(50, 20), proposals_test=(50, 20), roi_batch_size=16,
                          mean=(0.5,) * 3, std=(0.5,) * 3)


def test_pyramid_has_vitdet_strides_and_channels(tiny_vit) -> None:
    backbone = ViTBackbone(tiny_vit(), [3], image_size=64, channels=16, frozen=True)
    out = backbone(torch.rand(2, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 16, s, s) for s in (16, 8, 4, 2, 1)]


def test_concatenated_blocks_are_projected_and_positions_resampled(tiny_vit) -> None:
    vit = tiny_vit(img_size=32)  # built for 32 px, detecting at 64: its 2×2 grid becomes 4×4
    assert vit.pos_embed.shape[1] == 1 + 2 * 2
    backbone = ViTBackbone(vit, [1, 2, 3], image_size=64, channels=16, frozen=True)
    assert backbone.vit.pos_embed.shape[1] == 1 + 4 * 4
    assert backbone.project[0].in_channels == 3 * 48
    assert backbone(torch.rand(1, 3, 64, 64))["0"].shape == (1, 16, 16, 16)


def test_roi_align_strides_stay_fixed_whatever_the_first_batch(tiny_vit) -> None:
    det = detector(tiny_vit(), [-1]).train()
    masks = torch.zeros(1, 20, 24, dtype=torch.uint8)
    masks[0, 2:12, 3:15] = 1
    target = {"boxes": torch.tensor([[3.0, 2.0, 15.0, 12.0]]), "labels": torch.tensor([1]),
              "masks": masks}
    det([torch.rand(3, 20, 24)], [target])  # a jittered-down image: torchvision would infer 1/2
    for pool in (det.roi_heads.box_roi_pool, det.roi_heads.mask_roi_pool):
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_unused_blocks_are_pruned_and_negative_indices_count_from_the_end(tiny_vit) -> None:
    backbone = ViTBackbone(tiny_vit(), [1], image_size=64, channels=16, frozen=True)
    assert len(backbone.vit.blocks) == 2 and backbone.indices == [1]
    assert check_blocks([-1], 4, "m") == [3]
    assert check_blocks([0, -2], 4, "m") == [0, 2]
    with pytest.raises(RecipeError, match="blocks \\[4\\] do not fit model 'm'"):
        check_blocks([4], 4, "m")


def test_frozen_backbone_has_no_gradients_and_stays_in_eval_mode(tiny_vit) -> None:
    det = detector(tiny_vit(), [-1], frozen=True).train()
    vit = det.backbone.vit
    assert not any(p.requires_grad for p in vit.parameters())
    assert not vit.training and det.backbone.pyramid.training
    tuned = detector(tiny_vit(), [-1], frozen=False).train()
    assert all(p.requires_grad for p in tuned.backbone.vit.parameters())
    assert tuned.backbone.vit.training


def test_non_vit_models_are_refused(tiny_vit) -> None:
    cnn = build_part("model", "timm", arch="resnet18", kwargs={"num_classes": 0})
    with pytest.raises(RecipeError, match="model 'cnn' is not a timm Vision Transformer"):
        check_vit(cnn.module, "cnn", cnn.family)
    check_vit(tiny_vit(), "vit", "vit")


def test_layer_decay_and_weight_decay_groups(tiny_vit) -> None:
    det = detector(tiny_vit(), [-1], frozen=False)
    opt = optimizer(det, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(det.named_parameters())
    lr = {n: where[id(p)]["lr"] for n, p in named.items()}
    wd = {n: where[id(p)]["weight_decay"] for n, p in named.items()}
    # 4 blocks: block i gets 0.5^(4 - i), the embeddings 0.5^5, everything else the full lr
    assert lr["backbone.vit.blocks.3.mlp.fc1.weight"] == 0.5
    assert lr["backbone.vit.blocks.0.attn.qkv.weight"] == 0.5**4
    assert lr["backbone.vit.pos_embed"] == lr["backbone.vit.patch_embed.proj.weight"] == 0.5**5
    assert lr["roi_heads.box_predictor.cls_score.weight"] == 1.0
    assert wd["backbone.vit.blocks.0.attn.qkv.weight"] == wd["rpn.head.conv.0.0.weight"] == 0.1
    assert wd["backbone.vit.pos_embed"] == wd["backbone.vit.blocks.0.norm1.weight"] == 0.0
    frozen = optimizer(detector(tiny_vit(), [-1]), lr=1.0, weight_decay=0.1, layer_decay=0.5)
    assert {g["lr"] for g in frozen.param_groups} == {1.0}


def test_schedule_warms_up_then_drops_at_milestones() -> None:
    assert lr_factor(0, 10, [50, 80]) == pytest.approx(0.001)
    assert lr_factor(5, 10, [50, 80]) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, 10, [50, 80]) == 1.0
    assert lr_factor(50, 10, [50, 80]) == pytest.approx(0.1)
    assert lr_factor(99, 10, [50, 80]) == pytest.approx(0.01)


def test_jitter_recomputes_boxes_from_cropped_masks_and_drops_empty_ones() -> None:
    masks = torch.zeros(2, 40, 80, dtype=torch.uint8)
    masks[0, 10:20, 5:15] = 1  # left object
    masks[1, 10:20, 70:78] = 1  # right object, cropped away below
    target = {"boxes": torch.zeros(2, 4), "labels": torch.tensor([1, 2]), "masks": masks}
    image = torch.rand(3, 40, 80)
    # fit in 64² (× 0.8), then × 2: 80 × 160, cropped to its left 64 × 64 (u = v = 0)
    out_img, out = augment(image, target, 64, Jitter(2.0, 0.0, 0.0, False))
    assert out_img.shape == (3, 64, 64)
    assert out["labels"].tolist() == [1]
    assert out["boxes"].tolist() == [[8.0, 16.0, 24.0, 32.0]]
    _, flipped = augment(image, target, 64, Jitter(2.0, 0.0, 0.0, True))
    assert flipped["boxes"].tolist() == [[40.0, 16.0, 56.0, 32.0]]
    small_img, small = augment(image, target, 64, Jitter(0.5, 0.9, 0.9, False))
    assert small_img.shape == (3, 16, 32) and small["labels"].tolist() == [1, 2]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 40, 80, dtype=torch.uint8)}  # an image without objects
    assert augment(image, empty, 64, Jitter(1.0, 0.5, 0.5, True))[1]["boxes"].shape == (0, 4)


def test_draw_plan_is_seeded_and_covers_every_image() -> None:
    a = draw_plan(torch.Generator().manual_seed(0), 5, 12, (0.5, 1.5), flip=True)
    b = draw_plan(torch.Generator().manual_seed(0), 5, 12, (0.5, 1.5), flip=True)
    assert a == b and len(a) == 12
    assert sorted(i for i, _ in a[:5]) == list(range(5))  # a permutation before repeating
    assert all(0.5 <= j.scale <= 1.5 and 0 <= j.u < 1 for _, j in a)
    assert not any(j.flip for _, j in draw_plan(torch.Generator(), 5, 12, (1, 1), flip=False))
