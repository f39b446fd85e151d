"""A timm model's transform comes from its own config; an override changes only what it names."""

from __future__ import annotations

import pytest
import torch

import repsim
from repsim.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from repsim.models.builtin import PreprocessParams

SMALL = {"img_size": 32, "patch_size": 4, "depth": 2}  # a ViT-Ti built for 32 px inputs
VIT_TI_MEAN = VIT_TI_STD = (0.5, 0.5, 0.5)  # vit_tiny_patch16_224's pretrained_cfg


def _timm_resize_and_crop(size: int, crop_pct: float) -> tuple[int, int]:
    """The sizes timm's own eval transform uses for that input size."""
    from timm.data import create_transform

    t = create_transform(input_size=(3, size, size), crop_pct=crop_pct, interpolation="bicubic")
    return t.transforms[0].size, t.transforms[1].size[0]


def test_model_built_for_32px_gets_32px_inputs_it_accepts() -> None:
    model = repsim.build_model("timm", arch="vit_tiny_patch16_224", kwargs=SMALL)
    p = model.preprocess
    assert (p.resize, p.crop) == _timm_resize_and_crop(32, 0.9)
    assert (p.mean, p.std, p.interpolation) == (VIT_TI_MEAN, VIT_TI_STD, "bicubic")
    x = p(torch.rand(3, 48, 60))
    assert x.shape == (3, 32, 32)
    with torch.no_grad():
        assert model.module(x[None]).shape == (1, 1000)


def test_model_at_its_pretrained_size_gets_timms_eval_transform() -> None:
    model = repsim.build_model("timm", arch="vit_tiny_patch16_224", kwargs={"depth": 1})
    p = model.preprocess
    assert (p.resize, p.crop) == _timm_resize_and_crop(224, 0.9)
    assert (p.mean, p.std) == (VIT_TI_MEAN, VIT_TI_STD)


def test_override_of_resize_and_crop_keeps_the_models_mean_std() -> None:
    model = repsim.build_model("timm", arch="vit_tiny_patch16_224", kwargs=SMALL,
                               preprocess={"resize": 40, "crop": 32})
    p = model.preprocess
    assert (p.resize, p.crop) == (40, 32)
    assert (p.mean, p.std, p.interpolation) == (VIT_TI_MEAN, VIT_TI_STD, "bicubic")


def test_override_of_mean_std_keeps_the_models_sizes() -> None:
    model = repsim.build_model("timm", arch="vit_tiny_patch16_224", kwargs=SMALL,
                               preprocess={"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    p = model.preprocess
    assert (p.resize, p.crop) == _timm_resize_and_crop(32, 0.9)
    assert (p.mean, p.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert p(torch.rand(3, 32, 32)).shape == (3, 32, 32)


def test_override_over_a_base_replaces_only_the_fields_given() -> None:
    base = Preprocess(resize=35, crop=32, mean=VIT_TI_MEAN, std=VIT_TI_STD,
                      interpolation="bicubic")
    p = PreprocessParams.model_validate({"crop": 28}).over(base)
    assert p == Preprocess(resize=35, crop=28, mean=VIT_TI_MEAN, std=VIT_TI_STD,
                           interpolation="bicubic")


def test_build_alone_keeps_its_meaning_for_the_zoo() -> None:
    p = PreprocessParams.model_validate({"resize": 256, "crop": 224,
                                         "interpolation": "bicubic"}).build()
    assert p == Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD, 3, "bicubic")


def test_non_square_img_size_is_refused_with_the_fix() -> None:
    from repsim.errors import RecipeError

    with pytest.raises(RecipeError, match=r"kwargs.*img_size = \(32, 48\) is not square"):
        repsim.build_model("timm", arch="vit_tiny_patch16_224",
                           kwargs={**SMALL, "img_size": (32, 48)})
