"""COCO-format detection datasets: annotations checked on load, images read lazily.

A :class:`CocoDataset` is an ordinary :class:`~repsim.data.base.ImageDataset` — ``(image,
label)`` with an integer label, so the run's feature pass can read it like any other — plus
:meth:`CocoDataset.detection_target` (boxes, masks, ...) and :attr:`CocoDataset.coco`, the
pycocotools ground truth that ``COCOeval`` scores against.
"""

from __future__ import annotations

import contextlib
import io
import json
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim.data.base import ImageDataset
from repsim.errors import DataError

if TYPE_CHECKING:
    import torch
    from pycocotools.coco import COCO

    from repsim_vitdet.params import CocoParams

NO_OBJECT = -1  # the pass label of an image without (non-crowd) objects


def build_coco_index(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` over an annotation dict (its progress prints silenced)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_annotations(data: Any, source: str) -> dict[str, Any]:
    """The annotation dict with ``area`` and ``iscrowd`` filled where absent; a
    :class:`DataError` naming ``source`` and the annotation for anything malformed."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: a COCO annotation file holds a JSON object with 'images', "
                        f"'annotations' and 'categories'; this one holds a {type(data).__name__}.")
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{source}: no list {missing} in the file; a COCO annotation file has "
                        "'images', 'annotations' and 'categories'.")
    cats: set[int] = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise DataError(f"{source}: categories[{i}] needs an integer 'id' and a 'name'.")
        cats.add(c["id"])
    images: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not all(isinstance(im.get(k), int)
                                               for k in ("id", "width", "height")):
            raise DataError(f"{source}: images[{i}] needs integer 'id', 'width' and 'height'.")
        if "file_name" not in im:
            raise DataError(f"{source}: image id {im['id']} has no 'file_name'.")
        images[im["id"]] = (im["height"], im["width"])
    seen: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{source}: annotation {i}" + (f" (id {ann.get('id')})" if isinstance(ann, dict)
                                               else "")
        _check_annotation(ann, where, cats, images, seen)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:  # COCO's area is the mask's pixel area
            from pycocotools import mask as mask_utils

            h, w = images[ann["image_id"]]
            ann["area"] = float(mask_utils.area(segmentation_rle(ann["segmentation"], h, w)))
    return data


def _check_annotation(ann: Any, where: str, cats: set[int], images: Mapping[int, tuple[int, int]],
                      seen: set[int]) -> None:
    if not isinstance(ann, dict):
        raise DataError(f"{where}: an annotation is a JSON object.")
    if not isinstance(ann.get("id"), int) or ann["id"] in seen:
        raise DataError(f"{where}: needs an integer 'id' no other annotation has.")
    seen.add(ann["id"])
    if ann.get("image_id") not in images:
        raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'.")
    if ann.get("category_id") not in cats:
        raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not declared in "
                        f"'categories' (ids {sorted(cats)}). Declare it, or fix the annotation.")
    box = ann.get("bbox")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) for v in box) or box[2] < 0 or box[3] < 0):
        raise DataError(f"{where}: 'bbox' must be [x, y, width, height] with width, height >= 0; "
                        f"it is {box!r}.")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise DataError(f"{where}: 'iscrowd' must be 0 or 1; it is {ann['iscrowd']!r}.")
    if "area" in ann and (not isinstance(ann["area"], (int, float)) or ann["area"] < 0):
        raise DataError(f"{where}: 'area' must be a number >= 0; it is {ann['area']!r}.")
    segm = ann.get("segmentation")
    h, w = images[ann["image_id"]]
    if isinstance(segm, list):
        if not segm or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                               and all(isinstance(v, (int, float)) for v in p) for p in segm):
            raise DataError(f"{where}: a polygon 'segmentation' is a list of [x1, y1, x2, y2, "
                            "...] lists of at least 3 points.")
    elif isinstance(segm, dict):
        if list(segm.get("size", [])) != [h, w] or not isinstance(segm.get("counts"), (str, list)):
            raise DataError(f"{where}: an RLE 'segmentation' needs 'counts' and 'size' = "
                            f"[height, width] = [{h}, {w}] of its image; it has size "
                            f"{segm.get('size')!r}.")
    else:
        raise DataError(f"{where}: no 'segmentation' (polygons or RLE); Mask R-CNN needs masks.")


def segmentation_rle(segm: Any, h: int, w: int) -> Any:
    """pycocotools' RLE of a polygon list, an uncompressed or a compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


class CocoDataset(ImageDataset):
    """Images with COCO instance annotations, in ascending image-id order.

    ``classes`` are the category names in ascending category-id order; ``category_ids[k]`` is the
    COCO id of class ``k``. The pass label of an image is the class covering most of it (the
    largest total non-crowd area), :data:`NO_OBJECT` for an image without objects.
    """

    def __init__(self, name: str, split: str, coco: COCO, source: str) -> None:
        self.name, self.split, self.coco, self.source = name, split, coco, source
        self.category_ids = sorted(coco.cats)
        self.classes = [str(coco.cats[c]["name"]) for c in self.category_ids]
        self.image_ids = sorted(coco.imgs)
        self._class_of = {c: k for k, c in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    @abstractmethod
    def image(self, index: int) -> torch.Tensor:
        """The image ``[3, H, W]`` float in [0, 1], of its annotated size."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index), self.label(index)

    def annotations(self, index: int) -> list[dict[str, Any]]:
        """The image's COCO annotations (crowd regions included)."""
        return self.coco.imgToAnns.get(self.image_ids[index], [])

    def label(self, index: int) -> int:
        """The pass label: the class of the largest total non-crowd area, or NO_OBJECT."""
        area: dict[int, float] = {}
        for a in self.annotations(index):
            if not a["iscrowd"]:
                k = self._class_of[a["category_id"]]
                area[k] = area.get(k, 0.0) + float(a["area"])
        return max(area, key=lambda k: (area[k], -k)) if area else NO_OBJECT

    def detection_target(self, index: int) -> dict[str, torch.Tensor]:
        """torchvision's detection target of the image's non-crowd objects: ``boxes`` ``[N, 4]``
        (x1, y1, x2, y2 in pixels), ``labels`` ``[N]`` (class + 1; 0 is the background),
        ``masks`` ``[N, H, W]`` uint8, ``area``, ``image_id``. Crowd regions are left out, as
        detectron2 trains; ``COCOeval`` reads them from :attr:`coco`."""
        import numpy as np
        import torch

        info = self.coco.imgs[self.image_ids[index]]
        anns = [a for a in self.annotations(index) if not a["iscrowd"]]
        h, w = info["height"], info["width"]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        for i, a in enumerate(anns):
            masks[i] = self.coco.annToMask(a)
        return {
            "boxes": boxes,
            "labels": torch.tensor([self._class_of[a["category_id"]] + 1 for a in anns],
                                   dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "image_id": torch.tensor(self.image_ids[index]),
        }

    def describe(self) -> dict[str, object]:
        return super().describe() | {"annotations": len(self.coco.anns), "source": self.source}


class CocoFolder(CocoDataset):
    """A COCO-format split on disk: ``root/<images>/<file_name>`` and ``root/<annotations>``."""

    def __init__(self, params: CocoParams) -> None:
        self.params = params
        root, split = Path(params.root), params.split
        ann_file = root / params.annotations.format(split=split)
        self.folder = root / params.images.format(split=split)
        if not ann_file.is_file():
            raise DataError(f"COCO annotation file '{ann_file}' does not exist (split '{split}'). "
                            "Check `root` and `annotations` (a template with {split}).")
        try:
            data = json.loads(ann_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read COCO annotation file '{ann_file}': {exc}.") from None
        coco = build_coco_index(check_annotations(data, str(ann_file)))
        super().__init__(f"coco:{root}", split, coco, str(ann_file))
        if not self.folder.is_dir():
            raise DataError(f"COCO image folder '{self.folder}' does not exist (split '{split}'). "
                            "Check `root` and `images` (a template with {split}).")
        for image_id in self.image_ids:
            path = self.folder / coco.imgs[image_id]["file_name"]
            if not path.is_file():
                raise DataError(f"{ann_file}: image id {image_id} names '{path}', which is not "
                                f"in the image folder '{self.folder}'. Add the image, or remove "
                                "it and its annotations from the file.")

    def image(self, index: int) -> torch.Tensor:
        import torch
        from PIL import Image

        from repsim.data.builtin import _rgb8  # the core's faithful 8/16-bit conversion

        info = self.coco.imgs[self.image_ids[index]]
        path = self.folder / info["file_name"]
        try:
            with Image.open(path) as img:
                arr = _rgb8(img, path)
        except OSError as exc:
            raise DataError(f"cannot read image '{path}': {exc}.") from None
        if arr.shape[:2] != (info["height"], info["width"]):
            raise DataError(f"image '{path}' is {arr.shape[1]}×{arr.shape[0]} pixels, but "
                            f"{self.source} says {info['width']}×{info['height']} (image id "
                            f"{info['id']}); its masks would not fit.")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0

    def with_split(self, split: str) -> ImageDataset:
        if split == self.split:
            return self
        return CocoFolder(self.params.model_copy(update={"split": split}))
