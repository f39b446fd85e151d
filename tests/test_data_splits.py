"""Image-folder splits: a split that was asked for and is absent is refused, never mixed in."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from repsim.errors import DataError
from repsim.plugins import build_part
from repsim.recipe import DataSection


def _image_tree(folder: Path, classes: tuple[str, ...] = ("cat", "dog")) -> None:
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4), (10, 20, 30)).save(folder / cls / "0.png")


@pytest.fixture
def split_root(tmp_path: Path) -> Path:
    """``root/{train,val}/{cat,dog}/0.png``."""
    for split in ("train", "val"):
        _image_tree(tmp_path / "imagenet" / split)
    return tmp_path / "imagenet"


def test_absent_split_is_refused_naming_the_splits_that_exist(split_root: Path) -> None:
    with pytest.raises(DataError) as err:
        build_part("dataset", "imagefolder", root=split_root, split="test")
    msg = str(err.value)
    assert str(split_root) in msg and "'test'" in msg
    assert "train, val" in msg  # the splits that exist
    assert "root" in msg and "split" in msg  # the two ways to fix it


def test_absent_split_of_with_split_is_refused_too(split_root: Path) -> None:
    data = build_part("dataset", "imagefolder", root=split_root, split="val")
    with pytest.raises(DataError, match="train, val"):
        data.with_split("test")


def test_existing_split_reads_its_class_folders(split_root: Path) -> None:
    data = build_part("dataset", "imagefolder", root=split_root, split="val")
    assert data.classes == ["cat", "dog"] and len(data) == 2
    assert data.with_split("train").classes == ["cat", "dog"]


def test_root_that_is_the_folder_of_one_split_is_read_as_that_split(tmp_path: Path) -> None:
    _image_tree(tmp_path / "val")
    data = build_part("dataset", "imagefolder", root=tmp_path / "val")  # default split "val"
    assert data.classes == ["cat", "dog"] and len(data) == 2
    # Naming the split that folder holds is the fix the error above proposes.
    assert build_part("dataset", "imagefolder", root=tmp_path / "val", split="test").classes \
        == ["cat", "dog"]


def test_split_conflict_names_both_values_and_the_fix() -> None:
    from repsim.data.base import split_conflict

    msg = split_conflict("test", {"root": "x", "split": "val"})
    assert msg is not None
    assert "data.split = 'test'" in msg and "data.params.split = 'val'" in msg
    assert "remove" in msg
    assert split_conflict("val", {"split": "val"}) is None
    assert split_conflict("val", {"root": "x"}) is None


def test_only_a_split_written_in_data_is_told_apart_from_the_default() -> None:
    # How recipe.py tells a written `data.split` from its default "val": pydantic's fields set.
    written = DataSection.model_validate({"dataset": "imagefolder", "split": "val"})
    default = DataSection.model_validate({"dataset": "imagefolder"})
    assert "split" in written.model_fields_set and "split" not in default.model_fields_set
