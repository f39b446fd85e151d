"""Zoo entries: look up the cache, train on a miss, build a :class:`repsim.models.LoadedModel`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from repsim.models import LoadedModel, Preprocess
from repsim_minizoo import cache, objectives
from repsim_minizoo.config import CONTROL, PRESETS, Preset, config_key
from repsim_minizoo.data import MEAN, STD
from repsim_minizoo.vit import build_vit

# The data every entry trains on; part of every cache key.
DATA = {"dataset": "digits", "split": "train", "val_fraction": 0.2, "split_seed": 0}


def preprocess(preset: Preset) -> Preprocess:
    """8×8 digits → the ViT's input size (bilinear), one channel, the train split's mean/std."""
    return Preprocess(resize=preset.arch.img_size, mean=MEAN, std=STD, channels=1)


def pretrained_key(objective: str, preset: Preset, seed: int) -> str:
    cfg = objectives.load(objective).Config(**preset.objective_overrides.get(objective, {}))
    return config_key({"objective": objective, "arch": preset.arch, "data": DATA, "seed": seed,
                       "schedule": preset.schedules[objective], "objective_config": cfg})


def finetuned_key(objective: str, preset: Preset, seed: int) -> str:
    return config_key({"finetune": preset.finetune, "arch": preset.arch, "data": DATA,
                       "seed": seed, "pretrained": pretrained_key(objective, preset, seed)})


def pretrained(objective: str, preset_name: str = "default", seed: int = 0,
               progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Weights, record and cache path of a pretrained entry; trained and cached on a miss."""
    from repsim_minizoo.train import pretrain

    preset = PRESETS[preset_name]
    path = cache.entry_path(objective, pretrained_key(objective, preset, seed))
    state = cache.load_weights(path)
    if state is not None:
        return state, cache.read_meta(path), path
    state, record = pretrain(objective, preset, seed, progress)
    record["preset"] = preset_name
    cache.save_weights(path, state, record)
    cache.write_json(cache.sidecar_path(path), record)
    return state, record, path


def snapshot_dir(final: Path) -> Path:
    return final.with_suffix(".epochs")


def finetuned(objective: str, preset_name: str = "default", seed: int = 0,
              progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Weights, record and cache path of a fine-tuned entry (per-epoch snapshots beside it)."""
    from repsim_minizoo.finetune import finetune

    preset = PRESETS[preset_name]
    path = cache.entry_path(f"{objective}_ft", finetuned_key(objective, preset, seed))
    state = cache.load_weights(path)
    if state is not None:
        return state, cache.read_meta(path), path
    backbone, pre_record, pre_path = pretrained(objective, preset_name, seed, progress)
    snaps = snapshot_dir(path)

    def save_epoch(epoch: int, epoch_state: dict[str, torch.Tensor]) -> None:
        cache.save_weights(snaps / f"epoch_{epoch:03d}.safetensors", epoch_state,
                           {"objective": objective, "epoch": epoch})

    state, record = finetune(backbone, preset.arch, preset.finetune, seed, save_epoch, progress,
                             desc=f"minizoo {objective}_ft")
    record.update(objective=objective, preset=preset_name, pretrained=str(pre_path),
                  snapshots=sorted(str(p) for p in snaps.glob("epoch_*.safetensors")))
    # The final weights go last: their presence marks the entry (and its snapshots) complete.
    cache.save_weights(path, state, record)
    cache.write_json(cache.sidecar_path(path), record)
    return state, record, path


def build(name: str, objective: str, finetune: bool, preset_name: str = "default", seed: int = 0,
          epoch: int | None = None, progress: bool = True) -> LoadedModel:
    """The registry entry ``name`` as a LoadedModel (eval mode, no drop path)."""
    from repsim.errors import RecipeError

    preset = PRESETS[preset_name]
    provenance: dict[str, Any] = {"zoo": "repsim-minizoo", "objective": objective,
                                  "preset": preset_name, "seed": seed, "finetuned": finetune}
    if objective == CONTROL:
        vit = build_vit(preset.arch, seed)
        provenance["weights"] = "initialisation (seed), no training"
    else:
        if finetune:
            state, record, path = finetuned(objective, preset_name, seed, progress)
            if epoch is not None:
                snap = snapshot_dir(path) / f"epoch_{epoch:03d}.safetensors"
                state = cache.load_weights(snap)
                if state is None:
                    raise RecipeError(f"model '{name}': no fine-tuning snapshot for epoch {epoch} "
                                      f"(epochs 0..{record['epochs']} exist).")
                path = snap
        else:
            state, record, path = pretrained(objective, preset_name, seed, progress)
        head = finetune or objectives.load(objective).OBJECTIVE.keeps_head
        vit = build_vit(preset.arch, seed, num_classes=None if head else 0)
        vit.load_state_dict(state)
        provenance.update(checkpoint=str(path), loss_final=record.get("loss_final"),
                          train_seconds=record.get("train_seconds"))
        if finetune:
            provenance.update(epoch=epoch, snapshots=record.get("snapshots"),
                              path_efficiency={g: v["efficiency"]
                                               for g, v in record["path"]["groups"].items()})
    return LoadedModel(vit, preprocess(preset), name=name, num_prefix_tokens=1, family="vit",
                       provenance=provenance)

