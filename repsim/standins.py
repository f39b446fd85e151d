"""The stand-in rehearsal: a recipe with every official model replaced by a miniature and every
dataset on disk by a generated or bundled one, sizes cut to minutes.

``repsim run RECIPE --stand-ins`` runs :func:`stand_in` of the recipe: the same figures, layer
groups, metrics and evaluators, so every stage of the paper's recipe (pass, bootstrap, probes,
k-NN, agreement, detection, attention, path efficiency, report) runs end to end on a CPU with
nothing downloaded. The numbers mean nothing about the papers; that the recipe runs does.

- A model of a training method with a minizoo miniature (MoCo-v3, DINO, MSN, MAE, and their
  fine-tuned versions, including ``finetuned`` runs) becomes that miniature at ``preset =
  "tiny"`` (plugin ``repsim-minizoo``); another ViT becomes the untrained miniature; a CNN an
  untrained tiny timm CNN of its family (``resnet10t``, ``convnextv2_atto``) at 32 px.
- ImageNet (``imagefolder``) becomes the core's ``digits``; COCO becomes ``coco_shapes``.
- Examples, train examples, bootstrap resamples, probe grids and epochs, and the detector's
  steps and images are cut; block indices of a 12- or 24-block ViT are mapped to the same
  relative depth of the miniature.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from repsim.errors import RecipeError
from repsim.recipe import Recipe

EXAMPLES = 64  # two estimator minibatches of 32
TRAIN_EXAMPLES = 128
BOOTSTRAP = 10
PROBE_EPOCHS = 4
DETECTOR = {"preset": "smoke", "steps": 2, "batch_size": 2, "micro_batch_size": 2,
            "image_size": 64, "warmup_steps": 1, "milestones": [1], "checkpoint_every": 2,
            "eval_images": 2, "progress": False}
SHAPES = {"train_images": 4, "val_images": 2, "size": 64}

_OBJECTIVES = ("mocov3", "dino", "msn", "mae")
# The miniatures see 1-channel digits and a detector needs RGB COCO images, so the detection
# evaluators get an untrained RGB tiny ViT of their own; nothing else looks at it.
DETECTOR_VIT = "vitdet_standin"
_RGB_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2,
                   "num_classes": 0}
_CNN_32PX = {"resize": 32, "crop": 32}


def miniature_depth() -> int:
    """Blocks of the minizoo's ``tiny`` ViT, which block indices are mapped to."""
    try:
        from repsim_minizoo.config import PRESETS
    except ImportError:
        raise RecipeError("--stand-ins needs the repsim-minizoo plugin (plugins/repsim-minizoo; "
                          "`make install` installs it).") from None
    return PRESETS["tiny"].arch.depth


def _objective(text: str) -> str | None:
    return next((o for o in _OBJECTIVES if o in text.lower()), None)


def stand_in_model(label: str, model: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A model entry's stand-in and a few words on what it replaces."""
    name, params = model["model"], model.get("params", {})
    keep = {k: v for k, v in model.items() if k not in ("model", "params")}
    if name.startswith("minizoo_") or (name == "timm" and not params.get("checkpoint")):
        return model, "kept (needs no file)"
    if name == "finetuned":  # a `repsim finetune` run of one of the objectives
        objective = _objective(label) or _objective(str(params.get("run", "")))
        if objective:
            return {"model": f"minizoo_{objective}_ft", "params": {"preset": "tiny"}, **keep}, \
                f"minizoo_{objective}_ft (tiny)"
    elif name.startswith("resnet"):
        return {"model": "timm", "params": {"arch": "resnet10t", "kwargs": {"num_classes": 0},
                                            "preprocess": _CNN_32PX}, **keep}, \
            "untrained timm resnet10t at 32 px (the minizoo has no CNN)"
    elif name.startswith("convnext"):
        return {"model": "timm", "params": {"arch": "convnextv2_atto",
                                            "kwargs": {"num_classes": 0},
                                            "preprocess": _CNN_32PX}, **keep}, \
            "untrained timm convnextv2_atto at 32 px (the minizoo has no CNN)"
    else:
        objective = _objective(name)
        if objective:
            suffix = "_ft" if name.endswith("_ft") else ""
            return {"model": f"minizoo_{objective}{suffix}", "params": {"preset": "tiny"},
                    **keep}, f"minizoo_{objective}{suffix} (tiny)"
    return {"model": "minizoo_untrained", "params": {"preset": "tiny"}, **keep}, \
        "minizoo_untrained (tiny; no miniature of this training method)"


def _dataset(dataset: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if dataset == "coco":
        return "coco_shapes", dict(SHAPES)
    if dataset == "coco_shapes":
        return dataset, {**params, **SHAPES}
    if dataset == "imagefolder" or "root" in params:
        return "digits", {}
    return dataset, params


def _blocks(value: Any, depth: int, official: int) -> Any:
    """Block indices (ints or 'blocks.N' names, nested lists) of an ``official``-block ViT
    moved to the same relative depth of a ``depth``-block one; repeats merged."""
    if isinstance(value, list):
        out = [_blocks(v, depth, official) for v in value]
        return list({repr(v): v for v in out}.values())
    if isinstance(value, int) and value >= 0:
        return value * depth // official
    if isinstance(value, str) and (m := re.fullmatch(r"blocks\.(\d+)", value)):
        return f"blocks.{int(m.group(1)) * depth // official}"
    return value


def _official_depth(value: Any) -> int:
    numbers = [int(n) for n in re.findall(r"(?<![\w-])(\d+)", repr(value))]
    return 24 if numbers and max(numbers) >= 12 else 12


def stand_in_evaluator(e: dict[str, Any], depth: int, classes: int) -> dict[str, Any]:
    """An evaluator entry at rehearsal size: grids cut to their first value, few epochs."""
    e = {**e, "params": dict(e.get("params", {}))}
    p = e["params"]
    for key in ("layers", "blocks", "layer"):
        if key in p:
            p[key] = _blocks(p[key], depth, _official_depth(p[key]))
    if e["name"] in ("linear_probe", "mlp_probe"):
        _cut_probe(p)
        p["top"] = 1
    elif e["name"] == "prediction_agreement":
        p["ks"] = [k for k in p.get("ks", [5, 10, 100]) if k <= classes] or [2]
        p["probe"] = _cut_probe(dict(p.get("probe", {})))
    elif e["name"] == "vitdet":
        data = p.get("data", {})
        dataset, params = _dataset(data.get("dataset", "coco_shapes"), data.get("params", {}))
        p.update(DETECTOR, data={"dataset": dataset, "params": params})
    return e


def _add_detector_vit(raw: dict[str, Any], depth: int) -> None:
    """Add :data:`DETECTOR_VIT` (as deep as the miniatures, so block indices mean the same) for
    the vitdet evaluators alone: the model pairs and every other evaluator that takes a
    ``models`` or ``pairs`` list keep to the recipe's own models."""
    from repsim.plugins import registry

    own = list(raw["models"])
    if raw["run"].get("pairs", "all") in ("all", "cross"):
        same = raw["run"].get("pairs", "all") == "all"
        raw["run"]["pairs"] = [[a, b] for i, a in enumerate(own)
                               for b in own[i if same else i + 1:]]
    raw["models"][DETECTOR_VIT] = {"model": "timm", "params": {
        "arch": "vit_tiny_patch16_224", "seed": 0, "kwargs": {**_RGB_VIT_KWARGS, "depth": depth},
        "preprocess": {"resize": 32, "crop": 32}}}
    evaluators = registry("evaluator")
    for e in raw["evaluators"]:
        p = e.setdefault("params", {})
        fields = evaluators.get(e["name"]).params.model_fields if e["name"] in evaluators else {}
        if e["name"] == "vitdet":
            p["models"] = [DETECTOR_VIT]
        elif "models" in fields and p.get("models") is None:
            p["models"] = own
        elif "pairs" in fields and p.get("pairs") is None:
            p["pairs"] = [[a, b] for i, a in enumerate(own) for b in own[i + 1:]]


def _cut_probe(p: dict[str, Any]) -> dict[str, Any]:
    for key in ("base_lrs", "weight_decays", "seeds"):
        if key in p:
            p[key] = p[key][:1]
    p["epochs"] = [PROBE_EPOCHS]
    p["warmup_epochs"] = [1]
    return p


def stand_in(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe's rehearsal and one line per replacement made."""
    depth = miniature_depth()
    raw = recipe.model_dump(mode="json", exclude_none=True)
    lines = []
    for label, model in raw["models"].items():
        raw["models"][label], what = stand_in_model(label, model)
        lines.append(f"models.{label}: {model['model']} -> {what}")
    dataset, params = _dataset(raw["data"]["dataset"], raw["data"].get("params", {}))
    if dataset != raw["data"]["dataset"]:
        lines.append(f"data: {raw['data']['dataset']} -> {dataset}")
    raw["data"].update(dataset=dataset, params=params)
    classes = 10 if dataset == "digits" else 1000
    raw["evaluators"] = [stand_in_evaluator(e, depth, classes) for e in raw["evaluators"]]
    if any(e["name"] == "vitdet" for e in raw["evaluators"]):
        _add_detector_vit(raw, depth)
        lines.append(f"models.{DETECTOR_VIT}: added, an untrained RGB tiny ViT for the vitdet "
                     "evaluators only (the miniatures take 1-channel digits)")
    run = raw["run"]
    run["examples"] = min(run.get("examples") or EXAMPLES, EXAMPLES)
    run["train_examples"] = min(run.get("train_examples") or TRAIN_EXAMPLES, TRAIN_EXAMPLES)
    run["bootstrap"] = min(run.get("bootstrap", 0), BOOTSTRAP)
    run["num_workers"] = 0
    run["output"] = str(Path(run.get("output", "runs/run")).with_name(
        Path(run.get("output", "runs/run")).name + "-standins"))
    run["name"] = f"{run.get('name', 'run')} (stand-ins)"
    lines.append(f"run: examples {run['examples']}, train_examples {run['train_examples']}, "
                 f"bootstrap {run['bootstrap']}, probes {PROBE_EPOCHS} epochs, detector "
                 f"{DETECTOR['steps']} steps at {DETECTOR['image_size']} px")
    try:
        return Recipe.model_validate(raw), lines
    except ValidationError as exc:  # a recipe part the rehearsal does not know how to shrink
        raise RecipeError(f"--stand-ins could not rehearse this recipe: {exc}") from None
