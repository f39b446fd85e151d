"""Supervised training (the reference): cross-entropy with label smoothing, light augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from repsim_minizoo.data import ViewSpec, normalize, random_view
from repsim_minizoo.objectives import Objective


@dataclass(frozen=True)
class Config:
    label_smoothing: float = 0.1
    view: ViewSpec = field(default_factory=lambda: ViewSpec(16, scale=(0.5, 1.0), jitter=0.3))


class Supervised(Objective):
    keeps_head = True

    def __init__(self, vit: torch.nn.Module, cfg: Config) -> None:
        super().__init__(vit)
        self.cfg = cfg

    def loss(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
             progress: float) -> torch.Tensor:
        logits = self.vit(normalize(random_view(images, self.cfg.view, g)))
        return F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)


OBJECTIVE = Supervised
