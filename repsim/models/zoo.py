"""The model zoo: the self-supervised checkpoints of the seed papers, as their authors publish them.

Each entry names the file it expects, the architecture it builds (timm, or torchvision for
ResNet-50) and its training method (:data:`repsim.models.methods.METHODS`: key layouts, dropped
keys, preprocessing). Loading, key conversion and checks live in :mod:`repsim.models.official`,
imported only when a model is built (this module is imported at start-up and must stay free of
torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from repsim.hookspecs import Register, hookimpl
from repsim.models.builtin import PreprocessParams
from repsim.models.methods import METHODS, TrainingMethod

if TYPE_CHECKING:
    from repsim.models.base import LoadedModel

_FB = "https://dl.fbaipublicfiles.com"


@dataclass(frozen=True)
class ZooEntry:
    """One published checkpoint: how to build its network and where its authors publish it.

    ``width``/``depth``/``patch`` describe ViTs for error messages (``0`` for CNNs); ``kwargs`` are
    the architecture flags that differ from timm's defaults for ``arch``.
    """

    name: str
    method: str  # a key of METHODS
    arch: str  # timm model name; "resnet50" means torchvision's
    checkpoint: str
    url: str
    summary: str
    width: int = 0
    depth: int = 0
    patch: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def training(self) -> TrainingMethod:
        """The training method: how its code writes the file, what is dropped, preprocessing."""
        return METHODS[self.method]

    @property
    def family(self) -> str:
        return "vit" if self.patch else "cnn"

    @property
    def label(self) -> str:
        if self.family == "vit":
            return f"ViT (embed {self.width}, depth {self.depth}, patch {self.patch})"
        return self.arch


def _vit(name: str, method: str, size: str, patch: int, checkpoint: str, url: str,
         summary: str, **kwargs: Any) -> ZooEntry:
    width, depth = {"small": (384, 12), "base": (768, 12), "large": (1024, 24)}[size]
    return ZooEntry(name, method, f"vit_{size}_patch{patch}_224", checkpoint, url, summary,
                    width, depth, patch, kwargs)


ENTRIES: tuple[ZooEntry, ...] = (
    # MoCo-v3's ViT-S has 12 heads (vits.py), unlike DeiT-S/DINO/MSN (6).
    _vit("mocov3_vit_s16", "mocov3", "small", 16, "vit-s-300ep.pth.tar",
         f"{_FB}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
         "MoCo-v3 ViT-S/16 (12 heads, fixed 2-D sin-cos position embedding), CLS token",
         num_heads=12),
    _vit("mocov3_vit_b16", "mocov3", "base", 16, "vit-b-300ep.pth.tar",
         f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
         "MoCo-v3 ViT-B/16 (fixed 2-D sin-cos position embedding), CLS token"),
    _vit("dino_vit_s16", "dino", "small", 16, "dino_deitsmall16_pretrain.pth",
         f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
         "DINO ViT-S/16 (teacher), CLS token"),
    _vit("dino_vit_s8", "dino", "small", 8, "dino_deitsmall8_pretrain.pth",
         f"{_FB}/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
         "DINO ViT-S/8 (teacher), CLS token"),
    _vit("dino_vit_b16", "dino", "base", 16, "dino_vitbase16_pretrain.pth",
         f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
         "DINO ViT-B/16 (teacher), CLS token"),
    _vit("dino_vit_b8", "dino", "base", 8, "dino_vitbase8_pretrain.pth",
         f"{_FB}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
         "DINO ViT-B/8 (teacher), CLS token"),
    _vit("mae_vit_b16", "mae", "base", 16, "mae_pretrain_vit_base.pth",
         f"{_FB}/mae/pretrain/mae_pretrain_vit_base.pth",
         "MAE ViT-B/16 pre-trained encoder (decoder dropped), CLS token"),
    _vit("mae_vit_l16", "mae", "large", 16, "mae_pretrain_vit_large.pth",
         f"{_FB}/mae/pretrain/mae_pretrain_vit_large.pth",
         "MAE ViT-L/16 pre-trained encoder (decoder dropped), CLS token"),
    _vit("mae_vit_b16_ft", "mae_ft", "base", 16, "mae_finetuned_vit_base.pth",
         f"{_FB}/mae/finetune/mae_finetuned_vit_base.pth",
         "MAE ViT-B/16 fine-tuned on ImageNet-1k: global pool + fc_norm, classifier kept",
         global_pool="avg", fc_norm=True),
    _vit("msn_vit_s16", "msn", "small", 16, "vits16_800ep.pth.tar",
         f"{_FB}/msn/vits16_800ep.pth.tar",
         "MSN ViT-S/16 target encoder (projector and prototypes dropped), CLS token"),
    _vit("msn_vit_b16", "msn", "base", 16, "vitb16_600ep.pth.tar",
         f"{_FB}/msn/vitb16_600ep.pth.tar",
         "MSN ViT-B/16 target encoder (projector and prototypes dropped), CLS token"),
    _vit("msn_vit_l16", "msn", "large", 16, "vitl16_600ep.pth.tar",
         f"{_FB}/msn/vitl16_600ep.pth.tar",
         "MSN ViT-L/16 target encoder (projector and prototypes dropped), CLS token"),
    ZooEntry("convnextv2_base_fcmae", "fcmae", "convnextv2_base", "convnextv2_base_1k_224_fcmae.pt",
             f"{_FB}/convnext/convnextv2/pt_only/convnextv2_base_1k_224_fcmae.pt",
             "ConvNeXt-V2-B FCMAE encoder (sparse kernels made dense; no final norm), GAP"),
    ZooEntry("resnet50_dino", "dino", "resnet50", "dino_resnet50_pretrain.pth",
             f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
             "DINO ResNet-50 (teacher, torchvision layout, no fc)"),
    ZooEntry("resnet50_mocov3", "mocov3", "resnet50", "r-50-1000ep.pth.tar",
             f"{_FB}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar",
             "MoCo-v3 ResNet-50 base encoder (projector fc dropped; linear-eval fc kept)"),
)


class ZooParams(BaseModel):
    """Parameters every zoo entry takes."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: Path = Field(
        description="the file as its authors publish it (any of their layouts), or the output "
        "of `repsim convert`"
    )
    preprocess: PreprocessParams | None = Field(
        None, description="override the official evaluation transform (resize 256, crop 224)"
    )
    arch_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="change the architecture's size, e.g. {depth = 2} (tests, variants); the "
        "file must match. Passed to timm.create_model (torchvision ResNet: layers=[...])",
    )


def _params(method: TrainingMethod) -> type[ZooParams]:
    """ZooParams, plus ``branch`` for a method whose training checkpoints hold several networks."""
    if not method.branches:
        return ZooParams
    branch = Literal[method.branches]  # type: ignore[valid-type]
    return create_model(f"{method.name.capitalize()}Params", __base__=ZooParams,
                        branch=(branch, Field(method.branches[0], description=method.branch_doc)))


BY_NAME: dict[str, ZooEntry] = {e.name: e for e in ENTRIES}

PARAMS: dict[str, type[ZooParams]] = {name: _params(m) for name, m in METHODS.items()}


def _builder(e: ZooEntry) -> Callable[[ZooParams], LoadedModel]:
    def build(params: ZooParams) -> LoadedModel:
        from repsim.models.official import build_official

        return build_official(e, params)

    build.__doc__ = e.summary
    return build


def _structure(e: ZooEntry) -> Callable[[ZooParams], LoadedModel]:
    def structure(params: ZooParams) -> LoadedModel:
        from repsim.models.official import official_structure

        return official_structure(e, params)

    return structure


@hookimpl
def register_models(register: Register) -> None:
    for e in ENTRIES:
        register(e.name, _builder(e), params=PARAMS[e.method], summary=e.summary,
                 structure=_structure(e), checkpoint=e.checkpoint, source=e.url,
                 preprocess=e.training.preprocess.describe())


@hookimpl
def register_commands(cli: Any) -> None:
    import click

    from repsim.cli import progress_messages, user_errors

    @cli.command("convert")
    @click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--model", "model_name", required=True,
                  help="registry name of the model the file belongs to, e.g. dino_vit_s16")
    @click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="output file, FILE.safetensors")
    @click.option("--param", "-p", "raw_params", multiple=True, metavar="KEY=VALUE",
                  help="model parameter (VALUE read as TOML or JSON if it parses), e.g. "
                  "-p branch=student")
    @user_errors
    def convert(checkpoint: Path, model_name: str, out: Path, raw_params: tuple[str, ...]) -> None:
        """Convert an official CHECKPOINT once to a safe, fast .safetensors file.

        The output holds the backbone's weights under timm/torchvision names plus the model name;
        every model entry accepts it as `checkpoint`.
        """
        from repsim.models.official import convert_checkpoint
        from repsim.options import parse_key_values

        params = parse_key_values(raw_params)
        with progress_messages():
            result = convert_checkpoint(model_name, checkpoint, out, **params)
        click.echo(f"wrote {result.path} ({result.tensors} tensors, {result.bytes / 2**20:.1f} MiB)"
                   f" for model '{model_name}'; dropped {result.dropped} keys of the original")

