"""Built-in generic model entries: any timm architecture, and a user's own callable."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from repsim.hookspecs import Register, hookimpl
from repsim.models.base import LoadedModel, Preprocess


class PreprocessParams(BaseModel):
    """Override of a model's input transform: the fields given replace the model's own.

    :meth:`over` applies only the fields given to a model's transform; :meth:`build` makes a
    transform of these fields alone (unset: no resize or crop, ImageNet mean/std, bilinear).
    """

    model_config = ConfigDict(extra="forbid")
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3
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
    preprocess: PreprocessParams | None = None
    seed: int = 0

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
    target: str = Field(description="'package.module:callable' returning an nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    num_prefix_tokens: int = 0


def build_timm(params: TimmParams) -> LoadedModel:
    import timm
    import torch

    from repsim.errors import RecipeError
    from repsim.models.checkpoints import load_into

    if not timm.is_model(params.arch):
        import difflib

        close = difflib.get_close_matches(params.arch, timm.list_models(), n=5, cutoff=0.6)
        raise RecipeError(
            f"timm has no architecture '{params.arch}'."
            + (f" Did you mean {', '.join(repr(c) for c in close)}?" if close else "")
            + " `python -c \"import timm; print(timm.list_models('vit_*'))\"` lists them."
        )
    torch.manual_seed(params.seed)
    module = timm.create_model(params.arch, pretrained=False, **params.kwargs)
    provenance: dict[str, Any] = {"arch": params.arch, "kwargs": params.kwargs}
    if params.checkpoint is not None:
        provenance.update(load_into(module, params.checkpoint))
    preprocess = _timm_preprocess(module, params)
    if params.preprocess is not None:
        preprocess = params.preprocess.over(preprocess)
    return LoadedModel(
        module, preprocess, name=params.arch,
        num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 0)),
        family=_family(module), provenance=provenance,
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


def build_callable(params: CallableParams) -> LoadedModel:
    import importlib

    from repsim.errors import RecipeError
    from repsim.models.checkpoints import load_into

    mod_name, _, attr = params.target.partition(":")
    if not attr:
        raise RecipeError(
            f"model target '{params.target}' must look like 'package.module:callable'."
        )
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(
            f"cannot import model target '{params.target}': {exc}. Check that the module is "
            "importable (installed, or on PYTHONPATH) and the callable name is right."
        ) from None
    module = fn(**params.kwargs)
    provenance: dict[str, Any] = {"target": params.target}
    if params.checkpoint is not None:
        provenance.update(load_into(module, params.checkpoint))
    return LoadedModel(module, params.preprocess.build(), name=params.target,
                       num_prefix_tokens=params.num_prefix_tokens, family=_family(module),
                       provenance=provenance)


def _family(module: Any) -> str:
    if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
        return "vit"
    if hasattr(module, "stages") or hasattr(module, "layer4"):
        return "cnn"
    return "other"


@hookimpl
def register_models(register: Register) -> None:
    register("timm", build_timm, params=TimmParams,
             summary="any timm architecture by name, with local weights (never downloads)",
             checkpoint="optional: .safetensors or .pth state dict", preprocess="timm's config")
    register("callable", build_callable, params=CallableParams,
             summary="your own network: 'package.module:callable' returning an nn.Module",
             checkpoint="optional: .safetensors or .pth state dict", preprocess="as given")
