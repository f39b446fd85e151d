"""Training batches: timm's augmentation and mixup, each draw from a seed of its own.

timm's transforms draw from Python's ``random``, numpy's and torch's global generators, mixup
from numpy's. Each example is augmented under a seed derived from (epoch seed, example index),
each micro-batch mixed and its drop-path masks drawn under seeds derived from (epoch seed, global
micro-batch index). So the numbers do not depend on data-loading workers, on where a run resumed,
or on how the global batch is cut into processes and accumulation steps.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from repsim.data.base import ImageDataset
from repsim.finetune.config import Settings
from repsim.models.base import Preprocess

# Purposes of derived seeds.
AUGMENT, MIX, MODEL = 0, 1, 2


def derive(epoch_seed: int, purpose: int, index: int) -> int:
    """A 32-bit seed for one draw, independent of every other (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([epoch_seed, purpose, index]).generate_state(1)[0])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's CPU generators seeded for the block, restored after."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def seed_device(seed: int, device: torch.device) -> None:
    """Seed the generators the model's random layers (drop path) draw from on ``device``."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def train_transform(settings: Settings, preprocess: Preprocess, model: str) -> Any:
    """timm's training transform (random resized crop, flip, RandAugment, colour jitter, random
    erasing) at the model's input size, normalised as the model's own preprocess does."""
    from timm.data import create_transform

    from repsim.errors import RecipeError

    size = settings.img_size or preprocess.crop or preprocess.resize
    if size is None:
        raise RecipeError(f"model '{model}' has no input size in its preprocess (crop): set "
                          "finetune.img_size.")
    # Images go through timm as RGB; a one-channel model gets the first channel of a grey image
    # (its statistics repeated, so RandAugment's fill colour is grey too).
    mean, std = tuple(preprocess.mean), tuple(preprocess.std)
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    transform = create_transform(
        size, is_training=True, scale=settings.crop_scale, ratio=settings.crop_ratio,
        hflip=settings.hflip, color_jitter=settings.color_jitter or None,
        auto_augment=settings.auto_augment, interpolation=settings.interpolation, mean=mean,
        std=std, re_prob=settings.random_erase, re_mode="pixel")  # MAE's erasing: noise
    _posterize_zero_bits(transform)
    return transform


def _posterize(img: Any, bits: int, **_: Any) -> Any:
    from PIL import Image, ImageOps

    if bits >= 8:
        return img
    if bits <= 0:  # what Pillow's posterize returned for 0 bits before it refused them
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def _posterize_zero_bits(transform: Any) -> None:
    """Let this transform's RandAugment posterize to 0 bits. timm's increasing posterize keeps
    0 bits at magnitude 10 (m9 ± 0.5 reaches it), which Pillow 11+ refuses with a ValueError;
    older Pillow returned a black image, as :func:`_posterize` does. Only this instance's ops
    change."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []) if isinstance(t, auto_augment.RandAugment) else []:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize


def to_pil(image: torch.Tensor, grey: bool) -> Any:
    """A ``[C, H, W]`` image in [0, 1] as an RGB PIL image (grey: of equal channels)."""
    from PIL import Image

    arr = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    return (pil.convert("L") if grey else pil).convert("RGB")


class TrainImages(torch.utils.data.Dataset):
    """Examples of a dataset through the training transform; items are (index, seed)."""

    def __init__(self, data: ImageDataset, transform: Any, channels: int) -> None:
        self.data, self.transform, self.channels = data, transform, channels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        image, label = self.data[index]
        with seeded(seed):
            x = self.transform(to_pil(image, grey=self.channels == 1))
        return x[:self.channels], label


class EvalImages(torch.utils.data.Dataset):
    """Examples of a dataset through the model's own (evaluation) preprocess."""

    def __init__(self, data: ImageDataset, preprocess: Preprocess) -> None:
        self.data, self.preprocess = data, preprocess

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.data[index]
        return self.preprocess(image), label
