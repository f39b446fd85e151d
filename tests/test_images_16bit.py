"""16-bit images are scaled to 8 bits (v / 257, rounded), not clipped at 255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repsim.errors import DataError
from repsim.plugins import build_part

# A gradient over the whole 16-bit range, with values between the multiples of 257 so that
# rounding (not truncation) is checked too.
GRADIENT = np.arange(0, 65536, 97, dtype=np.uint16)[:672].reshape(16, 42)
GRADIENT[-1, -1] = 65535


def _load_single(tmp_path: Path, img: Image.Image, name: str) -> torch.Tensor:
    (tmp_path / "cls").mkdir()
    img.save(tmp_path / "cls" / name)
    data = build_part("dataset", "imagefolder", root=tmp_path)
    image, label = data[0]
    assert label == 0
    return image


def _expected(values: np.ndarray) -> torch.Tensor:
    eight = np.array([round(int(v) / 257) for v in values.ravel()]).reshape(values.shape)
    return torch.from_numpy(eight).float()


def test_16bit_png_gradient_is_scaled_not_clipped(tmp_path: Path) -> None:
    img = Image.fromarray(GRADIENT)  # uint16 -> mode "I;16"
    image = _load_single(tmp_path, img, "gradient.png")
    with Image.open(tmp_path / "cls" / "gradient.png") as check:
        assert check.mode == "I;16"  # what Pillow hands the loader
    assert image.shape == (3, *GRADIENT.shape)
    pixels = (image * 255).round()
    for channel in pixels:
        assert torch.equal(channel, _expected(GRADIENT))


def test_big_endian_16bit_tiff_is_scaled(tmp_path: Path) -> None:
    img = Image.frombytes("I;16B", GRADIENT.shape[::-1], GRADIENT.astype(">u2").tobytes())
    image = _load_single(tmp_path, img, "gradient.tif")
    assert torch.equal((image[0] * 255).round(), _expected(GRADIENT))


def test_32bit_integer_image_within_16_bits_is_scaled(tmp_path: Path) -> None:
    img = Image.fromarray(GRADIENT.astype(np.int32))  # mode "I", as 16-bit PGMs open
    assert img.mode == "I"
    image = _load_single(tmp_path, img, "gradient.tif")
    assert torch.equal((image[0] * 255).round(), _expected(GRADIENT))


def test_32bit_integer_image_beyond_16_bits_is_refused(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    with pytest.raises(DataError, match=r"huge\.tif.*mode 'I'.*70000"):
        _load_single(tmp_path, img, "huge.tif")


def test_float_image_is_refused(tmp_path: Path) -> None:
    img = Image.fromarray(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(DataError, match=r"float\.tif.*mode 'F'"):
        _load_single(tmp_path, img, "float.tif")
