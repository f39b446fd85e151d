"""The shared timm ViT and the pieces the objectives reuse: token masking, MLP heads, EMA."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from repsim_minizoo.config import Arch


def build_vit(arch: Arch, seed: int, num_classes: int | None = None,
              drop_path: float = 0.0) -> nn.Module:
    """The timm ``VisionTransformer`` of ``arch``, initialised from ``seed``.

    Always built with the classification head first, then the head is dropped if
    ``num_classes == 0``: the backbone's initial weights are then identical for every objective.
    ``dynamic_img_size`` lets DINO and MSN feed smaller local crops through the same network.
    """
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans,
        num_classes=arch.num_classes, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, dynamic_img_size=True,
        drop_path_rate=drop_path,
    )
    if num_classes is not None and num_classes != arch.num_classes:
        vit.reset_classifier(num_classes)
    return vit


def patch_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Embedded tokens ``[B, 1 + T, D]``: CLS then patches, position embeddings added."""
    return vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))


def encode(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Run embedded tokens through the blocks and the final norm."""
    return vit.norm(vit.blocks(tokens))


def random_keep(tokens: torch.Tensor, keep: int, g: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the CLS token and ``keep`` random patch tokens per example.

    Returns the kept tokens ``[B, 1 + keep, D]`` and ``order`` ``[B, T]``, a random permutation of
    the patch indices whose first ``keep`` entries are the kept patches (MAE's shuffle).
    """
    b, t = tokens.shape[0], tokens.shape[1] - 1
    order = torch.argsort(torch.rand(b, t, generator=g), dim=1)
    idx = order[:, :keep, None].expand(-1, -1, tokens.shape[2])
    kept = torch.gather(tokens[:, 1:], 1, idx)
    return torch.cat([tokens[:, :1], kept], dim=1), order


def mlp(dims: list[int], last_bn: bool = False, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """Linear–BatchNorm–activation layers, a linear layer last (MoCo-v3 / MSN projector style);
    ``last_bn`` adds MoCo-v3's final BatchNorm without affine parameters."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(b), act()]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A momentum (EMA) copy that gets no gradients."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target ← m·target + (1 − m)·online`` for every parameter (BatchNorm statistics of the
    target come from its own forward passes in train mode, as in MoCo-v3 and DINO)."""
    # one foreach kernel over every tensor rather than two small ops per tensor
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - momentum)


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """Cosine schedule from ``start`` (progress 0) to ``end`` (progress 1)."""
    return end - (end - start) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2
