"""MoCo-v3 (Chen, Xie, He 2021): two augmented views, a momentum encoder, a predictor, and a
symmetric InfoNCE loss at temperature τ whose negatives are the other images of the batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from repsim_minizoo.data import ViewSpec, normalize, random_view
from repsim_minizoo.objectives import Objective
from repsim_minizoo.vit import cosine_ramp, ema_update, frozen_copy, mlp


@dataclass(frozen=True)
class Config:
    temperature: float = 0.2  # MoCo-v3's value for ViTs
    # Start of the cosine ramp to 1. The seeds' 0.99 averages over ~100 of ~90k steps; over a
    # few hundred steps 0.99 left the keys lagging and the loss near chance (README, "Tuning").
    momentum: float = 0.9
    hidden_dim: int = 256
    out_dim: int = 64
    # BYOL's asymmetric augmentations, as MoCo-v3 uses them (no flips or colour for digits).
    view1: ViewSpec = field(default_factory=lambda: ViewSpec(16, scale=(0.4, 1.0), rotate=10.0,
                                                             jitter=0.3, blur_p=1.0))
    view2: ViewSpec = field(default_factory=lambda: ViewSpec(16, scale=(0.4, 1.0), rotate=10.0,
                                                             jitter=0.3, blur_p=0.1,
                                                             solarize_p=0.2))


def infonce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries against keys (positives on the diagonal), scaled by 2τ as in MoCo-v3."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * temperature)


class MoCoV3(Objective):
    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit)
        self.cfg = cfg
        d, h, o = vit.embed_dim, cfg.hidden_dim, cfg.out_dim
        self.projector = mlp([d, h, h, o], last_bn=True, act=nn.ReLU)
        self.predictor = mlp([o, h, o], last_bn=True, act=nn.ReLU)
        self.momentum_vit = frozen_copy(vit)
        self.momentum_projector = frozen_copy(self.projector)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
             progress: float) -> torch.Tensor:
        b = images.shape[0]
        x = torch.cat([normalize(random_view(images, self.cfg.view1, g)),
                       normalize(random_view(images, self.cfg.view2, g))])
        h = self.vit(x)  # CLS features of both views in one pass; BatchNorm then sees one view
        q1, q2 = (self.predictor(self.projector(v)) for v in h.split(b))
        with torch.no_grad():
            hk = self.momentum_vit(x)
            k1, k2 = (self.momentum_projector(v) for v in hk.split(b))
        return infonce(q1, k2, self.cfg.temperature) + infonce(q2, k1, self.cfg.temperature)

    def after_step(self, progress: float) -> None:
        m = cosine_ramp(self.cfg.momentum, 1.0, progress)
        ema_update(self.momentum_vit, self.vit, m)
        ema_update(self.momentum_projector, self.projector, m)


OBJECTIVE = MoCoV3
