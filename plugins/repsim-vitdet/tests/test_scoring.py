"""The scoring path against hand-made detections whose COCO AP is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from repsim_vitdet.coco import build_coco_index
from repsim_vitdet.scoring import coco_ap, to_coco_results

H, W = 240, 320
# (x, y, width, height, category): one small (< 32²) and two large (> 96²) objects.
OBJECTS = [(10, 10, 20, 20, 1), (40, 100, 100, 100, 2), (180, 20, 100, 100, 1)]
CATEGORY_IDS = [1, 2]


def _mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y:y + h, x:x + w] = 1
    return m


def _rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def gt():
    anns = [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": [x, y, w, h],
             "area": float(w * h), "iscrowd": 0, "segmentation": _rle(_mask(x, y, w, h))}
            for i, (x, y, w, h, c) in enumerate(OBJECTS)]
    return build_coco_index({"images": [{"id": 1, "width": W, "height": H, "file_name": "a"}],
                             "annotations": anns,
                             "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]})


def _output(objects, shift: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's detector output for ``objects``, boxes and masks moved ``shift`` px right."""
    boxes = torch.tensor([[x + shift, y, x + shift + w, y + h] for x, y, w, h, _ in objects],
                         dtype=torch.float32).reshape(-1, 4)
    masks = torch.from_numpy(np.stack([_mask(x + shift, y, w, h) for x, y, w, h, _ in objects])
                             if objects else np.zeros((0, H, W))).float()[:, None]
    return {"boxes": boxes, "scores": torch.linspace(0.9, 0.8, len(objects)),
            "labels": torch.tensor([c for *_, c in objects], dtype=torch.int64), "masks": masks}


def _ap(gt, objects, shift: int = 0) -> dict[str, dict[str, float]]:
    bbox, segm = to_coco_results(1, _output(objects, shift), CATEGORY_IDS)
    return {"bbox": coco_ap(gt, bbox, "bbox"), "segm": coco_ap(gt, segm, "segm")}


@pytest.mark.parametrize("iou", ["bbox", "segm"])
def test_perfect_detections_score_one(gt, iou: str) -> None:
    ap = _ap(gt, OBJECTS)[iou]
    for name in ("AP", "AP50", "AP75", "AP_small", "AP_large"):
        assert ap[name] == pytest.approx(1.0), name
    assert math.isnan(ap["AP_medium"])  # no medium ground truth: COCO's -1, reported as NaN


@pytest.mark.parametrize("iou", ["bbox", "segm"])
def test_no_detections_score_zero(gt, iou: str) -> None:
    ap = _ap(gt, [])[iou]
    assert ap["AP"] == ap["AP50"] == ap["AP_small"] == ap["AP_large"] == 0.0


@pytest.mark.parametrize("iou", ["bbox", "segm"])
def test_shift_to_a_known_iou_fills_the_right_thresholds(gt, iou: str) -> None:
    # The large objects moved 16 px: IoU (100 - 16) / (100 + 16) = 0.724 for boxes and masks, so
    # they match at IoU thresholds 0.50 ... 0.70 (5 of 10) and not at 0.75.
    large = [o for o in OBJECTS if o[2] == 100]
    ap = _ap(gt, large, shift=16)[iou]
    assert ap["AP_large"] == pytest.approx(0.5)
    assert ap["AP_small"] == 0.0  # the small object was not detected
    # Over all areas, at each of the 5 matching thresholds category 1 recalls 1 of its 2
    # objects and category 2 its one, each with precision 1; AP is the mean over categories.
    assert ap["AP50"] == pytest.approx((ap_at(1 / 2) + ap_at(1.0)) / 2)
    assert ap["AP75"] == 0.0
    assert ap["AP"] == pytest.approx(ap["AP50"] / 2)


def ap_at(recall: float) -> float:
    """COCO's 101-point AP of a detector with precision 1 up to ``recall`` and none beyond."""
    return sum(r <= recall + 1e-12 for r in np.linspace(0, 1, 101)) / 101


def test_masks_are_scored_by_their_own_area(gt) -> None:
    # A detection whose box is right but whose mask is empty scores for boxes, not for masks.
    out = _output(OBJECTS)
    out["masks"] = torch.zeros_like(out["masks"])
    bbox, segm = to_coco_results(1, out, CATEGORY_IDS)
    assert coco_ap(gt, bbox, "bbox")["AP"] == pytest.approx(1.0)
    assert coco_ap(gt, segm, "segm")["AP"] == 0.0
    assert "bbox" not in segm[0] and bbox[0]["bbox"] == [10.0, 10.0, 20.0, 20.0]


def test_image_subset_scores_only_those_images(gt) -> None:
    bbox, _ = to_coco_results(1, _output(OBJECTS), CATEGORY_IDS)
    assert coco_ap(gt, bbox, "bbox", image_ids=[1])["AP"] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in coco_ap(gt, bbox, "bbox", image_ids=[]).values())
