"""``coco_shapes``: deterministic COCO-format images of coloured shapes, for tests and a CPU demo.

Each image holds 1-3 small (area < 32²), 0-2 medium and, every other image on average, one large
(area > 96²) shape that do not touch: rectangles as polygons, triangles as polygons, discs as RLE,
so both of pycocotools' mask encodings are exercised. Each category has its own hue (jittered),
on a dark noisy background, so a small detector learns it in minutes. The geometry of a split is
drawn when it is built; each image is painted on request from its own decoded masks (so the
pixels and the annotations agree exactly) with colours seeded by (seed, split, index).
"""

from __future__ import annotations

import colorsys
import math
from typing import TYPE_CHECKING, Any

from repsim.errors import DataError
from repsim_vitdet.coco import CocoDataset, build_coco_index, check_annotations, segmentation_rle

if TYPE_CHECKING:
    import numpy as np
    import torch

    from repsim.data.base import ImageDataset
    from repsim_vitdet.params import CocoShapesParams

CATEGORIES = ("rectangle", "disc", "triangle")
HUES = (0.0, 0.33, 0.62)  # red, green, blue
AREAS = {"small": (120.0, 700.0), "medium": (1600.0, 6400.0), "large": (10000.0, 14000.0)}
SPLITS = ("train", "val")
GAP = 2  # pixels kept free between two shapes' boxes


class CocoShapes(CocoDataset):
    """One split of the generated dataset (see the module docstring)."""

    def __init__(self, params: CocoShapesParams) -> None:
        if params.split not in SPLITS:
            raise DataError(f"dataset 'coco_shapes' has no split '{params.split}'; it has "
                            f"{list(SPLITS)}.")
        self.params = params
        n = params.train_images if params.split == "train" else params.val_images
        data = generate(n, params.size, [params.seed, SPLITS.index(params.split)])
        super().__init__("coco_shapes", params.split,
                         build_coco_index(check_annotations(data, "coco_shapes")),
                         f"coco_shapes (seed {params.seed}, {n} images)")

    def image(self, index: int) -> torch.Tensor:
        import numpy as np
        import torch

        info = self.coco.imgs[self.image_ids[index]]
        rng = np.random.default_rng([self.params.seed, SPLITS.index(self.split), index])
        h, w = info["height"], info["width"]
        back = np.array(colorsys.hsv_to_rgb(rng.random(), 0.3 * rng.random(),
                                            0.1 + 0.3 * rng.random()))
        img = np.broadcast_to(back, (h, w, 3)).copy()
        for ann in self.annotations(index):
            k = self.category_ids.index(ann["category_id"])
            hue = (HUES[k] + rng.uniform(-0.06, 0.06)) % 1.0
            colour = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
            img[self.coco.annToMask(ann).astype(bool)] = colour
        img += rng.normal(0.0, 0.03, img.shape)
        return torch.from_numpy(img.clip(0, 1).astype(np.float32)).permute(2, 0, 1).contiguous()

    def with_split(self, split: str) -> ImageDataset:
        if split == self.split:
            return self
        return CocoShapes(self.params.model_copy(update={"split": split}))


def generate(n: int, size: int, seed: list[int]) -> dict[str, Any]:
    """The COCO annotation dict of ``n`` images of width ``size`` (height ``size`` or 3/4 of it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(1, n + 1):
        w = size
        h = size if rng.random() < 0.5 else size * 3 // 4
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "width": w,
                       "height": h})
        wanted = ["large"] * int(rng.random() < 0.5) + ["medium"] * int(rng.integers(0, 3)) \
            + ["small"] * int(rng.integers(1, 4))
        placed: list[tuple[float, float, float, float]] = []
        for scale in wanted:
            k = int(rng.integers(len(CATEGORIES)))
            shape = _place(rng, k, rng.uniform(*AREAS[scale]), h, w, placed)
            if shape is None:  # no free room left for it
                continue
            segm, box = shape
            placed.append(box)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": k + 1,
                         "segmentation": segm, "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CATEGORIES)]}
    _boxes_from_masks(data)
    return data


def _place(rng: np.random.Generator, k: int, area: float, h: int, w: int,
           placed: list[tuple[float, float, float, float]], tries: int = 50
           ) -> tuple[Any, tuple[float, float, float, float]] | None:
    """A shape of category ``k`` and ``area`` px² clear of ``placed`` boxes: (segmentation,
    box x0, y0, x1, y1), or None."""
    for _ in range(tries):
        aspect = rng.uniform(0.6, 1.6)  # width / height; discs are round
        if CATEGORIES[k] == "disc":
            bw = bh = 2 * math.sqrt(area / math.pi)
        else:  # a triangle of base b and height t covers b * t / 2
            a = area if CATEGORIES[k] == "rectangle" else 2 * area
            bw, bh = math.sqrt(a * aspect), math.sqrt(a / aspect)
        if bw > w - 2 or bh > h - 2:
            continue
        x0, y0 = rng.uniform(1, w - 1 - bw), rng.uniform(1, h - 1 - bh)
        box = (x0, y0, x0 + bw, y0 + bh)
        if all(box[2] + GAP <= b[0] or b[2] + GAP <= box[0] or box[3] + GAP <= b[1]
               or b[3] + GAP <= box[1] for b in placed):
            return _segmentation(CATEGORIES[k], box, h, w), box
    return None


def _segmentation(kind: str, box: tuple[float, float, float, float], h: int, w: int) -> Any:
    """Polygons for rectangles and triangles; a compressed RLE (counts as text) for discs."""
    import numpy as np
    from pycocotools import mask as mask_utils

    x0, y0, x1, y1 = box
    if kind == "rectangle":
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    if kind == "triangle":
        return [[x0, y1, x1, y1, (x0 + x1) / 2, y0]]
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    r = (x1 - x0) / 2
    disc = (xx - (x0 + r)) ** 2 + (yy - (y0 + r)) ** 2 <= r * r
    rle = mask_utils.encode(np.asfortranarray(disc.astype(np.uint8)))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def _boxes_from_masks(data: dict[str, Any]) -> None:
    """Each annotation's ``bbox`` and ``area`` from its rasterised mask, as COCO defines them."""
    from pycocotools import mask as mask_utils

    size = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for ann in data["annotations"]:
        h, w = size[ann["image_id"]]
        rle = segmentation_rle(ann["segmentation"], h, w)
        ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        ann["area"] = float(mask_utils.area(rle))
