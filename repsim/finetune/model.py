"""The network being fine-tuned (a new classifier, stochastic depth) and the ``finetuned`` model
entry, which builds a run's result or any of its snapshots for a comparison recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repsim.errors import CheckpointError, RecipeError
from repsim.finetune.config import FinetunedParams
from repsim.models.base import LoadedModel

# The attributes timm's blocks keep stochastic depth in (ViT: drop_path1/2; ResNet, ConvNeXt:
# drop_path, None or Identity when off).
_DROP_PATH_SLOTS = ("drop_path", "drop_path1", "drop_path2")


def new_head(module: nn.Module, num_classes: int, model: str) -> None:
    """Replace the classifier with one for ``num_classes`` classes (timm's ``reset_classifier``)."""
    if not hasattr(module, "reset_classifier"):
        raise RecipeError(
            f"model '{model}' has no reset_classifier() (timm's API for a new classifier), so "
            "fine-tuning cannot give it one. Set finetune.head = 'keep' if its output already "
            "is the dataset's class scores, or build it with timm.")
    module.reset_classifier(num_classes)


def init_head(module: nn.Module, std: float | None, seed: int) -> None:
    """MAE's initialisation of a new classifier: truncated normal weights, zero bias."""
    head = module.get_classifier() if hasattr(module, "get_classifier") else None
    if std is None or not isinstance(head, nn.Linear):
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.trunc_normal_(head.weight, std=std)
        nn.init.zeros_(head.bias)


def set_drop_path(module: nn.Module, rate: float, model: str) -> int:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last), timm's rule, in
    every block with a drop-path slot; returns the number of blocks. A model built without drop
    path gets it here, so any entry can be fine-tuned with the preset's rate."""
    from timm.layers import DropPath

    blocks = [m for m in module.modules()
              if any(hasattr(m, a) and (getattr(m, a) is None or
                                        isinstance(getattr(m, a), (nn.Identity, DropPath)))
                     for a in _DROP_PATH_SLOTS)]
    if rate > 0 and not blocks:
        raise RecipeError(f"model '{model}' has no drop-path slots (timm blocks' drop_path, "
                          "drop_path1, drop_path2): set finetune.drop_path = 0 for it.")
    for k, block in enumerate(blocks):
        r = rate * k / max(1, len(blocks) - 1)
        for a in _DROP_PATH_SLOTS:
            if hasattr(block, a):
                setattr(block, a, DropPath(r) if r > 0 else nn.Identity())
    return len(blocks)


def read_run(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run directory's resolved configuration and provenance."""
    resolved, prov = run / "resolved.json", run / "provenance.json"
    if not resolved.is_file() or not prov.is_file():
        from repsim.errors import MissingFileError

        what = "does not exist" if not run.exists() else "holds no fine-tuning run"
        raise MissingFileError(
            f"fine-tuning run '{run}' {what} (resolved.json, provenance.json). Fine-tune first: "
            "`repsim finetune RECIPE`, a fine-tuning recipe with finetune.output = "
            f"'{run}' (recipes/paper/finetune_*.toml).", str(run))
    return json.loads(resolved.read_text()), json.loads(prov.read_text())


def finetuned_structure(params: FinetunedParams) -> LoadedModel:
    """The fine-tuned network without weights: the base entry's structure and the new head."""
    from repsim.plugins import registry

    resolved, _ = read_run(Path(params.run))
    base = resolved["source"]["model"]
    part = registry("model").get(base["model"])
    validated = part.validate(base["params"], where=f"the model of run '{params.run}'")
    loaded = part.structure(validated) if part.structure is not None else part.build(validated)
    if resolved["settings"]["head"] == "new":
        new_head(loaded.module, resolved["num_classes"], base["model"])
    loaded.name = f"{base['model']} (fine-tuned)"
    loaded.provenance = {**loaded.provenance, "finetuned": True, "run": str(params.run),
                         "base": base}
    return loaded


def build_finetuned(params: FinetunedParams) -> LoadedModel:
    """The fine-tuned model (or a snapshot of it), with its run's snapshots in its provenance."""
    from repsim.store import read_tensors

    loaded = finetuned_structure(params)
    run = Path(params.run)
    _, prov = read_run(run)
    snaps = prov["snapshots"]
    if params.epoch is not None or params.step is not None:
        from repsim.finetune.snapshots import snapshot_name

        unit, index = ("epoch", params.epoch) if params.epoch is not None else \
            ("step", params.step)
        weights = run / "snapshots" / snapshot_name(unit, index)
        if weights.name not in snaps:
            raise RecipeError(f"fine-tuning run '{run}' has no snapshot {weights.name}; "
                              f"it has {', '.join(snaps) or 'none'}.")
    else:
        weights = run / "final.safetensors"
        if prov.get("status") != "complete":
            raise RecipeError(
                f"fine-tuning run '{run}' is not finished ({prov['epochs_done']} of "
                f"{prov['epochs']} epochs): resume it with `repsim finetune` on its recipe "
                f"(a copy is {run / 'config.toml'}), or pick a snapshot with `epoch`.")
    try:
        loaded.module.load_state_dict(read_tensors(weights), strict=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file, or another model's weights
        raise CheckpointError(f"cannot load '{weights}' into the fine-tuned model: {exc}. The "
                              "run directory is damaged or from another model; fine-tune "
                              "again into an empty directory.") from None
    loaded.module.eval()
    loaded.provenance.update(
        weights=str(weights), epoch=params.epoch, step=params.step,
        snapshots=[str(run / "snapshots" / n) for n in snaps],
        path_length=str(run / prov["path_length"]),
        path_efficiency=prov["path_efficiency"], eval_accuracy=prov.get("eval_accuracy"),
        base_provenance=prov["model_provenance"])
    return loaded
