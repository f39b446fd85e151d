"""Parameters of the plugin's datasets and of the ``vitdet`` evaluator, with its two presets.

Kept free of torch so that ``repsim validate`` checks a recipe before anything heavy loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, field_validator,
                      model_validator)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CocoParams(_Params):
    """A COCO-format dataset on disk: torchvision's ``CocoDetection`` layout, one folder of images
    and one annotation file per split."""

    root: Path = Field(description="dataset folder; `images` and `annotations` are inside it")
    split: str = Field("val", description="the split this dataset is (`{split}` in the templates)")
    images: str = Field("{split}2017", description="image folder of a split, relative to root")
    annotations: str = Field("annotations/instances_{split}2017.json",
                             description="annotation file of a split, relative to root")


class CocoShapesParams(_Params):
    """Generated COCO-format images of coloured shapes with instance masks (tests, CPU demo)."""

    split: Literal["train", "val"] = "val"
    train_images: int = Field(48, ge=1)
    val_images: int = Field(24, ge=1)
    size: int = Field(192, ge=64, description="image side in pixels (COCO's area ranges are "
                                              "absolute: small < 32², large > 96²)")
    seed: int = 0


class DataRef(_Params):
    """The detection dataset the evaluator trains and scores on: a registered dataset and its
    parameters (its own, not the run's [data], which holds ImageNet in the paper recipe).

    ``params`` is validated by the dataset's own model and kept as it, so ``repsim validate``
    checks its paths (a COCO ``root``) as it does the run's [data]."""

    dataset: str = "coco_shapes"
    params: dict[str, Any] | SerializeAsAny[BaseModel] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> DataRef:
        from repsim.errors import RecipeError
        from repsim.plugins import registry

        reg = registry("dataset")
        if self.dataset not in reg:
            raise ValueError(reg.unknown_message(self.dataset))
        try:
            self.params = reg.get(self.dataset).validate(self.params, where="data.params")
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        return self


# ViTDet's COCO config (detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py and
# common/models/mask_rcnn_vitdet.py): 100 epochs = 184,375 iterations of 64 images, AdamW lr 1e-4,
# weight decay 0.1, layer decay 0.7, 250 warm-up iterations, lr × 0.1 at 88.9 % and 96.3 %,
# drop path 0.1, large-scale jitter (0.1-2.0) at 1024 px, AMP. `smoke` is a CPU-sized run.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "image_size": 1024, "steps": 184375, "batch_size": 64, "micro_batch_size": 4,
        "lr": 1e-4, "weight_decay": 0.1, "layer_decay": 0.7, "warmup_steps": 250,
        "milestones": [163889, 177546], "drop_path": 0.1, "scale_range": (0.1, 2.0),
        "flip": True, "channels": 256, "box_convs": 4, "box_fc": 1024, "mask_convs": 4,
        "proposals_train": (2000, 1000), "proposals_test": (1000, 1000),
        "roi_batch_size": 512, "precision": "bf16", "num_workers": 8, "checkpoint_every": 1475,
    },
    "smoke": {
        "image_size": 128, "steps": 300, "batch_size": 4, "micro_batch_size": 4,
        "lr": 1e-3, "weight_decay": 0.1, "layer_decay": 0.7, "warmup_steps": 25,
        "milestones": [250, 285], "drop_path": 0.0, "scale_range": (0.75, 1.25),
        "flip": True, "channels": 64, "box_convs": 0, "box_fc": 256, "mask_convs": 2,
        "proposals_train": (300, 100), "proposals_test": (300, 100),
        "roi_batch_size": 64, "precision": "fp32", "num_workers": 0, "checkpoint_every": 100,
    },
}

Backbone = Literal["frozen", "finetune"]


def _preset(name: str, description: str = "", **constraints: Any) -> Any:
    """A field taken from the preset: its default is the smoke preset's value, the paper
    preset's is in its description."""
    paper = f"paper preset: {PRESETS['paper'][name]}"
    return Field(PRESETS["smoke"][name], description=f"{description}; {paper}" if description
                 else paper, **constraints)


class VitDetParams(_Params):
    """ViTDet-style Mask R-CNN on each ViT: every (backbone, blocks) variant is one detector.

    The fields of :data:`PRESETS` a recipe leaves out take the chosen preset's values.
    """

    preset: Literal["smoke", "paper"] = "smoke"
    models: list[str] | None = Field(None, description="model labels; default every ViT of the run")
    backbone: list[Backbone] = Field(default_factory=lambda: ["frozen"],
                                     description="'frozen' (Table 6) and/or 'finetune' (Table 7)")
    blocks: list[list[int]] = Field(
        default_factory=lambda: [[-1]],
        description="0-based blocks whose patch tokens are concatenated: [-1] (the final block) "
                    "or [8, 9, 10, 11] (final + 9-11, Fig. 7); a list of such lists for several")
    data: DataRef = Field(default_factory=DataRef)
    train_split: str = "train"
    eval_split: str = "val"
    eval_images: int | None = Field(None, ge=1, description="score the first N eval images only")
    seed: int | None = Field(None, description="training seed; default the run's")
    # The preset's fields: default the smoke preset's values; `preset = "paper"` fills the
    # paper preset's into the fields a recipe leaves out.
    image_size: int = _preset("image_size", "square input side (longest image side at test)",
                              ge=32)
    steps: int = _preset("steps", "optimizer steps", ge=1)
    batch_size: int = _preset("batch_size", "images per optimizer step, all processes", ge=1)
    micro_batch_size: int = _preset("micro_batch_size", "images per forward in one process",
                                    ge=1)
    lr: float = _preset("lr", "AdamW learning rate", gt=0)
    weight_decay: float = _preset("weight_decay", "AdamW weight decay (none on 1-d parameters, "
                                  "position embedding, class token)", ge=0)
    layer_decay: float = _preset("layer_decay", "a ViT parameter of layer l (0: embeddings, "
                                 "i + 1: block i) of L blocks gets lr × decay^(L + 1 - l)",
                                 gt=0, le=1)
    warmup_steps: int = _preset("warmup_steps", "linear warm-up from 0.001 × lr", ge=0)
    milestones: list[int] = _preset("milestones", "steps after which the lr is × 0.1")
    drop_path: float = _preset("drop_path", "stochastic depth of a fine-tuned ViT", ge=0, lt=1)
    scale_range: tuple[float, float] = _preset("scale_range", "large-scale jitter range")
    flip: bool = _preset("flip", "random horizontal flips")
    channels: int = _preset("channels", "feature pyramid and head width", ge=8)
    box_convs: int = _preset("box_convs", "3×3 convs of the box head", ge=0)
    box_fc: int = _preset("box_fc", "width of the box head's fully-connected layer", ge=8)
    mask_convs: int = _preset("mask_convs", "3×3 convs of the mask head", ge=1)
    proposals_train: tuple[int, int] = _preset(
        "proposals_train", "RPN proposals kept in training: pre-NMS per level, post-NMS per "
        "image")
    proposals_test: tuple[int, int] = _preset("proposals_test", "the same at test")
    roi_batch_size: int = _preset("roi_batch_size", "sampled RoIs per image for the box head",
                                  ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = _preset("precision", "autocast of training")
    num_workers: int = _preset("num_workers", "data-loading worker processes", ge=0)
    checkpoint_every: int = _preset("checkpoint_every", "steps between resumable checkpoints",
                                    ge=1)
    checkpoint_dir: str | None = Field(
        None, description="where training checkpoints go; default $REPSIM_CACHE/vitdet")
    ddp: bool = Field(False, description="train with DistributedDataParallel over the initialised "
                      "process group; every process must run the evaluator (from Python: "
                      "`repsim run` runs evaluators on rank 0 alone)")
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {**PRESETS.get(data.get("preset", "smoke"), {}), **data}

    @field_validator("backbone", mode="before")
    @classmethod
    def _one_backbone(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("blocks", mode="before")
    @classmethod
    def _one_block_set(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return [value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> VitDetParams:
        if not self.backbone or not self.blocks or not all(self.blocks):
            raise ValueError("backbone and blocks need at least one entry each")
        if any(len(set(b)) != len(b) for b in self.blocks):
            raise ValueError(f"blocks {self.blocks}: a block appears twice in one set")
        if len(set(self.backbone)) != len(self.backbone) or \
                len({tuple(b) for b in self.blocks}) != len(self.blocks):
            raise ValueError(f"backbone {self.backbone} and blocks {self.blocks} must not repeat "
                             "an entry")
        if self.image_size % 32:
            raise ValueError(f"image_size = {self.image_size} must be a multiple of 32 (the "
                             "pyramid's coarsest stride)")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size = {self.batch_size} must be a multiple of "
                             f"micro_batch_size = {self.micro_batch_size}")
        if self.steps % self.checkpoint_every:
            raise ValueError(f"steps = {self.steps} must be a multiple of checkpoint_every = "
                             f"{self.checkpoint_every}")
        if self.milestones != sorted(self.milestones) or any(
                not 0 < m < self.steps for m in self.milestones):
            raise ValueError(f"milestones {self.milestones} must be increasing steps in "
                             f"(0, {self.steps})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps = {self.warmup_steps} must be below steps")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range {self.scale_range} must be 0 < low <= high")
        return self
