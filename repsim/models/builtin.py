"""Built-in generic model entries: any timm architecture, and a user's own callable."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from repsim.hookspecs import Register, hookimpl
from repsim.models.base import LoadedModel, Preprocess


class PreprocessParams(BaseModel):
    """Override of a model's input transform."""

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
        return Preprocess(self.resize, self.crop, tuple(self.mean), tuple(self.std), self.channels,
                          self.interpolation)


class TimmParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str = Field(description="timm architecture name, e.g. 'vit_small_patch16_224'")
    checkpoint: Path | None = Field(None, description="local weights (.safetensors, .pth)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to timm.create_model")
    preprocess: PreprocessParams | None = None
    seed: int = 0


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
    if params.preprocess is not None:
        preprocess = params.preprocess.build()
    else:
        cfg = module.pretrained_cfg or {}
        size = cfg.get("input_size", (3, 224, 224))[-1]
        crop_pct = cfg.get("crop_pct", 0.875)
        preprocess = Preprocess(
            resize=int(round(size / crop_pct)), crop=size,
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        )
    return LoadedModel(
        module, preprocess, name=params.arch,
        num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 0)),
        family=_family(module), provenance=provenance,
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
