"""The preflight: every file a recipe needs, checked at once before any weights load, and an
estimate of the compute each figure needs.

``repsim validate`` and ``repsim run`` call :func:`preflight`. Missing or unreadable files
(checkpoints, dataset folders, split folders, annotation files, fine-tuning runs) are listed
together with where each is published and which location variable (:mod:`repsim.paths`) points
at it. The estimate counts forward FLOPs per image by running each architecture on the meta
device under torch's ``FlopCounterMode`` (no weights, no data), multiplies by the images of the
pass and adds the training the evaluators do; hours follow from a CPU throughput measured on a
full-size ViT-B/16 by the stand-in rehearsal (``repsim run recipes/paper.toml --stand-ins``)
and a stated GPU throughput.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from repsim.errors import RecipeError
from repsim.recipe import (
    CheckedRecipe,
    MissingFile,
    Recipe,
    check_recipe,
    load_recipe,
    path_params,
    read_toml,
)

# Training a network costs about three forwards (forward, then backward through activations and
# weights), the usual rule for dense layers.
TRAIN_FACTOR = 3
GPU_FLOPS = 120e12
GPU_BASIS = ("one A100-class GPU sustaining 120 TFLOP/s (about 40 % of an A100's 312 TFLOP/s "
             "bf16 peak; an H100 is about 2-3x faster)")
# A ViT-B/16 forward (batch 4, fp32, one thread) on the 2-core machine this was written on,
# 2026-12-05; `--stand-ins` measures the machine it runs on and stores that instead.
DEFAULT_CPU_FLOPS = 180e9
DEFAULT_CPU_BASIS = ("one thread of a ViT-B/16 forward, measured on the development machine "
                     "(run `repsim run recipes/paper.toml --stand-ins` once to measure "
                     "this one)")

# Split sizes and classes of the datasets whose size cannot be read before the data is there:
# an image folder is taken to be ImageNet-1k (the paper's), the others are what they are.
_SIZES: dict[str, tuple[dict[str, int], int]] = {
    "imagefolder": ({"val": 50_000, "train": 1_281_167}, 1000),
    "digits": ({"val": 360, "train": 1437, "all": 1797}, 10),
    "coco": ({"val": 5000, "train": 118_287}, 80),
}


@dataclass
class ModelCost:
    """One model's forward FLOPs per image and the width of each layer's features."""

    flops: float
    dims: dict[str, int]
    crop: int
    tokens: int | None = None  # a ViT's tokens at its crop (prefix tokens included)
    prefix: int = 0  # of which CLS and register tokens
    width: int | None = None  # a ViT's embedding width


@dataclass
class FigureEstimate:
    """The compute of one figure's recipe run alone (or of the whole recipe's one pass)."""

    name: str
    models: int
    images: int
    forward: float  # FLOPs of the feature pass
    training: float  # FLOPs the evaluators train with
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.forward + self.training


@dataclass
class Preflight:
    """What a recipe needs that is absent, and what it will cost."""

    checked: CheckedRecipe
    missing: list[MissingFile]
    figures: list[FigureEstimate]
    total: FigureEstimate | None
    cpu_flops: float
    cpu_basis: str

    def missing_text(self) -> str:
        from repsim import paths

        lines = [f"{self.checked.path}: {len(self.missing)} file(s) or folder(s) missing or "
                 "unreadable (nothing was loaded):"]
        lines += [f"- {m.line()}" for m in self.missing]
        hints = list(dict.fromkeys(h for m in self.missing if (h := paths.hint(m.path))))
        if hints:
            lines.append("Where they are looked for:")
            lines += [f"  {h}" for h in hints]
        return "\n".join(lines)

    def estimate_text(self) -> str:
        from tabulate import tabulate

        rows = [_row(f, self.cpu_flops) for f in self.figures]
        if self.total is not None:
            rows.append(_row(self.total, self.cpu_flops))
        table = tabulate(rows, headers=["figure", "models", "images", "forward PFLOP",
                                        "training PFLOP", "CPU hours", "GPU hours"],
                         tablefmt="simple", disable_numparse=True)
        notes = [f"  {f.name}: {n}" for f in [*self.figures, *([self.total] if self.total
                                                              else [])] for n in f.notes]
        return "\n".join([
            "Compute estimate (each figure's recipe run alone; the last row is this recipe, "
            "whose figures share one pass):", table,
            "Basis: forward FLOPs per image counted by torch's FlopCounterMode on each "
            "architecture built on the meta device at its crop (no weights); an image folder "
            "taken as ImageNet-1k (1,281,167 train / 50,000 val images, 1000 classes) where "
            "the recipe gives no number; training = "
            f"{TRAIN_FACTOR} forwards per example and step (probes, detectors); k-NN = one "
            "similarity per query and memory item. "
            f"CPU: {self.cpu_flops / 1e9:.0f} GFLOP/s ({self.cpu_basis}). GPU: {GPU_BASIS}. "
            "Data loading, CKA accumulation and detector heads are not counted.",
            *(["Notes:", *notes] if notes else [])])


def _row(f: FigureEstimate, cpu_flops: float) -> list[str]:
    return [f.name, str(f.models), f"{f.images:,}", _pf(f.forward), _pf(f.training),
            _hours(f.total / cpu_flops), _hours(f.total / GPU_FLOPS)]


def _pf(flops: float) -> str:
    return f"{flops / 1e15:.3g}"


def _hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:,.0f}" if h >= 10 else f"{h:.2g}" if h >= 0.01 else "<0.01"


def preflight(path: str | Path, run_overrides: dict[str, Any] | None = None,
              estimate: Literal["always", "if_missing"] = "always") -> Preflight:
    """Check a recipe without loading weights: every part and parameter (errors raise as
    ``check_recipe`` does), then every file it needs (collected, not raised), then the
    compute estimate (``"if_missing"``: only when a file is missing, as ``repsim run`` does)."""
    checked = check_recipe(path, run_overrides=run_overrides, missing_ok=True)
    missing = [*checked.missing, *_layout_missing(checked)]
    missing += _unreadable(checked)
    figures: list[FigureEstimate] = []
    total = None
    if estimate == "always" or missing:
        costs = model_costs(checked)
        figures = [figure_estimate(name, fig, checked, costs)
                   for name, fig in figure_recipes(checked.path, checked.recipe)]
        if len(figures) != 1:
            total = figure_estimate(f"{checked.path.name} (all)", checked.recipe, checked, costs)
    flops, basis = cpu_throughput()
    return Preflight(checked, missing, figures, total, flops, basis)


# --- files --------------------------------------------------------------------------------------

def _layout_missing(checked: CheckedRecipe) -> list[MissingFile]:
    """Split folders and annotation files inside dataset folders that exist (an absent root is
    already listed): the run's data and every evaluator's own dataset (``data = {...}``)."""
    recipe = checked.recipe
    out: list[MissingFile] = []
    if checked.dataset is not None:
        out += _dataset_files(recipe.data.dataset, checked.dataset[1], _run_splits(checked),
                              "data.params")
    for i, e in enumerate(recipe.evaluators):
        resolved = checked.evaluators.get(e.key)
        ref = getattr(resolved[1], "data", None) if resolved else None
        if ref is not None and hasattr(ref, "dataset"):
            splits = [getattr(resolved[1], s) for s in ("train_split", "eval_split")
                      if isinstance(getattr(resolved[1], s, None), str)]
            out += _dataset_files(ref.dataset, ref.params, splits,
                                  f"evaluators[{i}] ({e.name}).params.data.params")
    return list({(m.where, m.path): m for m in out}.values())


def _run_splits(checked: CheckedRecipe) -> list[str]:
    """The dataset splits the run reads: its own, and the train splits of evaluators that read
    cached features of another split (k-NN memory bank, probes)."""
    splits = [checked.recipe.data.split]
    for key, resolved in checked.evaluators.items():
        if _reads_train(checked, key) and (split := resolved[1].train_split) not in splits:
            splits.append(split)
    return splits


def _dataset_files(name: str, params: Any, splits: list[str], where: str) -> list[MissingFile]:
    root = getattr(params, "root", None)
    if root is None or not Path(root).is_dir():
        return []
    root = Path(root)
    out = []
    if name == "imagefolder":
        # a root laid out as split folders must hold every split the run reads
        if any((root / s).is_dir() for s in splits):
            out += [MissingFile(f"{where}.root", str(root / s), f"the '{s}' split's class folders")
                    for s in splits if not (root / s).is_dir()]
    elif name == "coco":
        for s in splits:
            images = root / params.images.format(split=s)
            ann = root / params.annotations.format(split=s)
            if not images.is_dir():
                out.append(MissingFile(f"{where}.images", str(images), f"the '{s}' images; "
                                       "COCO 2017 from https://cocodataset.org/#download"))
            if not ann.is_file():
                out.append(MissingFile(f"{where}.annotations", str(ann), f"the '{s}' annotations; "
                                       "annotations_trainval2017.zip from "
                                       "https://cocodataset.org/#download"))
    return out


def _unreadable(checked: CheckedRecipe) -> list[MissingFile]:
    """Files the models name that exist but cannot be read."""
    out = []
    for label, resolved in checked.models.items():
        if resolved is None:
            continue
        for where, p in path_params(resolved[1], f"models.{label}.params"):
            if p.exists() and not os.access(p, os.R_OK):
                out.append(MissingFile(where, str(p), "it exists: check its permissions",
                                       problem="cannot be read"))
    return out


# --- figures ------------------------------------------------------------------------------------

def figure_recipes(path: Path, recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The figures of a recipe: the recipes it includes that run on their own (models and
    something to compute), else the recipe itself."""
    raw = read_toml(path.read_text(encoding="utf-8"), path)
    out = []
    for name in raw.get("include", []) if isinstance(raw.get("include"), list) else []:
        child = path.parent / name
        try:
            fig = load_recipe(child)
        except RecipeError:
            continue  # a shared fragment (settings, a model list), not a figure
        if fig.metrics or fig.evaluators:
            out.append((child.stem, fig))
    return out or [(path.stem, recipe)]


def model_costs(checked: CheckedRecipe) -> dict[str, ModelCost]:
    """Forward FLOPs per image and feature widths of every model built on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    costs: dict[str, ModelCost] = {}
    counted: dict[tuple[Any, ...], ModelCost] = {}  # one forward per distinct structure
    for label, sk in checked.skeletons.items():
        crop = sk.preprocess.crop
        if crop is None:
            continue
        signature = (type(sk.module).__name__, crop, sk.preprocess.channels,
                     checked.recipe.reduce_of(label), sk.family, sk.num_prefix_tokens,
                     tuple((n, tuple(t.shape)) for n, t in sk.module.named_parameters()))
        if signature in counted:
            costs[label] = counted[signature]
            entry = checked.recipe.models[label]
            _COUNTED[_entry_key(entry.model, entry.params)] = counted[signature].flops
            continue
        shapes: dict[str, tuple[int, ...]] = {}

        def hook(name: str) -> Any:
            def record(_m: Any, inputs: Any, out: Any) -> None:
                for key, t in ((name, out), (name + ":in", inputs)):
                    t = t[0] if isinstance(t, (tuple, list)) and t else t
                    if isinstance(t, torch.Tensor):
                        shapes[key] = tuple(t.shape[1:])
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in sk.module.named_modules() if n]
        try:
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                out = sk.module(torch.zeros(1, sk.preprocess.channels, crop, crop, device="meta"))
        except Exception:  # noqa: BLE001 - a network that cannot run on meta: not estimated
            continue
        finally:
            for h in handles:
                h.remove()
        if isinstance(out, torch.Tensor):
            shapes["output"] = tuple(out.shape[1:])
        entry = checked.recipe.models[label]
        _COUNTED[_entry_key(entry.model, entry.params)] = float(counter.get_total_flops())
        reduce = checked.recipe.reduce_of(label)
        dims = {n: _width(s, reduce) for n, s in shapes.items()}
        block = shapes.get("blocks.0") if sk.family == "vit" else None
        costs[label] = counted[signature] = ModelCost(
            float(counter.get_total_flops()), dims, crop,
            tokens=block[0] if block and len(block) == 2 else None,
            prefix=sk.num_prefix_tokens, width=block[-1] if block else None)
    return costs


def _width(shape: tuple[int, ...], reduce: str) -> int:
    """Features per example after the token reduction: tokens [N, D] and maps [C, H, W] keep
    D / C unless flattened."""
    if reduce == "flatten" or len(shape) < 2:
        return math.prod(shape)
    return shape[-1] if len(shape) == 2 else shape[0]


def _split_size(recipe: Recipe, split: str, given: int | None) -> tuple[int, str | None]:
    if given is not None:
        return given, None
    sizes = _SIZES.get(recipe.data.dataset, ({}, 0))[0]
    if split in sizes:
        return sizes[split], None
    return 0, f"the size of the '{split}' split is unknown before it is read: not counted"


def figure_estimate(name: str, fig: Recipe, checked: CheckedRecipe,
                    costs: dict[str, ModelCost]) -> FigureEstimate:
    """The compute of ``fig`` (a figure's recipe, or the whole one) with the model costs of the
    checked whole recipe."""
    notes: list[str] = []
    val, note = _split_size(fig, fig.data.split, fig.run.examples)
    notes += [note] if note else []
    readers = [e for e in fig.evaluators if _reads_train(checked, e.key)]
    train = 0
    if readers:
        train, note = _split_size(fig, "train", fig.run.train_examples)
        notes += [note] if note else []
    per_image = {m: costs[m].flops for m in fig.models if m in costs}
    training = 0.0
    for label, m in fig.models.items():
        if m.model == "finetuned":  # its run does not exist yet: count its fine-tuning recipe
            image, flops, note = _finetune_cost(checked.path, str(m.params.get("run", "")))
            if image is not None:
                per_image[label] = image
            training += flops
            notes.append(f"{label}: {note}")
    unknown = [m for m in fig.models if m not in per_image]
    if unknown:
        notes.append(f"not counted (no structure before the run): {', '.join(unknown)}")
    forward = sum(per_image.values()) * (val + train)
    classes = _SIZES.get(fig.data.dataset, ({}, 1000))[1]
    for e in fig.evaluators:
        resolved = checked.evaluators.get(e.key)
        if resolved is None:
            continue
        flops, note = _evaluator_flops(e.name, resolved[1], fig, checked, costs, val, train,
                                       classes)
        training += flops
        notes += [f"{e.key}: {note}"] if note else []
    return FigureEstimate(name, len(fig.models), val + train, forward, training, notes)


# Forward FLOPs per image of the model entries counted so far, by entry and parameters: a
# fine-tuning recipe's model is usually one of the recipe's own (same file, same structure).
_COUNTED: dict[str, float] = {}


def _entry_key(model: str, params: dict[str, Any]) -> str:
    return json.dumps([model, params], sort_keys=True, default=str)


@functools.lru_cache(maxsize=None)
def _finetune_cost(recipe: Path, run: str) -> tuple[float | None, float, str]:
    """A `finetuned` model whose run is yet to be made: its model's forward FLOPs per image and
    the FLOPs of its fine-tuning (epochs × train images × 3 forwards), from the fine-tuning
    recipe beside ``recipe`` (its folder and sub-folders) whose ``finetune.output`` is ``run``."""
    from repsim.finetune.config import load_finetune_recipe
    from repsim.plugins import registry

    for candidate in sorted(recipe.resolve().parent.rglob("*.toml")):
        if "[finetune]" not in candidate.read_text(encoding="utf-8"):
            continue
        try:
            ft = load_finetune_recipe(candidate)
        except RecipeError:
            continue
        if Path(ft.finetune.output) != Path(run):
            continue
        cost = _COUNTED.get(_entry_key(ft.model.model, ft.model.params))
        if cost is None:  # a model the recipe itself does not hold: build its structure
            part = registry("model").get(ft.model.model)
            try:
                cost = _forward_cost(part.skeleton(part.validate(ft.model.params)))
            except Exception:  # noqa: BLE001 - no structure without its files: the note says so
                cost = None
        images = ft.data.examples or _SIZES.get(ft.data.dataset, ({}, 0))[0].get(ft.data.split, 0)
        if cost is None or not images:
            return None, 0.0, f"made first by `repsim finetune {candidate.name}` (not counted)"
        epochs = ft.finetune.settings().epochs
        return cost, epochs * images * TRAIN_FACTOR * cost, (
            f"includes its fine-tuning first, `repsim finetune {candidate.name}` ({epochs} "
            f"epochs of {images:,} images)")
    return None, 0.0, f"its fine-tuning run '{run}' is made first by `repsim finetune` (no " \
        "recipe writing it was found beside this one; not counted)"


def _forward_cost(skeleton: Any) -> float | None:
    """Forward FLOPs of one image through a meta-device model, or None if it cannot run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    crop = skeleton.preprocess.crop
    if crop is None:
        return None
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            skeleton.module(torch.zeros(1, skeleton.preprocess.channels, crop, crop,
                                        device="meta"))
    except Exception:  # noqa: BLE001 - a network that cannot run on meta
        return None
    return float(counter.get_total_flops())


def _reads_train(checked: CheckedRecipe, key: str) -> bool:
    resolved = checked.evaluators.get(key)
    if resolved is None or hasattr(resolved[1], "data"):
        return False
    p = resolved[1]
    if getattr(p, "scores", "linear_probe") != "linear_probe":
        return False  # agreement of the models' own outputs reads no train features
    return isinstance(getattr(p, "train_split", None), str)


def _evaluator_flops(name: str, p: Any, fig: Recipe, checked: CheckedRecipe,
                     costs: dict[str, ModelCost], val: int, train: int, classes: int
                     ) -> tuple[float, str]:
    models = [m for m in (getattr(p, "models", None) or list(fig.models)) if m in costs]
    if name == "vitdet":
        return _vitdet_flops(p, models, costs)
    if name == "knn":
        reductions = len(getattr(p, "reductions", [None]))
        return sum(2 * val * train * d * reductions
                   for m in models for d in _layer_dims(checked, costs, m, p.group, "all")), ""
    if name == "prediction_agreement" and p.scores != "linear_probe":
        return 0.0, ""  # the models' own outputs: nothing trained
    if name in ("linear_probe", "mlp_probe", "prediction_agreement"):
        grid = p if name != "prediction_agreement" else _probe_grid(p)
        runs = (len(grid.base_lrs) * len(grid.weight_decays) * len(grid.warmup_epochs) *
                len(grid.seeds))
        epochs = sum(grid.epochs)
        depths = getattr(p, "depths", [0])
        if name == "prediction_agreement":
            layers: Any = "last" if p.layer is None else [p.layer]
            group = None
        else:
            layers, group = p.layers, p.group
        flops = 0.0
        for m in models:
            for d in _layer_dims(checked, costs, m, group, layers):
                h = getattr(p, "hidden", None) or d
                per = sum(d * h + (k - 1) * h * h + h * classes if k else d * classes
                          for k in depths)
                flops += runs * epochs * train * 2 * TRAIN_FACTOR * per
        return flops, ""
    return 0.0, ""


def _probe_grid(p: Any) -> Any:
    from repsim.evaluators.params import LinearProbeParams

    return LinearProbeParams(**p.probe)


def _layer_dims(checked: CheckedRecipe, costs: dict[str, ModelCost], model: str,
                group: str | None, layers: Any) -> list[int]:
    """The feature widths a probe or k-NN sees for one model: one entry per trained layer
    (a concatenation counts its widths together)."""
    groups = checked.groups.get(model, {})
    chosen = groups.get(group, []) if group else [la for ls in groups.values() for la in ls]
    dims = costs[model].dims
    if layers == "all":
        return [dims.get(la, 0) for la in chosen]
    if layers == "last" or layers is None:
        return [dims.get(chosen[-1], 0)] if chosen else []
    out = []
    for entry in layers:
        if isinstance(entry, list):
            out.append(sum(dims.get(la, 0) for la in entry))
        elif entry in groups:
            out += [dims.get(la, 0) for la in groups[entry]]
        else:
            out.append(dims.get(entry, 0))
    return out


def _vitdet_flops(p: Any, models: list[str], costs: dict[str, ModelCost]) -> tuple[float, str]:
    """Backbone FLOPs of every detector trained: each ViT's forward scaled from its crop to
    ``image_size`` (per block 24·T·D² for the projections and MLP plus 4·T²·D for attention;
    the patch grid grows with the side squared)."""
    flops = 0.0
    for m in models:
        c = costs[m]
        if not (c.tokens and c.width and c.crop):
            continue
        t0 = c.tokens
        t = c.prefix + (t0 - c.prefix) * (p.image_size / c.crop) ** 2
        at = c.flops * (t / t0) * (1 + t / (6 * c.width)) / (1 + t0 / (6 * c.width))
        for backbone in p.backbone:
            flops += p.steps * p.batch_size * at * len(p.blocks) * \
                (TRAIN_FACTOR if backbone == "finetune" else 1)
    return flops, "backbone only (the Mask R-CNN heads and pyramid add more)"


# --- throughput ---------------------------------------------------------------------------------

def _throughput_file() -> Path:
    from repsim.run.stages import cache_root

    return cache_root() / "cpu_throughput.json"


def cpu_throughput() -> tuple[float, str]:
    """This machine's measured CPU FLOP/s (stored by the stand-in rehearsal), else the default."""
    f = _throughput_file()
    try:
        data = json.loads(f.read_text())
        return float(data["flops"]), (f"measured on this machine by the stand-in rehearsal, "
                                      f"{data['how']}, {data['when']}")
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_CPU_FLOPS, DEFAULT_CPU_BASIS


def measure_cpu_throughput(threads: int | None = None) -> float:
    """Time a full-size ViT-B/16 forward (random weights: the stand-in for the official
    files) on the CPU, store its FLOP/s for the preflight, and return it."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from repsim import store

    previous = torch.get_num_threads()
    used = threads or previous
    torch.set_num_threads(used)
    try:
        with torch.device("meta"):  # no random initialisation of 86 M weights: seconds saved
            model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        model.to_empty(device="cpu")
        with torch.no_grad():  # small constants: the speed of a product does not depend on the
            for t in [*model.parameters(), *model.buffers()]:  # values, unless denormal
                if t.is_floating_point():
                    t.fill_(0.01)
        x = torch.randn(2, 3, 224, 224)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                model(x[:1])  # warm-up and the count
            seconds = math.inf
            for _ in range(3):  # the best of three: a busy machine's noise only adds time
                start = time.perf_counter()
                model(x)
                seconds = min(seconds, time.perf_counter() - start)
        flops = len(x) * counter.get_total_flops() / seconds
    finally:
        torch.set_num_threads(previous)
    how = f"ViT-B/16 forward, batch 2, fp32, best of 3, {used} thread(s)"
    store.write_json(_throughput_file(), {"flops": flops, "how": how,
                                          "when": time.strftime("%Y-%m-%d")})
    return flops
