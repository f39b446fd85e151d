"""Training data and augmentations: the core's ``digits`` train split, upsampled to the ViT's size.

The zoo trains on the train split of the core's ``digits`` dataset only, so a recipe that evaluates
on its ``val`` split measures the models on images none of them saw. Augmentations run batched on
``[B, 1, H, W]`` tensors in [0, 1] with an explicit ``torch.Generator`` (deterministic for a seed).
No horizontal flips: a mirrored digit is another symbol (or none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

# Mean and std of the digits train split after the 8→16 bilinear upsampling (README, "Data").
MEAN = (0.3054,)
STD = (0.3190,)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: random crop (area ``scale``) with rotation, resized to ``size``."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    rotate: float = 15.0
    jitter: float = 0.4
    blur_p: float = 0.0
    solarize_p: float = 0.0


@lru_cache(maxsize=4)
def _digits(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.transforms.v2 import functional as TF

    from repsim.plugins import registry

    ds = registry("dataset").get("digits").create({"split": split})
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.tensor([ds[i][1] for i in range(len(ds))], dtype=torch.long)
    # The same resize as the models' Preprocess, so training and evaluation see the same pixels.
    images = TF.resize(images, [size], antialias=True).clamp(0, 1)
    return images, labels


def digits(split: str = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, 1, size, size]`` images in [0, 1], ``[N]`` labels) of a core ``digits`` split."""
    images, labels = _digits(split, size)
    return images.clone(), labels.clone()


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN[0]) / STD[0]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_view(x: torch.Tensor, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """Random resized crop + rotation (one affine warp), intensity jitter, blur, solarize."""
    b = x.shape[0]
    side = _uniform(b, *spec.scale, g).sqrt()  # crop side as a fraction of the image
    ratio = torch.exp(_uniform(b, math.log(3 / 4), math.log(4 / 3), g)).sqrt()
    sx, sy = (side * ratio).clamp(max=1), (side / ratio).clamp(max=1)
    tx, ty = (1 - sx) * _uniform(b, -1, 1, g), (1 - sy) * _uniform(b, -1, 1, g)
    angle = torch.deg2rad(_uniform(b, -spec.rotate, spec.rotate, g))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([sx * cos, -sy * sin, tx], 1),
                         torch.stack([sx * sin, sy * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, x.shape[1], spec.size, spec.size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if spec.jitter:
        contrast = _uniform(b, 1 - spec.jitter, 1 + spec.jitter, g).view(b, 1, 1, 1)
        bright = _uniform(b, -spec.jitter / 2, spec.jitter / 2, g).view(b, 1, 1, 1)
        out = (out * contrast + bright).clamp(0, 1)
    if spec.blur_p:
        out = torch.where(_chosen(b, spec.blur_p, g), _blur(out, g), out)
    if spec.solarize_p:
        out = torch.where(_chosen(b, spec.solarize_p, g), torch.where(out > 0.5, 1 - out, out), out)
    return out


def _chosen(b: int, p: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(b, generator=g) < p).view(b, 1, 1, 1)


def _blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Separable 3×3 Gaussian blur with a random sigma per image (edges replicated)."""
    b = x.shape[0]
    sigma = _uniform(b, 0.1, 1.0, g)
    side = torch.exp(-1 / (2 * sigma**2))  # weight of each neighbour relative to the centre
    w_side, w_mid = (side / (1 + 2 * side)).view(b, 1, 1, 1), (1 / (1 + 2 * side)).view(b, 1, 1, 1)
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = w_mid * p[:, :, 1:-1] + w_side * (p[:, :, :-2] + p[:, :, 2:])
    return w_mid * rows[..., 1:-1] + w_side * (rows[..., :-2] + rows[..., 2:])


class Batches:
    """Endless shuffled minibatches (a new permutation each epoch) drawn with a generator."""

    def __init__(self, n: int, batch_size: int, g: torch.Generator) -> None:
        self.n, self.batch_size, self.g = n, min(batch_size, n), g
        self._perm = torch.randperm(n, generator=g)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._pos + self.batch_size > self.n:
            self._perm, self._pos = torch.randperm(self.n, generator=self.g), 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx
