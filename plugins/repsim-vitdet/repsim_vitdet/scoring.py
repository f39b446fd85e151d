"""COCO scoring: detections to COCO result records, and pycocotools' ``COCOeval`` AP numbers."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from pycocotools.coco import COCO

# COCOeval.stats[0:6]: AP at IoU .50:.05:.95, at .50, at .75, and for small / medium / large areas.
AP_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
IOU_TYPES = {"bbox": "box", "segm": "mask"}  # COCOeval's iouType → the tables' task name
Records = list[dict[str, Any]]  # COCO result records, as ``COCO.loadRes`` takes them


def to_coco_results(image_id: int, output: dict[str, torch.Tensor], category_ids: Sequence[int],
                    mask_threshold: float = 0.5) -> tuple[Records, Records]:
    """One image's detections as COCO result records: (``bbox`` records, ``segm`` records).

    ``output`` is torchvision's: ``boxes`` ``[N, 4]`` (x1, y1, x2, y2), ``scores``, ``labels``
    (class + 1) and optionally ``masks`` ``[N, 1, H, W]`` probabilities, binarised at
    ``mask_threshold`` and run-length encoded. Boxes and masks go to separate lists, as detectron2
    scores them, so segm areas come from the masks.
    """
    import numpy as np
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    scores = output["scores"].detach().float().cpu().tolist()
    cats = [int(category_ids[k - 1]) for k in output["labels"].tolist()]
    bbox = [{"image_id": int(image_id), "category_id": c, "bbox": [float(v) for v in b],
             "score": s} for b, c, s in zip(boxes.tolist(), cats, scores)]
    segm: Records = []
    if "masks" in output and len(cats):
        binary = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        segm = [{"image_id": int(image_id), "category_id": c, "score": s,
                 "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}
                for rle, c, s in zip(rles, cats, scores)]
    return bbox, segm


def coco_ap(gt: COCO, results: Records, iou_type: str,
            image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """``COCOeval`` of ``results`` against ``gt`` on ``image_ids`` (default all): the six AP
    numbers of :data:`AP_NAMES` in [0, 1]; NaN where the images hold no ground truth of that
    size (COCO's -1). No detections at all score 0."""
    import copy

    from pycocotools.cocoeval import COCOeval

    from repsim_vitdet.coco import build_coco_index

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports by printing
        if results:
            dt = gt.loadRes(copy.deepcopy(results))  # loadRes adds ids and areas in place
        else:  # loadRes cannot take an empty list
            dt = build_coco_index({"images": gt.dataset["images"], "annotations": [],
                                   "categories": gt.dataset["categories"]})
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (math.nan if v < 0 else float(v)) for name, v in zip(AP_NAMES, ev.stats[:6])}
