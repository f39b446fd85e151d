"""The entry point: the ``coco`` and ``coco_shapes`` datasets and the ``vitdet`` evaluator.
No torch here: building a part imports it."""

from __future__ import annotations

from typing import Any

from repsim.hookspecs import Register, hookimpl
from repsim_vitdet.params import CocoParams, CocoShapesParams, VitDetParams


def _build_coco(params: CocoParams) -> Any:
    from repsim_vitdet.coco import CocoFolder

    return CocoFolder(params)


def _build_shapes(params: CocoShapesParams) -> Any:
    from repsim_vitdet.shapes import CocoShapes

    return CocoShapes(params)


def _build_vitdet(params: VitDetParams) -> Any:
    from repsim_vitdet.evaluator import VitDetEvaluator

    return VitDetEvaluator(params)


@hookimpl
def register_datasets(register: Register) -> None:
    register("coco", _build_coco, params=CocoParams,
             summary="a local COCO-format dataset (images folder + instances JSON per split)")
    register("coco_shapes", _build_shapes, params=CocoShapesParams,
             summary="generated COCO-format coloured shapes with masks, small to large")


@hookimpl
def register_evaluators(register: Register) -> None:
    register("vitdet", _build_vitdet, params=VitDetParams,
             summary="ViTDet Mask R-CNN on frozen or fine-tuned ViT blocks; COCO box/mask AP "
                     "(seeds' Tables 6-7, Fig. 7)")
