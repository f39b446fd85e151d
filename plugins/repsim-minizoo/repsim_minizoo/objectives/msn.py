"""MSN (Assran et al. 2022): masked anchor views must match, in their soft assignment to learnable
prototypes, the sharper assignment of an unmasked target view from an EMA encoder; mean-entropy
maximisation (ME-MAX) keeps all prototypes in use. Joint-embedding, not reconstruction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from repsim_minizoo.data import ViewSpec, normalize, random_view
from repsim_minizoo.objectives import Objective
from repsim_minizoo.vit import cosine_ramp, ema_update, encode, frozen_copy, mlp, patch_tokens, \
    random_keep


@dataclass(frozen=True)
class Config:
    prototypes: int = 256  # 1,024 in MSN
    hidden_dim: int = 256
    out_dim: int = 64
    temperature: float = 0.1  # anchors
    target_temp: float = 0.025  # targets: MSN's softmax at 0.1 sharpened with T = 0.25
    me_max_weight: float = 1.0
    mask_ratio: float = 0.3  # random patch masking of the anchor view (0.3 for MSN's ViT-S)
    focal_views: int = 2  # small crops, the "focal masking" of MSN
    momentum: float = 0.99  # target encoder EMA, cosine ramp to 1
    # Mild views, as for DINO (README, "Tuning").
    view: ViewSpec = field(default_factory=lambda: ViewSpec(16, scale=(0.7, 1.0), rotate=5.0,
                                                            jitter=0.2, blur_p=0.2,
                                                            solarize_p=0.1))
    focal: ViewSpec = field(default_factory=lambda: ViewSpec(8, scale=(0.4, 0.7), rotate=5.0,
                                                             jitter=0.2, blur_p=0.2))


def msn_loss(anchor_logits: torch.Tensor, target_probs: torch.Tensor,
             me_max_weight: float) -> torch.Tensor:
    """Cross-entropy H(target, anchor) minus ``me_max_weight`` × entropy of the mean anchor
    prediction. ``anchor_logits``: ``[V·B, K]`` (V anchor views); ``target_probs``: ``[B, K]``."""
    views = anchor_logits.shape[0] // target_probs.shape[0]
    targets = target_probs.repeat(views, 1).detach()
    ce = -(targets * F.log_softmax(anchor_logits, dim=-1)).sum(-1).mean()
    mean_p = F.softmax(anchor_logits, dim=-1).mean(0)
    entropy = -(mean_p * torch.log(mean_p + 1e-12)).sum()
    return ce - me_max_weight * entropy


class MSN(Objective):
    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit)
        self.cfg = cfg
        self.projector = mlp([vit.embed_dim, cfg.hidden_dim, cfg.hidden_dim, cfg.out_dim])
        self.prototypes = nn.Parameter(torch.randn(cfg.prototypes, cfg.out_dim) * 0.02)
        self.target_vit = frozen_copy(vit)
        self.target_projector = frozen_copy(self.projector)

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding to each prototype."""
        return F.normalize(z, dim=-1) @ F.normalize(self.prototypes, dim=-1).T

    def loss(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
             progress: float) -> torch.Tensor:
        c = self.cfg
        target_x = normalize(random_view(images, c.view, g))
        anchor_x = normalize(random_view(images, c.view, g))
        tokens = patch_tokens(self.vit, anchor_x)
        keep = max(1, int(round((tokens.shape[1] - 1) * (1 - c.mask_ratio))))
        masked, _ = random_keep(tokens, keep, g)
        anchors = [encode(self.vit, masked)[:, 0]]  # CLS of the masked anchor
        if c.focal_views:
            focal = torch.cat([normalize(random_view(images, c.focal, g))
                               for _ in range(c.focal_views)])
            anchors.append(self.vit(focal))
        anchor_logits = self._scores(self.projector(torch.cat(anchors))) / c.temperature
        with torch.no_grad():
            z = self.target_projector(self.target_vit(target_x))
            target_probs = F.softmax(self._scores(z) / c.target_temp, dim=-1)
        return msn_loss(anchor_logits, target_probs, c.me_max_weight)

    def after_step(self, progress: float) -> None:
        m = cosine_ramp(self.cfg.momentum, 1.0, progress)
        ema_update(self.target_vit, self.vit, m)
        ema_update(self.target_projector, self.projector, m)


OBJECTIVE = MSN
