"""Layer selection, forward taps and token reductions against timm's own intermediates."""

from __future__ import annotations

import pytest
import timm
import torch

from repsim.errors import FeatureError, LayerSelectionError
from repsim.layers import (
    GlobParams,
    GlobSelector,
    IndexParams,
    IndexSelector,
    LayerTap,
    natural_key,
    reduce_output,
)
from repsim.models import LoadedModel, Preprocess
from repsim.plugins import registry


@pytest.fixture(scope="module")
def vit() -> LoadedModel:
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=12,
                            embed_dim=32, num_heads=2, num_classes=3)
    return LoadedModel(net, Preprocess(), name="vit", num_prefix_tokens=1, family="vit")


def glob(model: LoadedModel, *patterns: str) -> list[str]:
    return GlobSelector(GlobParams(patterns=list(patterns))).select(model)


def test_star_stays_within_one_segment_and_order_is_network_order(vit) -> None:
    blocks = glob(vit, "blocks.*")
    assert blocks == [f"blocks.{i}" for i in range(12)]  # 10 and 11 after 9, no sub-modules
    assert glob(vit, "blocks.*.attn.qkv")[:2] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert len(glob(vit, "blocks.**.fc1")) == 12


def test_input_suffix_and_output(vit) -> None:
    assert glob(vit, "blocks.1.norm2:in") == ["blocks.1.norm2:in"]
    assert glob(vit, "output", "blocks.0") == ["blocks.0", "output"]


def test_index_selector_counts_from_the_end(vit) -> None:
    sel = IndexSelector(IndexParams(indices=[0, -1, -2]))
    assert sel.select(vit) == ["blocks.0", "blocks.11", "blocks.10"]
    assert IndexSelector(IndexParams(indices=2)).select(vit) == ["blocks.10", "blocks.11"]
    with pytest.raises(LayerSelectionError, match="out of range"):
        IndexSelector(IndexParams(indices=[12])).select(vit)


def test_named_selectors(vit) -> None:
    def named(name: str) -> list[str]:
        return registry("layer_selector").get(name).create({}).select(vit)

    assert named("norm1")[0] == "blocks.0.norm1" and len(named("norm1")) == 12
    assert named("attn_residual")[0] == "blocks.0.norm2:in"
    assert named("mlp_fc1")[-1] == "blocks.11.mlp.fc1"


def test_taps_equal_timm_intermediates(vit) -> None:
    x = torch.randn(5, 3, 16, 16)
    layers = glob(vit, "blocks.*")
    tap = LayerTap(vit, layers)
    with tap.attached():
        got = tap.run(x)
    with torch.inference_mode():
        ref = vit.module.forward_intermediates(x, indices=12, norm=False, output_fmt="NLC",
                                               intermediates_only=True, return_prefix_tokens=True)
    # timm returns (spatial tokens, prefix tokens) per block
    for i, layer in enumerate(layers):
        spatial, prefix = ref[i]
        torch.testing.assert_close(got[layer][:, 0], prefix[:, 0])
        torch.testing.assert_close(got[layer][:, 1:], spatial)


def test_attention_residual_is_the_norm2_input(vit) -> None:
    x = torch.randn(4, 3, 16, 16)
    tap = LayerTap(vit, ["blocks.0.norm2:in", "blocks.0.norm1"])
    with tap.attached():
        got = tap.run(x)
    with torch.inference_mode():
        h = vit.module.norm_pre(vit.module._pos_embed(vit.module.patch_embed(x)))
        blk = vit.module.blocks[0]
        expected = h + blk.ls1(blk.attn(blk.norm1(h)))
        norm1 = blk.norm1(h)
    torch.testing.assert_close(got["blocks.0.norm2:in"], expected)
    torch.testing.assert_close(got["blocks.0.norm1"], norm1)


def test_hooks_are_removed_after_use(vit) -> None:
    tap = LayerTap(vit, ["blocks.0"])
    with tap.attached():
        pass
    assert not vit.module.blocks[0]._forward_hooks


def test_token_reductions() -> None:
    t = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    torch.testing.assert_close(reduce_output(t, "cls", 1, "x"), t[:, 0])
    torch.testing.assert_close(reduce_output(t, "gap", 1, "x"), t.mean(1))
    torch.testing.assert_close(reduce_output(t, "gap_no_cls", 1, "x"), t[:, 1:].mean(1))
    torch.testing.assert_close(reduce_output(t, "gap_no_cls", 2, "x"), t[:, 2:].mean(1))
    assert reduce_output(t, "flatten", 1, "x").shape == (2, 12)
    conv = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(reduce_output(conv, "gap", 0, "x"), conv.mean((2, 3)))
    with pytest.raises(FeatureError, match="conv map has no CLS"):
        reduce_output(conv, "cls", 0, "model 'm', layer 'stages.1'")
    with pytest.raises(FeatureError, match="needs a CLS token"):
        reduce_output(t, "cls", 0, "x")


def test_natural_sort() -> None:
    assert sorted(["l10", "l2", "l1"], key=natural_key) == ["l1", "l2", "l10"]
