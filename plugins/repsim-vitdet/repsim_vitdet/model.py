"""ViTDet's detector: a plain ViT, its simple feature pyramid, torchvision's Mask R-CNN heads.

Li et al., *Exploring Plain Vision Transformer Backbones for Object Detection* (ECCV 2022), as in
detectron2's ``projects/ViTDet``: the patch tokens of one block (or of several, concatenated and
projected by a 1×1 conv) form a stride-p map that deconvolutions, identity and max-pooling turn
into strides 4, 8, 16 and 32, each followed by a 1×1 and a 3×3 conv with channel LayerNorm; a
stride-64 level comes from subsampling the last. RPN, RoIAlign over the levels and the box and
mask heads are torchvision's ``MaskRCNN`` with ViTDet's choices (2-conv RPN head, conv + fc box
head and conv mask head with LayerNorm).

Departure: every block keeps the global attention it was pre-trained with; ViTDet fine-tunes
with windowed attention (14×14) in all but four blocks and relative position biases.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from repsim.errors import RecipeError

STRIDES = (4, 8, 16, 32)  # the pyramid's levels; a stride-64 one is added by subsampling
LEVELS = ["0", "1", "2", "3"]  # torchvision's names of the pyramid maps RoIAlign reads


def _conv(cin: int, cout: int, k: int) -> nn.Module:
    """A conv without bias followed by channel LayerNorm (detectron2's ``Conv2d(norm="LN")``)."""
    from timm.layers import LayerNorm2d
    from torchvision.ops.misc import Conv2dNormActivation

    return Conv2dNormActivation(cin, cout, k, norm_layer=LayerNorm2d, activation_layer=None)


class SimpleFeaturePyramid(nn.Module):
    """Strides 4, 8, 16, 32 (and 64) from one stride-``patch`` map of ``dim`` channels."""

    def __init__(self, dim: int, channels: int, patch: int) -> None:
        from timm.layers import LayerNorm2d
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.stages = nn.ModuleList()
        for stride in STRIDES:
            layers: list[nn.Module] = []
            width = dim
            if stride < patch:  # ViTDet's scale 4: deconv, LN, GELU, deconv; scale 2: one deconv
                for i in range(int(math.log2(patch // stride))):
                    if i:
                        layers += [LayerNorm2d(width), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(width, width // 2, 2, stride=2))
                    width //= 2
            elif stride > patch:
                layers.append(nn.MaxPool2d(stride // patch))
            layers += [_conv(width, channels, 1), _conv(channels, channels, 3)]
            self.stages.append(nn.Sequential(*layers))
        self.top = LastLevelMaxPool()

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps, names = self.top([stage(x) for stage in self.stages], [], list(LEVELS))
        return OrderedDict(zip(names, maps))


class ViTBackbone(nn.Module):
    """The patch tokens of ``blocks`` of a timm ViT at ``image_size`` as one map, then the pyramid.

    Inputs are ``image_size`` squared (the detector's transform zero-pads every batch to it, as
    ViTDet pads to 1024); the absolute position embeddings are resampled once to that grid.
    ``frozen``: no gradients and eval mode (no dropout) for the ViT, whatever mode the detector
    is in.
    """

    def __init__(self, vit: nn.Module, blocks: Sequence[int], image_size: int, channels: int,
                 frozen: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        self.vit, self.frozen = vit, frozen
        if frozen:
            vit.requires_grad_(False)
        else:
            _set_drop_path(vit, drop_path)
        # Blocks after the last one used, the final norm and the head are dropped.
        self.indices = vit.prune_intermediate_layers(list(blocks), prune_norm=True)
        vit.set_input_size(img_size=(image_size, image_size))
        patch = vit.patch_embed.patch_size[0]
        dim = vit.embed_dim
        self.project = _conv(dim * len(self.indices), dim, 1) if len(self.indices) > 1 \
            else nn.Identity()
        self.pyramid = SimpleFeaturePyramid(dim, channels, patch)
        self.out_channels = channels

    def train(self, mode: bool = True) -> ViTBackbone:
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.vit.forward_intermediates(x, indices=self.indices, output_fmt="NCHW",
                                                  intermediates_only=True)
        return self.pyramid(self.project(torch.cat(maps, dim=1)))


def _set_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly over the blocks to ``rate`` (timm's and ViTDet's rule)."""
    from timm.layers import DropPath

    for blk, r in zip(vit.blocks, torch.linspace(0, rate, len(vit.blocks)).tolist()):
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())


def _roi_align(output_size: int, canonical: int) -> nn.Module:
    """torchvision's RoIAlign over the four levels, their strides fixed: left to itself it infers
    them from the largest image of its first batch, which large-scale jitter can make small."""
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.poolers import initLevelMapper

    pool = MultiScaleRoIAlign(LEVELS, output_size, 2, canonical_scale=canonical)
    pool.scales = [1 / s for s in STRIDES]
    pool.map_levels = initLevelMapper(int(math.log2(STRIDES[0])), int(math.log2(STRIDES[-1])),
                                      canonical_scale=canonical, canonical_level=4)
    return pool


def check_vit(module: nn.Module, label: str, family: str) -> None:
    """A :class:`RecipeError` unless ``module`` is a timm ViT the detector can use."""
    needed = ("blocks", "patch_embed", "forward_intermediates", "prune_intermediate_layers",
              "set_input_size", "embed_dim")
    lacking = [n for n in needed if not hasattr(module, n)]
    if family != "vit" or lacking:
        raise RecipeError(
            f"evaluator 'vitdet': model '{label}' is not a timm Vision Transformer (family "
            f"'{family}'{', lacks ' + ', '.join(lacking) if lacking else ''}); ViTDet builds its "
            "pyramid from a ViT's patch tokens. Leave it out with `models = [...]`.")
    channels = getattr(getattr(module.patch_embed, "proj", None), "in_channels", 3)
    if channels != 3:
        raise RecipeError(f"evaluator 'vitdet': model '{label}' takes {channels}-channel images; "
                          "COCO images are RGB.")
    patch = tuple(module.patch_embed.patch_size)
    if patch[0] != patch[1] or patch[0] & (patch[0] - 1) or not 4 <= patch[0] <= 32:
        raise RecipeError(f"evaluator 'vitdet': model '{label}' has patches {patch}; the pyramid "
                          "needs square patches of 4, 8, 16 or 32 pixels.")


def check_blocks(blocks: Sequence[int], depth: int, label: str) -> list[int]:
    """The blocks as 0-based indices within ``depth``; a :class:`RecipeError` otherwise."""
    out = [b + depth if b < 0 else b for b in blocks]
    if any(not 0 <= b < depth for b in out) or len(set(out)) != len(out):
        raise RecipeError(f"evaluator 'vitdet': blocks {list(blocks)} do not fit model '{label}', "
                          f"which has {depth} blocks (0 .. {depth - 1}, or -1 for the last).")
    return out


def build_detector(vit: nn.Module, *, blocks: Sequence[int], frozen: bool, num_classes: int,
                   image_size: int, channels: int, box_convs: int, box_fc: int, mask_convs: int,
                   proposals_train: tuple[int, int], proposals_test: tuple[int, int],
                   roi_batch_size: int, mean: Sequence[float], std: Sequence[float],
                   drop_path: float = 0.0) -> nn.Module:
    """torchvision's ``MaskRCNN`` on a :class:`ViTBackbone` of ``vit`` (used as is: pass a copy).

    Anchor sizes (32 … 512) and RoIAlign's canonical box size (224) are ViTDet's at 1024 px,
    scaled by ``image_size / 1024``. Training images are fed at the size the augmentation gave
    them (torchvision's ``_skip_resize``); at test the longer side is resized to ``image_size``.
    Every batch is padded to ``image_size`` squared (``size_divisible``), which also keeps the
    strides that the anchors and RoIAlign infer from the padded batch right.
    """
    from timm.layers import LayerNorm2d
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead

    scale = image_size / 1024
    backbone = ViTBackbone(vit, blocks, image_size, channels, frozen, drop_path)
    anchors = AnchorGenerator(tuple((max(1, round(32 * 2**i * scale)),) for i in range(5)),
                              ((0.5, 1.0, 2.0),) * 5)
    canonical = max(1, round(224 * scale))
    return MaskRCNN(
        backbone, num_classes=None, min_size=image_size, max_size=image_size,
        image_mean=list(mean), image_std=list(std), size_divisible=image_size,
        _skip_resize=True,
        rpn_anchor_generator=anchors, rpn_head=RPNHead(channels, 3, conv_depth=2),
        rpn_pre_nms_top_n_train=proposals_train[0], rpn_post_nms_top_n_train=proposals_train[1],
        rpn_pre_nms_top_n_test=proposals_test[0], rpn_post_nms_top_n_test=proposals_test[1],
        box_roi_pool=_roi_align(7, canonical),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels] * box_convs, [box_fc],
                                    norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(box_fc, num_classes + 1),
        box_batch_size_per_image=roi_batch_size,
        mask_roi_pool=_roi_align(14, canonical),
        mask_head=MaskRCNNHeads(channels, [channels] * mask_convs, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1),
    )
