"""DINO (Caron et al. 2021): a student matches an EMA teacher's centred, sharpened distribution
over prototypes, across multi-crop views (teacher: global crops only; student: all crops)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from repsim_minizoo.data import ViewSpec, normalize, random_view
from repsim_minizoo.objectives import Objective
from repsim_minizoo.vit import cosine_ramp, ema_update, frozen_copy


@dataclass(frozen=True)
class Config:
    out_dim: int = 256  # prototypes (65,536 in DINO)
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    student_temp: float = 0.1
    # Sharper than DINO's 0.04 → 0.07: the tiny ViT's CLS outputs start almost alike across
    # images, and at 0.04–0.07 centring won and the outputs collapsed to uniform (README, "Tuning").
    teacher_temp: float = 0.04  # reached after the warm-up from warmup_teacher_temp
    warmup_teacher_temp: float = 0.02
    teacher_temp_warmup: float = 0.3  # fraction of training
    centre_momentum: float = 0.9
    momentum: float = 0.99  # teacher EMA, cosine ramp to 1
    local_crops: int = 4
    use_bn_in_head: bool = True  # DINO's option; spreads the head's outputs from the start
    norm_last_layer: bool = True
    # Milder than DINO's ImageNet views: on 16-px digits the strong ones also led to collapse.
    global1: ViewSpec = field(default_factory=lambda: ViewSpec(16, scale=(0.7, 1.0), rotate=5.0,
                                                               jitter=0.2, blur_p=0.5))
    global2: ViewSpec = field(default_factory=lambda: ViewSpec(16, scale=(0.7, 1.0), rotate=5.0,
                                                               jitter=0.2, blur_p=0.1,
                                                               solarize_p=0.1))
    local: ViewSpec = field(default_factory=lambda: ViewSpec(8, scale=(0.4, 0.7), rotate=5.0,
                                                             jitter=0.2, blur_p=0.3))


class DINOHead(nn.Module):
    """MLP to an L2-normalised bottleneck, then scores against the prototypes; with
    ``norm_last_layer`` the prototypes are unit vectors (DINO's weight norm with g fixed to 1).
    ``use_bn``: BatchNorm in the MLP (DINO's ``use_bn_in_head`` option)."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int, use_bn: bool,
                 norm_last_layer: bool) -> None:
        super().__init__()
        norm = nn.BatchNorm1d if use_bn else nn.Identity
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), norm(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), norm(hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)
        self.norm_last_layer = norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.prototypes, dim=-1) if self.norm_last_layer else self.prototypes
        return F.normalize(self.mlp(x), dim=-1) @ w.T


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], centre: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Mean cross-entropy H(teacher view i, student view j) over all pairs with i ≠ j.

    The teacher's outputs are centred (minus ``centre``) and sharpened (low ``teacher_temp``);
    the two together avoid collapse. ``student[i]`` and ``teacher[i]`` are the same crop for the
    global views, which come first."""
    targets = [F.softmax((t - centre) / teacher_temp, dim=-1).detach() for t in teacher]
    logps = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [-(t * lp).sum(-1).mean() for i, t in enumerate(targets)
             for j, lp in enumerate(logps) if i != j]
    return torch.stack(terms).mean()


def update_centre(centre: torch.Tensor, teacher: list[torch.Tensor],
                  momentum: float) -> torch.Tensor:
    """EMA of the teacher's mean output over the batch and its views."""
    return centre * momentum + torch.cat(teacher).mean(0, keepdim=True) * (1 - momentum)


class DINO(Objective):
    def __init__(self, vit: nn.Module, cfg: Config) -> None:
        super().__init__(vit)
        self.cfg = cfg
        self.head = DINOHead(vit.embed_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim,
                             cfg.use_bn_in_head, cfg.norm_last_layer)
        self.teacher_vit = frozen_copy(vit)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("centre", torch.zeros(1, cfg.out_dim))

    def loss(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
             progress: float) -> torch.Tensor:
        c, b = self.cfg, images.shape[0]
        globals_ = torch.cat([normalize(random_view(images, c.global1, g)),
                              normalize(random_view(images, c.global2, g))])
        locals_ = torch.cat([normalize(random_view(images, c.local, g))
                             for _ in range(c.local_crops)]) if c.local_crops else None
        # The backbone runs once per crop size (timm interpolates the positions for the smaller
        # local crops); the head sees all crops together, as in DINO's MultiCropWrapper.
        feats = [self.vit(globals_)] + ([self.vit(locals_)] if locals_ is not None else [])
        student = list(self.head(torch.cat(feats)).split(b))
        with torch.no_grad():
            teacher = list(self.teacher_head(self.teacher_vit(globals_)).split(b))
        warm = min(progress / c.teacher_temp_warmup, 1.0) if c.teacher_temp_warmup else 1.0
        t_temp = c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * warm
        loss = dino_loss(student, teacher, self.centre, c.student_temp, t_temp)
        self.centre.copy_(update_centre(self.centre, teacher, c.centre_momentum))
        return loss

    def after_step(self, progress: float) -> None:
        m = cosine_ramp(self.cfg.momentum, 1.0, progress)
        ema_update(self.teacher_vit, self.vit, m)
        ema_update(self.teacher_head, self.head, m)


OBJECTIVE = DINO
