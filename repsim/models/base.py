"""What a model builder returns: the network, its input transform and how its tokens are laid out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Per-image input transform on ``[C, H, W]`` float tensors in [0, 1].

    Resize the shorter side to ``resize``, centre-crop ``crop``, repeat a single channel to
    ``channels``, normalise with ``mean``/``std``. Hashable: models with the same transform share
    one preprocessed batch.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"

    @classmethod
    def imagenet(cls) -> Preprocess:
        """The official evaluations' transform: resize 256, centre crop 224, ImageNet mean/std."""
        return cls(resize=256, crop=224)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import torch
        from torchvision.transforms.v2 import functional as TF
        from torchvision.transforms.v2 import InterpolationMode

        if image.ndim == 2:
            image = image[None]
        if image.shape[0] == 1 and self.channels == 3:
            image = image.expand(3, -1, -1)
        mode = InterpolationMode(self.interpolation)
        if self.resize is not None:
            image = TF.resize(image, [self.resize], interpolation=mode, antialias=True)
        if self.crop is not None:
            image = TF.center_crop(image, [self.crop, self.crop])
        mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]
        return (image - mean) / std

    def describe(self) -> str:
        parts = []
        if self.resize is not None:
            filt = "" if self.interpolation == "bilinear" else f" ({self.interpolation})"
            parts.append(f"resize {self.resize}{filt}")
        if self.crop is not None:
            parts.append(f"centre-crop {self.crop}")
        name = "ImageNet" if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD) else "custom"
        parts.append(f"{name} mean/std")
        return ", ".join(parts)


@dataclass
class LoadedModel:
    """A built network in eval mode, ready for feature extraction.

    ``num_prefix_tokens`` says how many leading tokens (CLS, registers) a transformer output has,
    which the ``cls`` and ``gap_no_cls`` reductions need. ``provenance`` records the checkpoint and
    every dropped or missing key.
    """

    module: nn.Module
    preprocess: Preprocess
    name: str = ""
    num_prefix_tokens: int = 0
    family: str = "other"  # "vit", "cnn" or "other"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module.eval()
