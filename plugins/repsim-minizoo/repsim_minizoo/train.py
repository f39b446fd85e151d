"""The pre-training loop shared by every objective: AdamW, warm-up + cosine, deterministic."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from repsim_minizoo import objectives
from repsim_minizoo.config import Preset, Schedule, to_jsonable
from repsim_minizoo.data import Batches, digits
from repsim_minizoo.vit import build_vit

_NO_DECAY = ("pos_embed", "cls_token", "mask_token")
# The time left is estimated from steps 2–12: the first steps are slower (allocations, caches).
_TIMED_FROM, _ESTIMATE_AT = 2, 12
log = logging.getLogger("repsim.minizoo")


# One thread, whatever the machine or $REPSIM_THREADS: float sums depend on the thread count, so
# a fixed count gives the same weights on every machine of one CPU family; and these tiny
# models' kernels are too small to share — on 2 cores a second thread made each step 2–2.5×
# slower (thread pools spinning against each other), on an idle machine no faster than running
# two models side by side (`repsim minizoo train --nproc`, README "Budget").
TRAINING_THREADS = 1


@contextmanager
def deterministic() -> Iterator[None]:
    """One thread and deterministic kernels for the duration of a training run."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAINING_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up to ``base``, then cosine decay to ``minimum``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms and position/class tokens."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 or name.endswith(_NO_DECAY) else weight_decay
        groups.setdefault(wd, []).append(p)
    return [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]


def summarise_losses(losses: list[float]) -> dict[str, Any]:
    """First and final loss (mean of the last 10% of steps) and a ≤50-point curve."""
    tail = max(1, len(losses) // 10)
    stride = max(1, len(losses) // 50)
    return {"loss_first": losses[0], "loss_final": sum(losses[-tail:]) / tail,
            "loss_curve": losses[::stride]}


def pretrain(objective: str, preset: Preset, seed: int,
             progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the shared ViT with one objective; return its state dict and a record (losses,
    timing, config). Same ``seed`` → same initial backbone for every objective."""
    from tqdm.auto import tqdm

    module = objectives.load(objective)
    cfg = module.Config(**preset.objective_overrides.get(objective, {}))
    sched: Schedule = preset.schedules[objective]
    start, cpu_start = time.perf_counter(), time.process_time()
    with deterministic():
        images, labels = digits("train", preset.arch.img_size)
        vit = build_vit(preset.arch, seed, num_classes=None if module.OBJECTIVE.keeps_head else 0)
        torch.manual_seed(seed + 1)  # heads, decoders: after the backbone, same for every seed
        obj = module.OBJECTIVE(vit, cfg)
        obj.train()
        # fused: one kernel per parameter group instead of a dozen per tensor (~5 % of a step)
        opt = torch.optim.AdamW(param_groups(obj, sched.weight_decay), lr=sched.lr,
                                betas=sched.betas, fused=True)
        g = torch.Generator().manual_seed(seed + 2)  # batches, views, masks
        batches = Batches(len(labels), sched.batch_size, g)
        warmup = int(sched.warmup_frac * sched.steps)
        losses: list[float] = []
        bar = tqdm(range(sched.steps), desc=f"minizoo {objective}", disable=not progress,
                   leave=False, mininterval=0.5)
        log.info("training minizoo_%s: %d steps of %d images", objective, sched.steps,
                 sched.batch_size)
        timed_from = 0.0
        for step in bar:
            if step == _TIMED_FROM:
                timed_from = time.perf_counter()
            if step == _ESTIMATE_AT:
                per_step = (time.perf_counter() - timed_from) / (_ESTIMATE_AT - _TIMED_FROM)
                log.info("minizoo_%s: about %.0f s left (%.0f ms a step)", objective,
                         per_step * (sched.steps - step), 1000 * per_step)
            lr = lr_at(step, sched.steps, warmup, sched.lr, sched.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = batches.next()
            loss = obj.loss(images[idx], labels[idx], g, step / sched.steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sched.clip_grad is not None:
                nn.utils.clip_grad_norm_(obj.parameters(), sched.clip_grad)
            opt.step()
            obj.after_step((step + 1) / sched.steps)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"minizoo {objective}: loss became {losses[-1]} at step "
                                         f"{step}; lower the learning rate of this preset.")
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.close()
    record = {"objective": objective, "seed": seed, "steps": sched.steps,
              "train_seconds": round(time.perf_counter() - start, 2),
              "cpu_seconds": round(time.process_time() - cpu_start, 2),
              "threads": TRAINING_THREADS, "schedule": to_jsonable(sched),
              "objective_config": to_jsonable(cfg), "arch": to_jsonable(preset.arch),
              **summarise_losses(losses)}
    log.info("minizoo_%s trained in %.0f s (loss %.3f → %.3f)", objective,
             record["train_seconds"], record["loss_first"], record["loss_final"])
    return vit.state_dict(), record
