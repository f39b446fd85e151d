"""Built-in generic model entries: any timm architecture, and a user's own callable."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from repsim.errors import RecipeError
from repsim.hookspecs import Register, hookimpl
from repsim.models.base import LoadedModel, Preprocess


class PreprocessParams(BaseModel):
    """Override of a model's input transform: the fields given replace the model's own.

    :meth:`over` applies only the fields given to a model's transform; :meth:`build` makes a
    transform of these fields alone (unset: no resize or crop, ImageNet mean/std, bilinear).
    """

    model_config = ConfigDict(extra="forbid")
    resize: int | None = Field(None, description="resize the shorter side to this many pixels")
    crop: int | None = Field(None, description="centre-crop a square of this size; a ViT built "
                             "for a fixed input size needs exactly that size")
    mean: tuple[float, ...] = Field((0.485, 0.456, 0.406), description="per-channel mean")
    std: tuple[float, ...] = Field((0.229, 0.224, 0.225), description="per-channel std")
    channels: int = Field(3, description="a one-channel image is repeated to this many")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field(
        "bilinear", description="resize filter; DINO's and MAE's own evaluations use 'bicubic'"
    )

    def build(self) -> Preprocess:
        """The transform of these fields alone."""
        return Preprocess(self.resize, self.crop, tuple(self.mean), tuple(self.std), self.channels,
                          self.interpolation)

    def over(self, base: Preprocess) -> Preprocess:
        """``base`` with only the fields given here (``model_fields_set``) replaced."""
        return dataclasses.replace(base, **{k: getattr(self, k) for k in self.model_fields_set})


class TimmParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str = Field(description="timm architecture name, e.g. 'vit_small_patch16_224'")
    checkpoint: Path | None = Field(None, description="local weights (.safetensors, .pth)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to timm.create_model")
    preprocess: PreprocessParams | None = Field(
        None, description="override of timm's eval transform (only the fields given)")
    seed: int = Field(0, description="seed of the random initialisation (no checkpoint)")

    @field_validator("kwargs")
    @classmethod
    def _square_img_size(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        size = kwargs.get("img_size")
        if isinstance(size, (list, tuple)) and len(set(size)) > 1:
            raise ValueError(
                f"img_size = {tuple(size)} is not square, and repsim's preprocess centre-crops "
                f"squares. Use a square img_size (e.g. img_size = {size[0]}).")
        return kwargs


class CallableParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str = Field(description="'package.module:callable' returning an nn.Module; the "
                        "module must be importable by the Python running repsim (PYTHONPATH)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the callable")
    checkpoint: Path | None = Field(None, description="local weights (.safetensors, .pth)")
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams,
                                         description="the input transform")
    num_prefix_tokens: int = Field(0, description="leading tokens (CLS, registers) of the "
                                   "network's token outputs; 'cls' and 'gap_no_cls' need them")


def timm_structure(params: TimmParams) -> LoadedModel:
    """The timm network and its transform, without reading the checkpoint."""
    import timm
    import torch

    if not timm.is_model(params.arch):
        import difflib

        close = difflib.get_close_matches(params.arch, timm.list_models(), n=5, cutoff=0.6)
        raise RecipeError(
            f"timm has no architecture '{params.arch}'."
            + (f" Did you mean {', '.join(repr(c) for c in close)}?" if close else "")
            + " `python -c \"import timm; print(timm.list_models('vit_*'))\"` lists them."
        )
    torch.manual_seed(params.seed)
    try:
        module = timm.create_model(params.arch, pretrained=False, **params.kwargs)
    except TypeError as exc:  # an unknown keyword argument of the architecture's constructor
        raise RecipeError(
            f"timm architecture '{params.arch}' does not take kwargs {params.kwargs} ({exc}). "
            "Check the names against the architecture's constructor (timm.models.*)."
        ) from None
    preprocess = _timm_preprocess(module, params)
    if params.preprocess is not None:
        preprocess = params.preprocess.over(preprocess)
    check_input_size(module, preprocess, f"'{params.arch}' (timm)", "kwargs.img_size")
    return LoadedModel(
        module, preprocess, name=params.arch,
        num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 0)),
        family=_family(module), provenance={"arch": params.arch, "kwargs": params.kwargs},
    )


def build_timm(params: TimmParams) -> LoadedModel:
    from repsim.models.checkpoints import load_into

    loaded = timm_structure(params)
    if params.checkpoint is not None:
        loaded.provenance.update(load_into(loaded.module, params.checkpoint, loaded.name))
    return loaded


def check_input_size(module: Any, preprocess: Preprocess, model: str, size_param: str) -> None:
    """Refuse a transform whose crop a ViT built for one input size cannot take: timm's patch
    embedding asserts the size only in the forward, after every weight has been loaded."""
    embed = getattr(module, "patch_embed", None)
    size = tuple(getattr(embed, "img_size", None) or ())
    crop = preprocess.crop
    if crop is None or not size or not getattr(embed, "strict_img_size", False) or \
            size == (crop, crop):
        return
    h, w = size
    raise RecipeError(
        f"model {model} is built for {h}x{w} inputs (patch_embed.img_size), but its preprocess "
        f"gives crop {crop} ({crop}x{crop}): the forward would fail with 'Input height ({crop}) "
        f"doesn't match model ({h})'. Fix: set preprocess.crop = {h} (and a matching resize), "
        f"or build the model for {crop} px inputs ({size_param} = {crop}), or let it take any "
        "size (dynamic_img_size = true)."
    )


def _timm_preprocess(module: Any, params: TimmParams) -> Preprocess:
    """timm's eval transform for the created model (its pretrained_cfg, at its input size)."""
    import math

    from timm.data import resolve_model_data_config

    # pretrained_cfg keeps the pretrained input size (224) when kwargs build the model for
    # another one, so the size the model was built for comes from kwargs.img_size (square).
    size = params.kwargs.get("img_size")
    args = {} if size is None else {"img_size": int(size if isinstance(size, int) else size[0])}
    cfg = resolve_model_data_config(module, args=args)
    size = cfg["input_size"][-1]
    return Preprocess(
        resize=math.floor(size / cfg["crop_pct"]),  # as timm's transforms_factory scales
        crop=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
    )


def callable_structure(params: CallableParams) -> LoadedModel:
    """The user's network (the target called with ``kwargs``), without reading the checkpoint."""
    import importlib

    from torch import nn

    mod_name, _, attr = params.target.partition(":")
    if not attr:
        raise RecipeError(
            f"model target '{params.target}' must look like 'package.module:callable'."
        )
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(
            f"cannot import model target '{params.target}': {exc}. The module must be importable "
            f"by the Python that runs repsim ({sys.executable}): install it into that environment "
            "(pip install -e DIR), or put its folder on PYTHONPATH (PYTHONPATH=DIR repsim run "
            "...); neither the current directory nor the recipe's folder is searched."
        ) from None
    module = fn(**params.kwargs)
    if not isinstance(module, nn.Module):
        raise RecipeError(f"model target '{params.target}' returned a {type(module).__name__}, "
                          "not a torch.nn.Module.")
    preprocess = params.preprocess.build()
    check_input_size(module, preprocess, f"'{params.target}'", "its img_size")
    return LoadedModel(module, preprocess, name=params.target,
                       num_prefix_tokens=params.num_prefix_tokens, family=_family(module),
                       provenance={"target": params.target})


def build_callable(params: CallableParams) -> LoadedModel:
    from repsim.models.checkpoints import load_into

    loaded = callable_structure(params)
    if params.checkpoint is not None:
        loaded.provenance.update(load_into(loaded.module, params.checkpoint, loaded.name))
    return loaded


def _family(module: Any) -> str:
    if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
        return "vit"
    if hasattr(module, "stages") or hasattr(module, "layer4"):
        return "cnn"
    return "other"


@hookimpl
def register_models(register: Register) -> None:
    register("timm", build_timm, params=TimmParams, structure=timm_structure,
             summary="any timm architecture by name, with local weights (never downloads)",
             checkpoint="optional: .safetensors or .pth state dict", preprocess="timm's config")
    register("callable", build_callable, params=CallableParams, structure=callable_structure,
             summary="your own network: 'package.module:callable' returning an nn.Module",
             checkpoint="optional: .safetensors or .pth state dict", preprocess="as given")
