"""Built-in datasets: a local image folder, scikit-learn's digits, and generated shapes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from repsim.data.base import ImageDataset
from repsim.errors import DataError
from repsim.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
# Pillow's modes of one unsigned 16-bit channel (16-bit greyscale PNG, TIFF, PGM).
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


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


_SPLIT = "the fixed, stratified train/val split (seeded), or all images"


class DigitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "val", "all"] = Field("val", description=_SPLIT)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of the images in 'val'")
    seed: int = Field(0, description="seed of the train/val split")


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
    split: Literal["train", "val", "all"] = Field("val", description=_SPLIT + " (val: 25 %)")
    examples: int = Field(256, ge=4, description="images generated over all splits")
    classes: int = Field(4, ge=2, description="one random pattern per class")
    size: int = Field(16, ge=4, description="image height and width in pixels")
    channels: Literal[1, 3] = Field(3, description="colour channels")
    noise: float = Field(0.1, ge=0, description="std of the Gaussian noise added to the pattern")
    seed: int = Field(0, description="seed of the patterns, the noise and the split")


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
    split: str = Field("val", description="subfolder of root holding this split; a root without "
                                          "split folders is the folder of this split")


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir()]


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.iterdir())


def _split_folders(root: Path) -> list[str]:
    """The subfolders of ``root`` laid out as splits: no images of their own, class folders."""
    return sorted(d.name for d in _subfolders(root)
                  if not _holds_images(d) and any(_holds_images(c) for c in _subfolders(d)))


def _no_split(root: Path, split: str, splits: list[str]) -> DataError:
    if splits:
        return DataError(
            f"image folder '{root}' has no split folder '{split}'; its splits are "
            f"{', '.join(splits)}. Name one of them as the split (e.g. `split = \"{splits[-1]}\"` "
            f"in [data]), or give the folder holding the '{split}' split's class folders as "
            "`root`.")
    return DataError(
        f"image folder '{root}' has no split folder '{split}': its subfolders are the classes of "
        f"one split. Lay the splits out as '<root>/<split>/<class>/<image>' (e.g. "
        f"'<root>/{split}/...') and give that <root> as `root`.")


def _rgb8(img: Image.Image, path: Path) -> np.ndarray:
    """The image as ``[H, W, 3]`` uint8; 16-bit greyscale is scaled to 8 bits, not clipped."""
    import numpy as np

    # Pillow's convert("RGB") clips 16- and 32-bit values at 255, so scale them here.
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        v = np.asarray(img).astype(np.int64)
        lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise DataError(
                f"cannot read image '{path}' faithfully: it is a 32-bit integer image (mode "
                f"'I') with values {lo}..{hi}, outside the 16-bit range 0..65535 that is scaled "
                "to 8 bits. Save it as an 8-bit or 16-bit image.")
        # round(v / 257) in integers; 257 is odd, so no value falls halfway.
        grey = ((v + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F" or img.mode.startswith("I"):
        raise DataError(
            f"cannot read image '{path}' faithfully: mode '{img.mode}' (floating-point or "
            "wide integer pixels) has no defined white level to scale to 8 bits. Save it as an "
            "8-bit or 16-bit image.")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class ImageFolder(ImageDataset):
    """Images in ``root/[split/]class/*.ext`` (the ImageNet layout); read lazily with Pillow.

    ``root/split`` holds the split's class folders; a root without split folders holds them
    itself. A root with split folders but none named ``split`` is refused, never read whole.
    """

    def __init__(self, root: Path, split: str) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder '{root}' does not exist. Check `root` in the recipe.")
        folder = root / split
        if not folder.is_dir():
            splits = _split_folders(root)
            if splits:  # reading root would make its splits the classes
                raise _no_split(root, split, splits)
            folder = root
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
        import torch
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                arr = _rgb8(img, path)
        except OSError as exc:
            raise DataError(f"cannot read image '{path}': {exc}. Remove or replace the file.") \
                from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0, label

    def with_split(self, split: str) -> ImageDataset:
        if not (self.root / split).is_dir():  # never fall back to root: it holds another split
            raise _no_split(self.root, split, _split_folders(self.root))
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
