"""Layer-type selectors for the zoo: CNN stages and blocks, one block type across families, and
attention maps.

The generic ViT types (``blocks``, ``attn_residual``, ``norm1``, ``attn_qkv``, ``mlp_fc1``) live in
:mod:`repsim.layers`; these add what the seeds' ViT-vs-CNN comparisons need.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from repsim.errors import LayerSelectionError
from repsim.hookspecs import Register, hookimpl
from repsim.layers import INPUT_SUFFIX, IndexParams, IndexSelector, LayerSelector, module_names

if TYPE_CHECKING:
    from repsim.models.base import LoadedModel

# (what, module-path regex, the same as a glob) per architecture layout, tried in order; the
# first that matches wins.
Layout = tuple[str, str, str]
_VIT_BLOCKS = ("transformer blocks", r"blocks\.\d+", "blocks.*")
_RESNET_BLOCKS = ("ResNet bottlenecks", r"layer\d+\.\d+", "layer*.*")
_CONVNEXT_BLOCKS = ("ConvNeXt blocks", r"stages\.\d+\.blocks\.\d+", "stages.*.blocks.*")
_RESNET_STAGES = ("ResNet stages", r"layer\d+", "layer*")
_CONVNEXT_STAGES = ("ConvNeXt stages", r"stages\.\d+", "stages.*")

_LAYOUTS: dict[str, tuple[str, tuple[Layout, ...]]] = {
    "cnn_blocks": ("output of each residual block of a CNN (ResNet bottleneck layerN.M, "
                   "ConvNeXt stages.N.blocks.M)", (_RESNET_BLOCKS, _CONVNEXT_BLOCKS)),
    "cnn_stages": ("output of each stage of a CNN (ResNet layerN, ConvNeXt stages.N)",
                   (_RESNET_STAGES, _CONVNEXT_STAGES)),
    "block_outputs": ("residual stream after each block, whatever the family: ViT blocks.N, "
                      "ResNet layerN.M, ConvNeXt stages.N.blocks.M",
                      (_VIT_BLOCKS, _RESNET_BLOCKS, _CONVNEXT_BLOCKS)),
}


class LayoutSelector(LayerSelector):
    """The modules of the first known layout the model has, in network order."""

    def __init__(self, name: str, layouts: tuple[Layout, ...]) -> None:
        self.name = name
        self.layouts = layouts

    def select(self, model: LoadedModel) -> list[str]:
        names = module_names(model.module)
        for _, pattern, _ in self.layouts:
            rx = re.compile(pattern)
            hits = [n for n in names if rx.fullmatch(n)]
            if hits:
                return hits
        known = "; ".join(f"{what} ({glob})" for what, _, glob in self.layouts)
        raise LayerSelectionError(
            f"layer selector '{self.name}' finds none of its layouts in model '{model.name}' "
            f"(family '{model.family}'). It knows: {known}. Use a 'glob' selector with this "
            "model's module paths (`repsim layers MODEL` lists them)."
        )


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttnMapsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    indices: list[int] | int | None = Field(
        None, description="blocks to take (negative count from the end; an int n = the last n); "
        "default all. Each map is [B, heads, T, T]: ViT-S/8 at 224 px is 15 MB per image and block"
    )


class AttnMapsSelector(LayerSelector):
    """Post-softmax attention of each head: the input of ``blocks.N.attn.attn_drop``.

    timm's fused kernel (``scaled_dot_product_attention``) never forms the softmax, so the hook
    would see nothing; selecting this switches ``fused_attn`` off in the chosen blocks only (same
    results, slower), and notes it in the model's provenance.
    """

    def __init__(self, params: AttnMapsParams) -> None:
        self.params = params

    def select(self, model: LoadedModel) -> list[str]:
        if self.params.indices is None:
            blocks = LayoutSelector("attn_maps", (_VIT_BLOCKS,)).select(model)
        else:
            blocks = IndexSelector(IndexParams(indices=self.params.indices,
                                               container="blocks")).select(model)
        modules = dict(model.module.named_modules())
        layers = []
        for block in blocks:
            attn = modules.get(f"{block}.attn")
            if attn is None or not hasattr(attn, "fused_attn") or not hasattr(attn, "attn_drop"):
                raise LayerSelectionError(
                    f"layer selector 'attn_maps' needs timm attention modules ('{block}.attn' "
                    f"with 'fused_attn' and 'attn_drop'); model '{model.name}' has "
                    f"{type(attn).__name__ if attn is not None else 'none'} there."
                )
            attn.fused_attn = False
            layers.append(f"{block}.attn.attn_drop{INPUT_SUFFIX}")
        model.provenance["fused_attn_disabled"] = [b + ".attn" for b in blocks]
        return layers


def _layout(name: str, layouts: tuple[Layout, ...]):
    def build(_: BaseModel) -> LayoutSelector:
        return LayoutSelector(name, layouts)

    return build


@hookimpl
def register_layer_selectors(register: Register) -> None:
    for name, (summary, layouts) in _LAYOUTS.items():
        register(name, _layout(name, layouts), params=_NoParams, summary=summary,
                 patterns=[glob for _, _, glob in layouts])
    register("attn_maps", AttnMapsSelector, params=AttnMapsParams,
             summary="post-softmax attention maps [B, heads, T, T] of each ViT block (input of "
             "attn.attn_drop); switches fused attention off only in the chosen blocks",
             patterns=["blocks.*.attn.attn_drop:in"])
