"""MAE (He et al. 2022): the encoder sees a random 25% of the patches; a light decoder fills in
mask tokens and regresses the per-patch normalised pixels; the loss counts masked patches only."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from repsim_minizoo.data import ViewSpec, normalize, random_view
from repsim_minizoo.objectives import Objective
from repsim_minizoo.vit import encode, patch_tokens, random_keep


@dataclass(frozen=True)
class Config:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 2
    # MAE needs no hand-made invariances: crops only.
    view: ViewSpec = field(default_factory=lambda: ViewSpec(16, scale=(0.5, 1.0), rotate=0.0,
                                                            jitter=0.0))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, T, patch·patch·C]`` in the patch embedding's row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error per patch, averaged over masked patches (``mask`` 1) only.

    ``norm_pix``: each target patch is normalised by its own mean and variance."""
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class MAE(Objective):
    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        from timm.layers import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        super().__init__(vit)
        self.cfg = cfg
        d, dd = vit.embed_dim, cfg.decoder_dim
        grid = vit.patch_embed.grid_size
        self.patch = vit.patch_embed.patch_size[0]
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        nn.init.normal_(self.mask_token, std=0.02)
        # Fixed 2-D sin-cos positions for the decoder, a zero slot for CLS (as in MAE).
        pos = build_sincos2d_pos_embed(list(grid), dim=dd)
        self.register_buffer("decoder_pos", torch.cat([torch.zeros(1, dd), pos])[None])
        self.decoder = nn.Sequential(*[Block(dd, cfg.decoder_heads, qkv_bias=True)
                                       for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd)
        pixels = self.patch * self.patch * vit.patch_embed.proj.in_channels
        self.decoder_pred = nn.Linear(dd, pixels)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
             progress: float) -> torch.Tensor:
        x = normalize(random_view(images, self.cfg.view, g))
        tokens = patch_tokens(self.vit, x)
        b, t = tokens.shape[0], tokens.shape[1] - 1
        keep = max(1, int(round(t * (1 - self.cfg.mask_ratio))))
        kept, order = random_keep(tokens, keep, g)
        latent = self.decoder_embed(encode(self.vit, kept))
        # Un-shuffle: visible latents and mask tokens back to their patch positions.
        restore = torch.argsort(order, dim=1)
        shuffled = torch.cat([latent[:, 1:], self.mask_token.expand(b, t - keep, -1)], dim=1)
        patches = torch.gather(shuffled, 1, restore[..., None].expand(-1, -1, shuffled.shape[2]))
        y = torch.cat([latent[:, :1], patches], dim=1) + self.decoder_pos
        pred = self.decoder_pred(self.decoder_norm(self.decoder(y)))[:, 1:]
        mask = torch.ones(b, t)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)  # 1 where the patch was hidden from the encoder
        return mae_loss(pred, patchify(x, self.patch), mask, self.cfg.norm_pix_loss)


OBJECTIVE = MAE
