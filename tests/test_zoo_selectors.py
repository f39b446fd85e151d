"""Layer-type selectors for CNNs, across families, and attention maps."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from repsim.errors import LayerSelectionError
from repsim.layers import LayerTap
from repsim.models.base import LoadedModel, Preprocess
from repsim.plugins import registry


def wrap(module: nn.Module, family: str, prefix: int = 0) -> LoadedModel:
    return LoadedModel(module, Preprocess(), name=type(module).__name__, num_prefix_tokens=prefix,
                       family=family)


@pytest.fixture(scope="module")
def resnet() -> LoadedModel:
    return wrap(ResNet(Bottleneck, [1, 2, 1, 1]), "cnn")


@pytest.fixture(scope="module")
def convnext() -> LoadedModel:
    return wrap(timm.create_model("convnextv2_base", depths=(1, 1, 2, 1), dims=(8, 16, 32, 64),
                                  num_classes=0), "cnn")


def vit(depth: int = 3) -> LoadedModel:
    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=depth,
                               embed_dim=32, num_heads=2, num_classes=0)
    return wrap(module, "vit", 1)


def select(name: str, model: LoadedModel, **params) -> list[str]:
    return registry("layer_selector").get(name).create(params).select(model)


def test_cnn_blocks_and_stages(resnet: LoadedModel, convnext: LoadedModel) -> None:
    assert select("cnn_blocks", resnet) == ["layer1.0", "layer2.0", "layer2.1", "layer3.0",
                                            "layer4.0"]
    assert select("cnn_stages", resnet) == ["layer1", "layer2", "layer3", "layer4"]
    assert select("cnn_blocks", convnext) == ["stages.0.blocks.0", "stages.1.blocks.0",
                                              "stages.2.blocks.0", "stages.2.blocks.1",
                                              "stages.3.blocks.0"]
    assert select("cnn_stages", convnext) == [f"stages.{i}" for i in range(4)]


def test_block_outputs_is_the_same_layer_type_across_families(
        resnet: LoadedModel, convnext: LoadedModel) -> None:
    v = vit()
    assert select("block_outputs", v) == ["blocks.0", "blocks.1", "blocks.2"]
    assert select("block_outputs", resnet) == select("cnn_blocks", resnet)
    assert select("block_outputs", convnext) == select("cnn_blocks", convnext)
    x = torch.randn(2, 3, 32, 32)
    with LayerTap(convnext, select("block_outputs", convnext)).attached() as tap:
        out = tap.run(x)
    assert out["stages.2.blocks.1"].shape == (2, 32, 2, 2)  # the residual stream, NCHW


def test_cnn_selector_on_a_vit_says_what_it_looks_for() -> None:
    with pytest.raises(LayerSelectionError, match=r"'cnn_blocks' finds none of its layouts in "
                       r"model 'VisionTransformer' \(family 'vit'\)\. It knows: ResNet "
                       r"bottlenecks \(layer\*\.\*\); ConvNeXt blocks \(stages\.\*\.blocks\.\*\)"):
        select("cnn_blocks", vit())


def test_attn_maps_switch_fused_attention_off_only_where_asked() -> None:
    model = vit()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.module(x)
    assert all(b.attn.fused_attn for b in model.module.blocks)

    layers = select("attn_maps", model, indices=[-1])
    assert layers == ["blocks.2.attn.attn_drop:in"]
    assert [b.attn.fused_attn for b in model.module.blocks] == [True, True, False]
    assert model.provenance["fused_attn_disabled"] == ["blocks.2.attn"]

    with LayerTap(model, layers + ["blocks.2.norm1"]).attached() as tap:
        out = tap.run(x)
    maps = out["blocks.2.attn.attn_drop:in"]
    assert maps.shape == (4, 2, 17, 17)  # [B, heads, T, T], T = 16 patches + CLS
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 2, 17))
    attn = model.module.blocks[2].attn  # recompute softmax(q k^T / sqrt(d)) from the block input
    with torch.no_grad():
        qkv = attn.qkv(out["blocks.2.norm1"].clone())
    q, k, _ = qkv.reshape(4, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(maps, (q @ k.transpose(-2, -1) * 16**-0.5).softmax(-1))
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), before, rtol=1e-5, atol=1e-6)


def test_attn_maps_default_is_every_block() -> None:
    model = vit(depth=2)
    assert select("attn_maps", model) == ["blocks.0.attn.attn_drop:in",
                                          "blocks.1.attn.attn_drop:in"]
    assert not any(b.attn.fused_attn for b in model.module.blocks)


def test_attn_maps_need_transformer_blocks(resnet: LoadedModel) -> None:
    with pytest.raises(LayerSelectionError, match="'attn_maps' finds none"):
        select("attn_maps", resnet)
    module = nn.Module()
    module.blocks = nn.Sequential(nn.Module())
    module.blocks[0].attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(LayerSelectionError,
                       match="needs timm attention modules.*MultiheadAttention"):
        select("attn_maps", wrap(module, "other"))


def test_selectors_are_listed_with_their_patterns() -> None:
    parts = registry("layer_selector")
    assert parts.get("cnn_blocks").info["patterns"] == ["layer*.*", "stages.*.blocks.*"]
    assert parts.get("block_outputs").info["patterns"] == ["blocks.*", "layer*.*",
                                                           "stages.*.blocks.*"]
    assert parts.get("attn_maps").info["patterns"] == ["blocks.*.attn.attn_drop:in"]
