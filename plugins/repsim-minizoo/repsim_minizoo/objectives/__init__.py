"""One module per training objective; each defines ``Config`` and ``OBJECTIVE``, an
:class:`Objective` subclass built as ``OBJECTIVE(vit, Config())``.

``load(name)`` imports an objective's module on demand (torch comes with it).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from types import ModuleType

import torch
from torch import nn


class Objective(nn.Module, ABC):
    """A backbone ``vit`` plus whatever the method trains around it (heads, EMA copies, decoder).

    ``keeps_head``: the saved backbone keeps its classification head (supervised training).
    """

    keeps_head: bool = False

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    @abstractmethod
    def loss(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
             progress: float) -> torch.Tensor:
        """The objective on one minibatch of ``[B, C, H, W]`` images in [0, 1].

        ``g`` draws views and masks; ``progress`` in [0, 1) drives schedules (temperatures)."""

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step (momentum-encoder updates)."""


def load(name: str) -> ModuleType:
    """The module of objective ``name`` (``mocov3``, ``dino``, ``mae``, ``msn``, ``supervised``)."""
    return importlib.import_module(f"repsim_minizoo.objectives.{name}")
