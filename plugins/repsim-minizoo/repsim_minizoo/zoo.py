"""Zoo entries: look up the cache, train on a miss, build a :class:`repsim.models.LoadedModel`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from repsim.models import LoadedModel, Preprocess
from repsim_minizoo import cache, objectives
from repsim_minizoo.config import (
    CONTROL,
    PRESETS,
    STEP_SECONDS,
    Preset,
    config_key,
    to_jsonable,
)
from repsim_minizoo.data import MEAN, STD
from repsim_minizoo.vit import build_vit

# The data every entry trains on; part of every cache key.
DATA = {"dataset": "digits", "split": "train", "val_fraction": 0.2, "split_seed": 0}
DATA_SIZE = 1797  # scikit-learn's digits
log = logging.getLogger("repsim.minizoo")


def preprocess(preset: Preset) -> Preprocess:
    """8×8 digits → the ViT's input size (bilinear), one channel, the train split's mean/std."""
    return Preprocess(resize=preset.arch.img_size, mean=MEAN, std=STD, channels=1)


def pretrained_key(objective: str, preset: Preset, seed: int) -> str:
    cfg = objectives.load(objective).Config(**preset.objective_overrides.get(objective, {}))
    return config_key({"objective": objective, "arch": preset.arch, "data": DATA, "seed": seed,
                       "schedule": preset.schedules[objective], "objective_config": cfg})


def finetuned_key(objective: str, preset: Preset, seed: int) -> str:
    from repsim.finetune.config import CODE_VERSION as RUNNER_VERSION

    return config_key({"finetune": preset.finetune.settings(seed).model_dump(mode="json"),
                       "runner": RUNNER_VERSION, "arch": preset.arch, "data": DATA,
                       "seed": seed, "pretrained": pretrained_key(objective, preset, seed)})


def pretrained(objective: str, preset_name: str = "default", seed: int = 0,
               progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Weights, record and cache path of a pretrained entry; trained and cached on a miss."""
    from repsim_minizoo.train import pretrain

    preset = PRESETS[preset_name]
    path = entry_file(objective, False, preset_name, seed)
    state = cache.load_weights(path)
    if state is not None:
        return state, cache.read_meta(path), path
    state, record = pretrain(objective, preset, seed, progress)
    record["preset"] = preset_name
    cache.save_weights(path, state, record)
    cache.write_json(cache.sidecar_path(path), record)
    return state, record, path


def run_dir(final: Path) -> Path:
    """The fine-tuning run directory of a fine-tuned entry (snapshots, path lengths)."""
    return final.with_suffix(".run")


def finetuned(objective: str, preset_name: str = "default", seed: int = 0,
              progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Weights, record and cache path of a fine-tuned entry, fine-tuned by the core's runner
    (:mod:`repsim.finetune`) from the pretrained entry; its run directory lies beside it."""
    import time

    from repsim.finetune.runner import finetune
    from repsim.plugins import build_part
    from repsim_minizoo.train import TRAINING_THREADS, deterministic

    preset = PRESETS[preset_name]
    path = entry_file(objective, True, preset_name, seed)
    state = cache.load_weights(path)
    if state is not None:
        return state, cache.read_meta(path), path
    _, _, pre_path = pretrained(objective, preset_name, seed, progress)
    log.info("fine-tuning minizoo_%s_ft: %d epochs of the digits train split, about %.0f s "
             "at the reference machine's speed", objective, preset.finetune.epochs,
             training_cost(objective, True, preset_name))
    start, cpu_start = time.perf_counter(), time.process_time()
    runner_log = logging.getLogger("repsim.finetune")
    level = runner_log.level
    runner_log.setLevel(logging.WARNING)  # its per-epoch lines: the zoo says start and end
    try:
        with deterministic():
            backbone = build(f"minizoo_{objective}", objective, False, preset_name, seed,
                             progress=progress)
            data = build_part("dataset", DATA["dataset"], split=DATA["split"],
                              val_fraction=DATA["val_fraction"], seed=DATA["split_seed"])
            source = {"model": {"model": f"minizoo_{objective}",
                                "params": {"preset": preset_name, "seed": seed}}, "data": DATA}
            prov = finetune(backbone, data, preset.finetune.settings(seed), run_dir(path),
                            source=source, progress=progress)
    finally:
        runner_log.setLevel(level)
    run = run_dir(path)
    state = cache.load_weights(run / "final.safetensors")
    record = {"objective": objective, "preset": preset_name, "seed": seed,
              "epochs": prov["epochs"], "steps": prov["steps"], "pretrained": str(pre_path),
              "train_seconds": round(time.perf_counter() - start, 2),
              "cpu_seconds": round(time.process_time() - cpu_start, 2), "threads": TRAINING_THREADS,
              "schedule": to_jsonable(preset.finetune), "loss_first": prov["loss"][0],
              "loss_final": prov["loss"][-1], "loss_curve": prov["loss"],
              "run": str(run), "snapshots": [str(run / "snapshots" / n) for n in prov["snapshots"]],
              "path_length": str(run / prov["path_length"]),
              "path_efficiency": prov["path_efficiency"]}
    # The final weights go last: their presence marks the entry (and its run) complete.
    cache.save_weights(path, state, record)
    cache.write_json(cache.sidecar_path(path), record)
    log.info("minizoo_%s_ft fine-tuned in %.0f s (loss %.3f → %.3f)", objective,
             record["train_seconds"], record["loss_first"], record["loss_final"])
    return state, record, path


def entry_file(objective: str, finetune: bool, preset_name: str = "default", seed: int = 0
               ) -> Path:
    """Where the weights of an entry are (or will be) cached."""
    preset = PRESETS[preset_name]
    if finetune:
        return cache.entry_path(f"{objective}_ft", finetuned_key(objective, preset, seed))
    return cache.entry_path(objective, pretrained_key(objective, preset, seed))


def training_chains(wanted: list[tuple[str, bool]], preset_name: str = "default", seed: int = 0
                    ) -> list[list[tuple[str, bool]]]:
    """The uncached entries among ``wanted`` (objective, fine-tuned) as chains that must run in
    order — one per objective: its pretraining (if missing) before its fine-tuning — ordered
    from the longest to the shortest by :func:`training_cost`."""
    chains: dict[str, list[tuple[str, bool]]] = {}
    for objective, finetune in wanted:
        if objective == CONTROL:
            continue
        needs = [(objective, False), (objective, True)] if finetune else [(objective, False)]
        for entry in needs:
            if not cache.is_complete(entry_file(*entry, preset_name, seed)):
                chain = chains.setdefault(objective, [])
                if entry not in chain:
                    chain.append(entry)
    for chain in chains.values():
        chain.sort(key=lambda e: e[1])  # pretraining first
    return sorted(chains.values(), key=lambda c: -chain_cost(c, preset_name))


def training_cost(objective: str, finetune: bool, preset_name: str = "default") -> float:
    """Expected seconds of training an entry at one thread on the reference machine (README,
    "Budget"): steps × the step time measured there. For dealing entries to processes and the
    first estimate; the training itself times its own steps."""
    preset = PRESETS[preset_name]
    if finetune:
        n = int(DATA_SIZE * (1 - DATA["val_fraction"]))
        return preset.finetune.epochs * (n // preset.finetune.batch_size) * STEP_SECONDS["ft"]
    return preset.schedules[objective].steps * STEP_SECONDS[objective]


def chain_cost(entries: list[tuple[str, bool]], preset_name: str = "default") -> float:
    """:func:`training_cost` of entries trained one after the other."""
    return sum(training_cost(*e, preset_name) for e in entries)


def deal(chains: list[list[tuple[str, bool]]], processes: int,
         preset_name: str = "default") -> list[list[tuple[str, bool]]]:
    """Chains dealt to ``processes`` workers, longest first to the least loaded (LPT), so the
    slowest worker finishes as early as this simple rule allows. Each worker's entries in order."""
    loads = [0.0] * processes
    out: list[list[tuple[str, bool]]] = [[] for _ in range(processes)]
    for chain in chains:
        w = loads.index(min(loads))
        out[w] += chain
        loads[w] += chain_cost(chain, preset_name)
    return out


def build(name: str, objective: str, finetune: bool, preset_name: str = "default", seed: int = 0,
          epoch: int | None = None, progress: bool = True) -> LoadedModel:
    """The registry entry ``name`` as a LoadedModel (eval mode, no drop path)."""
    from repsim.errors import RecipeError
    from repsim.finetune.snapshots import snapshot_name

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
                snap = run_dir(path) / "snapshots" / snapshot_name("epoch", epoch)
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
            provenance.update(epoch=epoch, snapshots=record["snapshots"],
                              path_length=record["path_length"],
                              path_efficiency=record["path_efficiency"])
    return LoadedModel(vit, preprocess(preset), name=name, num_prefix_tokens=1, family="vit",
                       provenance=provenance)

