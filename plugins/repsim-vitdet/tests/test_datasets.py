"""The ``coco`` and ``coco_shapes`` datasets: layout, targets, determinism and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repsim.errors import DataError
from repsim.plugins import build_part
from repsim_vitdet.coco import CocoDataset


def shapes(**params) -> CocoDataset:
    return build_part("dataset", "coco_shapes", **params)


def test_coco_shapes_is_deterministic_and_has_small_and_large_objects() -> None:
    a, b = shapes(split="train"), shapes(split="train")
    assert a.coco.dataset == b.coco.dataset
    assert torch.equal(a.image(3), b.image(3))
    assert a.coco.dataset != shapes(split="val").coco.dataset
    assert a.coco.dataset != shapes(split="train", seed=1).coco.dataset
    areas = [ann["area"] for ann in a.coco.anns.values()]
    assert min(areas) < 32**2 and max(areas) > 96**2
    assert a.classes == ["rectangle", "disc", "triangle"]
    assert a.with_split("val").split == "val"
    with pytest.raises(DataError, match="no split 'test'"):
        a.with_split("test")


def test_item_is_an_image_and_a_label_for_the_feature_pass() -> None:
    ds = shapes(split="val", val_images=6)
    image, label = ds[0]
    assert image.ndim == 3 and image.shape[0] == 3 and 0 <= image.min() <= image.max() <= 1
    assert isinstance(label, int) and 0 <= label < len(ds.classes)
    # the torch default collate of the core's pass takes same-sized images and int labels
    batch = torch.utils.data.default_collate([(image, label), (image, ds[1][1])])
    assert batch[1].dtype == torch.int64


def test_detection_target_agrees_with_the_annotations() -> None:
    ds = shapes(split="val", val_images=6)
    for i in range(len(ds)):
        t, anns = ds.detection_target(i), ds.annotations(i)
        h, w = ds.image(i).shape[-2:]
        assert t["masks"].shape == (len(anns), h, w) and t["masks"].dtype == torch.uint8
        assert t["masks"].flatten(1).sum(1).tolist() == [a["area"] for a in anns]
        for box, mask in zip(t["boxes"], t["masks"]):  # COCO boxes bound their masks exactly
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert t["labels"].min() >= 1  # 0 is the background
        assert int(t["image_id"]) == ds.image_ids[i]


def test_coco_folder_reads_polygons_and_rle(tmp_path: Path, write_coco) -> None:
    def drop_area(data: dict) -> None:
        for ann in data["annotations"]:
            del ann["area"]

    write_coco(tmp_path, "val", edit=drop_area)
    ds = build_part("dataset", "coco", root=tmp_path, split="val", images="{split}",
                    annotations="{split}.json")
    ref = shapes(split="val", val_images=4, size=64)
    assert len(ds) == 4 and ds.classes == ref.classes
    kinds = {type(a["segmentation"]).__name__ for a in ds.coco.anns.values()}
    assert kinds == {"list", "dict"}  # polygons and RLE both present
    for i in range(len(ds)):
        t, r = ds.detection_target(i), ref.detection_target(i)
        assert torch.equal(t["masks"], r["masks"]) and torch.equal(t["area"], r["area"])
        assert (ds.image(i) - ref.image(i)).abs().max() <= 1 / 255  # 8-bit PNG round trip
    with pytest.raises(DataError, match="train.json"):
        ds.with_split("train")


def _coco(root: Path, **params) -> CocoDataset:
    return build_part("dataset", "coco", root=root, images="{split}",
                      annotations="{split}.json", **params)


def test_missing_annotation_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"annotation file '.*nope\.json' does not exist"):
        build_part("dataset", "coco", root=tmp_path, annotations="nope.json")


def test_image_named_but_missing_names_file_and_id(tmp_path: Path, write_coco) -> None:
    write_coco(tmp_path, "val")
    (tmp_path / "val" / "000002.png").unlink()
    with pytest.raises(DataError, match=r"image id 2 names '.*000002\.png'"):
        _coco(tmp_path)


def test_undeclared_category_names_the_annotation(tmp_path: Path, write_coco) -> None:
    def bad(data: dict) -> None:
        data["annotations"][1]["category_id"] = 7

    write_coco(tmp_path, "val", edit=bad)
    with pytest.raises(DataError, match=r"val\.json: annotation 1 \(id 2\): category_id 7 is not "
                                        r"declared"):
        _coco(tmp_path)


@pytest.mark.parametrize("field, value, needle", [
    ("bbox", [1, 2, -3, 4], "'bbox' must be"),
    ("segmentation", None, "no 'segmentation'"),
    ("segmentation", {"size": [1, 1], "counts": "x"}, "an RLE 'segmentation' needs"),
    ("image_id", 99, "image_id 99 is not in 'images'"),
    ("iscrowd", 2, "'iscrowd' must be 0 or 1"),
])
def test_malformed_annotation_is_named(tmp_path: Path, write_coco, field: str, value,
                                      needle: str) -> None:
    def bad(data: dict) -> None:
        data["annotations"][0][field] = value

    write_coco(tmp_path, "val", edit=bad)
    with pytest.raises(DataError, match=r"annotation 0 \(id 1\)") as exc:
        _coco(tmp_path)
    assert needle in str(exc.value)


def test_unreadable_annotation_file(tmp_path: Path) -> None:
    (tmp_path / "val.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read COCO annotation file"):
        _coco(tmp_path)
