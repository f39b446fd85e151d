"""The ``vitdet`` evaluator: a ViTDet Mask R-CNN per model and variant, scored by COCOeval.

For each ViT of the run and each (backbone, blocks) variant, a copy of the model (the run's own
is never changed) becomes the backbone of :func:`repsim_vitdet.model.build_detector`, is trained
on the train split of the evaluator's detection dataset and scored on its eval split for boxes
and masks. Tables as the seeds' Tables 6-7 (one per variant, a row per model), a figure as their
Fig. 7 (AP by block set), every number in ``result.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim.errors import DataError, RecipeError
from repsim.evaluators._common import figure, json_float, resolve_models, table
from repsim.evaluators.base import Access, EvalContext, Evaluator, EvalResult, FeatureNeeds
from repsim_vitdet.scoring import AP_NAMES, IOU_TYPES

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from repsim.evaluators.access import ModelAccess
    from repsim_vitdet.coco import CocoDataset
    from repsim_vitdet.params import VitDetParams

DEPARTURES = [
    "global attention in every block (the pre-trained ViT as it is); ViTDet fine-tunes with 14×14 "
    "windowed attention in all but 4 blocks and relative position biases",
    "blocks given as a list: their patch tokens are concatenated and projected back to the ViT "
    "width by a 1×1 conv with LayerNorm before the pyramid (the seeds' Fig. 7 variant)",
    "no weight decay on biases (timm's rule; ViTDet decays them, not norms or pos_embed)",
    "the ViT's CLS/prefix tokens are dropped; the pyramid is built from patch tokens as in ViTDet",
]


def _cache_root() -> Path:
    """``$REPSIM_CACHE`` (default ``$XDG_CACHE_HOME/repsim`` or ``~/.cache/repsim``)/vitdet."""
    base = os.environ.get("REPSIM_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repsim")
    return Path(base).expanduser() / "vitdet"


def blocks_tag(blocks: list[int]) -> str:
    """A variant's block set in names: ``last`` for [-1], else ``blocks8-9-10-11``."""
    return "last" if blocks == [-1] else "blocks" + "-".join(map(str, blocks))


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names and bytes): which weights a detector started from."""
    import torch

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_change(before: torch.nn.Module, after: torch.nn.Module) -> float:
    """‖θ − θ₀‖ / ‖θ₀‖ over the parameters both hold with one shape (float64): 0 when frozen."""
    import torch

    old = dict(before.named_parameters())
    num = den = torch.zeros((), dtype=torch.float64)
    for name, p in after.named_parameters():
        if name in old and old[name].shape == p.shape:
            p0 = old[name].detach().double().cpu()
            num = num + (p.detach().double().cpu() - p0).square().sum()
            den = den + p0.square().sum()
    return float((num / den).sqrt()) if den > 0 else float("nan")


class VitDetEvaluator(Evaluator):
    """ViTDet Mask R-CNN transfer (seeds 003, Tables 6-7, Fig. 7; Appendix B.7)."""

    needs = FeatureNeeds(splits=())  # trains on images, reads no cached features
    access = Access(models=True)  # its detection dataset is its own (`data`), not the run's

    def __init__(self, params: VitDetParams, name: str | None = None) -> None:
        super().__init__(params, name or "vitdet")

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        from repsim.plugins import registry
        from repsim_vitdet.coco import CocoDataset
        from repsim_vitdet.model import check_blocks

        p: VitDetParams = self.params  # type: ignore[assignment]
        notes: list[str] = []
        models = self._models(ctx, notes)
        base = registry("dataset").get(p.data.dataset).create(p.data.params)
        if not isinstance(base, CocoDataset):
            raise RecipeError(f"evaluator '{self.name}': dataset '{p.data.dataset}' is not a "
                              "COCO-format detection dataset; use 'coco' or 'coco_shapes'.")
        train_ds, eval_ds = base.with_split(p.train_split), base.with_split(p.eval_split)
        if train_ds.category_ids != eval_ds.category_ids:
            raise DataError(f"evaluator '{self.name}': the '{p.train_split}' and "
                            f"'{p.eval_split}' splits of {base.name} declare different "
                            f"categories ({train_ds.category_ids} vs {eval_ds.category_ids}).")
        indices = list(range(len(eval_ds)))[:p.eval_images]
        seed = ctx.seed if p.seed is None else p.seed
        # Every variant checked before the first detector trains (which may take days).
        variants = [(label, backbone, blocks,
                     check_blocks(blocks, len(ctx.model(label).module.blocks), label))
                    for label in models for backbone in p.backbone for blocks in p.blocks]
        runs = [self._run(ctx.model(label), label, backbone, blocks, absolute, train_ds, eval_ds,
                          indices, seed)
                for label, backbone, blocks, absolute in variants]
        protocol = {
            "params": p.model_dump(mode="json"), "seed": seed, "models": models,
            "train": train_ds.describe(), "eval": eval_ds.describe() | {"scored": len(indices)},
            "classes": train_ds.classes, "departures": DEPARTURES, "notes": notes,
            "scoring": "pycocotools COCOeval (bbox, segm), maxDets 100; AP in % in the tables, "
                       "in [0, 1] in data; NaN/None where no ground truth of that size",
        }
        return EvalResult(protocol, tables=_tables(runs), data={"runs": runs},
                          figures={"ap_by_blocks": lambda: _figure(runs)})

    def _models(self, ctx: EvalContext, notes: list[str]) -> list[str]:
        """The requested models (each must be a ViT), or every ViT of the run."""
        from repsim_vitdet.model import check_vit

        p: VitDetParams = self.params  # type: ignore[assignment]
        chosen = resolve_models(ctx, p.models, self.name)
        out = []
        for label in chosen:
            loaded = ctx.model(label).loaded
            try:
                check_vit(loaded.module, label, loaded.family)
            except RecipeError as exc:
                if p.models is not None:
                    raise
                notes.append(f"skipped: {exc}")
                continue
            out.append(label)
        if not out:
            raise RecipeError(f"evaluator '{self.name}': no model of the run is a timm ViT "
                              f"({notes}).")
        return out

    def _run(self, access: ModelAccess, label: str, backbone: str, blocks: list[int],
             absolute: list[int], train_ds: CocoDataset, eval_ds: CocoDataset,
             indices: list[int], seed: int) -> dict[str, Any]:
        """Train one detector on ``absolute`` blocks and score it; its record for
        ``result.json``."""
        import torch

        from repsim_vitdet.model import build_detector
        from repsim_vitdet.scoring import coco_ap
        from repsim_vitdet.train import fit, predict

        p: VitDetParams = self.params  # type: ignore[assignment]
        module = access.module
        with torch.random.fork_rng(devices=[]):  # the heads' initialisation, seeded
            torch.manual_seed(seed)
            detector = build_detector(
                copy.deepcopy(module), blocks=absolute, frozen=backbone == "frozen",
                num_classes=len(train_ds.classes), image_size=p.image_size,
                channels=p.channels, box_convs=p.box_convs, box_fc=p.box_fc,
                mask_convs=p.mask_convs, proposals_train=p.proposals_train,
                proposals_test=p.proposals_test, roi_batch_size=p.roi_batch_size,
                mean=access.preprocess.mean, std=access.preprocess.std,
                drop_path=p.drop_path).to(access.device)
        path = self._checkpoint(module, label, backbone, absolute, seed, train_ds)
        started = time.perf_counter()
        history = fit(detector, train_ds, p, seed=seed, checkpoint=path, distributed=p.ddp,
                      progress=p.progress)
        train_s = time.perf_counter() - started
        trained = (len(history.loss) - history.resumed_at) * p.checkpoint_every * p.batch_size
        started = time.perf_counter()
        bbox, segm = predict(detector, eval_ds, indices, p.micro_batch_size, p.num_workers,
                             distributed=p.ddp)
        predict_s = time.perf_counter() - started
        image_ids = [eval_ds.image_ids[i] for i in indices]
        ap = {iou: coco_ap(eval_ds.coco, res, iou, image_ids)
              for iou, res in (("bbox", bbox), ("segm", segm))}
        return {
            "model": label, "backbone": backbone, "blocks": blocks, "block_indices": absolute,
            "ap": {iou: {k: json_float(v) for k, v in d.items()} for iou, d in ap.items()},
            "detections": len(bbox), "loss": history.loss, "resumed_at_chunk": history.resumed_at,
            "train_seconds": train_s, "train_images_per_s": trained / train_s if trained else None,
            "eval_images_per_s": len(indices) / predict_s if indices else None,
            "backbone_change": json_float(backbone_change(module, detector.backbone.vit)),
            "checkpoint": str(path), "device": str(access.device),
        }

    def _checkpoint(self, module: torch.nn.Module, label: str, backbone: str,
                    blocks: list[int], seed: int, train_ds: CocoDataset) -> Path:
        """The training checkpoint of one detector: named by everything that shapes training
        (weights, settings, variant, seed, data), so a rerun resumes, or reuses it when done."""
        p: VitDetParams = self.params  # type: ignore[assignment]
        keep = p.model_dump(mode="json", exclude={"models", "backbone", "blocks", "eval_split",
                                                  "eval_images", "num_workers", "progress",
                                                  "checkpoint_dir"})
        key = hashlib.sha256(json.dumps(
            {"weights": weights_hash(module), "params": keep, "variant": [backbone, blocks],
             "seed": seed, "data": train_ds.describe()}, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        root = Path(p.checkpoint_dir) if p.checkpoint_dir else _cache_root()
        return root / f"{label}-{backbone}-{blocks_tag(blocks)}-{key}.pt"


def _tables(runs: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """``coco_ap``: every number; one table per variant laid out as Tables 6-7."""
    rows = [[r["model"], r["backbone"], blocks_tag(r["blocks"]), IOU_TYPES[iou],
             *(_percent(r["ap"][iou][k]) for k in AP_NAMES)]
            for r in runs for iou in IOU_TYPES]
    out = {"coco_ap": table(["model", "backbone", "blocks", "task", *AP_NAMES], rows)}
    headers = ["model", "box AP", "box AP_large", "box AP_small", "mask AP", "mask AP_large",
               "mask AP_small"]
    for r in runs:
        _, body = out.setdefault(f"{r['backbone']}_{blocks_tag(r['blocks'])}", (headers, []))
        body.append([r["model"], *(_percent(r["ap"][iou][k]) for iou in IOU_TYPES
                                   for k in ("AP", "AP_large", "AP_small"))])
    return out


def _percent(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 2)


def _figure(runs: list[dict[str, Any]]) -> Figure:
    """Fig. 7: box and mask AP per model, a bar per (backbone, blocks) variant."""
    fig, axes = figure(ncols=2, width=4.5)
    models = list(dict.fromkeys(r["model"] for r in runs))
    variants = list(dict.fromkeys((r["backbone"], blocks_tag(r["blocks"])) for r in runs))
    width = 0.8 / len(variants)
    for ax, iou in zip(axes, IOU_TYPES):
        for j, (backbone, tag) in enumerate(variants):
            values = [next((_percent(r["ap"][iou]["AP"]) or 0.0 for r in runs
                            if r["model"] == m and r["backbone"] == backbone
                            and blocks_tag(r["blocks"]) == tag), 0.0) for m in models]
            ax.bar([i + (j - (len(variants) - 1) / 2) * width for i in range(len(models))],
                   values, width, label=f"{backbone}, {tag}")
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel(f"{IOU_TYPES[iou]} AP (%)")
        ax.set_title(f"{IOU_TYPES[iou]} AP (COCOeval)")
    axes[0].legend(fontsize=8)
    return fig
