"""Built-in datasets: a local image folder, scikit-learn's digits, and generated shapes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from repsim.data.base import ImageDataset
from repsim.errors import DataError
from repsim.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class TensorDataset(ImageDataset):
    """Images held in memory as one ``[N, C, H, W]`` float tensor."""

    def __init__(self, name: str, split: str, images: torch.Tensor, labels: torch.Tensor,
                 classes: list[str], splits: dict[str, TensorDataset] | None = None) -> None:
        self.name, self.split, self.classes = name, split, classes
        self.images, self.labels = images, labels
        self._splits = splits if splits is not None else {}
        self._splits[split] = self

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def with_split(self, split: str) -> ImageDataset:
        if split not in self._splits:
            raise DataError(f"dataset '{self.name}' has no split '{split}'; it has "
                            f"{sorted(self._splits)}.")
        return self._splits[split]


def split_tensors(name: str, split: str, images: torch.Tensor, labels: torch.Tensor,
                  classes: list[str], val_fraction: float, seed: int) -> ImageDataset:
    """A fixed, stratified train/val split (plus ``all``), identical on every machine."""
    import torch
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(labels)).numpy()
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed,
                                          stratify=labels.numpy())
    splits: dict[str, TensorDataset] = {}
    for s, ix in (("train", sorted(train_idx)), ("val", sorted(val_idx)), ("all", idx)):
        ix_t = torch.as_tensor(ix)
        TensorDataset(name, s, images[ix_t], labels[ix_t], classes, splits)
    if split not in splits:
        raise DataError(f"dataset '{name}' has no split '{split}'; use train, val or all.")
    return splits[split]


class DigitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "val", "all"] = "val"
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


def build_digits(params: DigitsParams) -> ImageDataset:
    """The 1,797 8×8 handwritten digits that ship with scikit-learn (real images, no download)."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.as_tensor(d.target, dtype=torch.long)
    return split_tensors("digits", params.split, images, labels, [str(i) for i in range(10)],
                         params.val_fraction, params.seed)


class SyntheticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "val", "all"] = "val"
    examples: int = Field(256, ge=4)
    classes: int = Field(4, ge=2)
    size: int = Field(16, ge=4)
    channels: Literal[1, 3] = 3
    noise: float = Field(0.1, ge=0)
    seed: int = 0


def build_synthetic(params: SyntheticParams) -> ImageDataset:
    """Generated images: one smooth random pattern per class plus noise (for tests and demos)."""
    import torch

    g = torch.Generator().manual_seed(params.seed)
    c, s = params.channels, params.size
    prototypes = torch.nn.functional.interpolate(
        torch.rand(params.classes, c, 4, 4, generator=g), size=(s, s), mode="bilinear",
        align_corners=False)
    labels = torch.arange(params.examples) % params.classes
    images = prototypes[labels] + params.noise * torch.randn(params.examples, c, s, s, generator=g)
    images = images.clamp(0, 1)
    return split_tensors("synthetic", params.split, images, labels,
                         [f"class{i}" for i in range(params.classes)], 0.25, params.seed)


class ImageFolderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: Path = Field(description="folder of class subfolders, or of split folders of them")
    split: str = Field("val", description="subfolder of root holding this split, if root has one")


class ImageFolder(ImageDataset):
    """Images in ``root/[split/]class/*.ext`` (the ImageNet layout); read lazily with Pillow."""

    def __init__(self, root: Path, split: str) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder '{root}' does not exist. Check `root` in the recipe.")
        folder = root / split if (root / split).is_dir() else root
        self.root, self.name, self.split = root, f"imagefolder:{root}", split
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not self.classes:
            raise DataError(
                f"image folder '{folder}' has no class subfolders. Expected "
                f"'{folder}/<class>/<image>' (e.g. ImageNet's val in class folders)."
            )
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            for p in sorted((folder / cls).rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    self.samples.append((p, label))
        if not self.samples:
            raise DataError(f"image folder '{folder}' has class folders but no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}).")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        import numpy as np
        import torch
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"cannot read image '{path}': {exc}. Remove or replace the file.") \
                from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0, label

    def with_split(self, split: str) -> ImageDataset:
        if not (self.root / split).is_dir():
            raise DataError(f"image folder '{self.root}' has no split folder '{split}'. Put that "
                            f"split's class folders in '{self.root / split}'.")
        return ImageFolder(self.root, split)


@hookimpl
def register_datasets(register: Register) -> None:
    register("imagefolder", _build_imagefolder, params=ImageFolderParams,
             summary="a local folder of class subfolders (e.g. ImageNet val)")
    register("digits", build_digits, params=DigitsParams,
             summary="scikit-learn's 1,797 8x8 handwritten digits; fixed stratified train/val")
    register("synthetic", build_synthetic, params=SyntheticParams,
             summary="generated class patterns with noise, for tests and demos")


def _build_imagefolder(params: ImageFolderParams) -> ImageDataset:
    return ImageFolder(params.root, params.split)
