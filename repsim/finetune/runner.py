"""Fine-tuning into a run directory, on :func:`repsim.training.train`.

```
RUN/
  config.toml              the recipe as given (`repsim finetune`)
  resolved.json            what is fine-tuned on what, with every setting: the run's identity
  checkpoint.pt            model, optimizer, schedule, RNG, path lengths: resumed from, per epoch
  snapshots/epoch_000.safetensors ...   θ_0 (before fine-tuning), then every snapshot_every
  path_length.safetensors  step-level path lengths and displacements, per tensor and group
  final.safetensors        the fine-tuned weights
  provenance.json          progress, losses, accuracy, timing, device, versions; snapshot list
```

The timm parts do the work: ``create_optimizer_v2`` (layer decay), ``create_scheduler_v2``
(stepped per update), ``create_transform`` (RandAugment), ``Mixup`` and its soft-target loss.
Under ``torchrun`` the model is wrapped in ``DistributedDataParallel`` and every global batch is
cut into whole micro-batches, rank r taking its share of each: one process accumulating W
micro-batches computes what W processes do (seeds follow the micro-batch, not the process).
Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repsim.data.base import ImageDataset
from repsim.errors import DataError, RecipeError
from repsim.finetune.augment import (AUGMENT, MIX, MODEL, EvalImages, TrainImages, derive,
                                     seed_device, seeded, train_transform)
from repsim.finetune.config import CODE_VERSION, Settings
from repsim.finetune.model import init_head, new_head, set_drop_path
from repsim.finetune.snapshots import PathMeter, snapshot_name, write_snapshot
from repsim.models.base import LoadedModel
from repsim.run.device import DeviceSettings
from repsim.run.distributed import World
from repsim.store import read_json, write_json, write_text

log = logging.getLogger("repsim.finetune")


@dataclass(frozen=True)
class Compute:
    """Where and how a run computes; none of it changes what it computes (beyond rounding)."""

    device: DeviceSettings = field(default_factory=lambda: DeviceSettings(torch.device("cpu")))
    device_batch: int | None = None  # default: the whole per-process batch
    num_workers: int = 0
    world: World = field(default_factory=World)


@dataclass(frozen=True)
class Plan:
    """How the epochs are cut: global batches of micro-batches over processes."""

    examples: list[int]  # indices into the dataset trained on
    batch_size: int
    device_batch: int
    accumulate: int
    steps_per_epoch: int

    @property
    def micro_per_step(self) -> int:
        return self.batch_size // self.device_batch


def plan(settings: Settings, data: ImageDataset, examples: int | None, compute: Compute) -> Plan:
    """The batch plan; a batch that does not divide is an error naming the setting to change."""
    world = compute.world.size
    n = len(data)
    order = list(range(n))
    if examples is not None and examples < n:
        g = torch.Generator().manual_seed(settings.seed)
        order = sorted(torch.randperm(n, generator=g)[:examples].tolist())
    b = settings.batch_size
    if b % world:
        raise RecipeError(f"finetune.batch_size = {b} does not divide among {world} processes; "
                          "make it a multiple of the process count.")
    device_batch = compute.device_batch or b // world
    if (b // world) % device_batch:
        raise RecipeError(f"run.device_batch = {device_batch} does not divide the "
                          f"{b // world} examples per process of finetune.batch_size = {b} "
                          f"({world} processes); choose a divisor.")
    if settings.mixes and device_batch % 2:
        raise RecipeError(f"mixup and cutmix mix a batch with its reverse and need an even "
                          f"batch; run.device_batch = {device_batch} is odd.")
    steps = len(order) // b  # the last incomplete batch is dropped, as MAE's loader does
    if steps == 0:
        raise DataError(f"the training split has {len(order)} examples, fewer than one batch "
                        f"(finetune.batch_size = {b}); lower batch_size.")
    return Plan(order, b, device_batch, b // world // device_batch, steps)


def _classes(data: ImageDataset) -> int:
    return len(data.classes)


def _identity(source: Mapping[str, Any], settings: Settings, data: ImageDataset,
              p: Plan) -> dict[str, Any]:
    return {"source": dict(source), "settings": settings.model_dump(mode="json"),
            "num_classes": _classes(data), "examples": len(p.examples),
            "code_version": CODE_VERSION}


def _check_identity(out: Path, identity: dict[str, Any]) -> None:
    path = out / "resolved.json"
    if not path.is_file():
        return
    old = read_json(path)

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}

    a, b = flat(identity), flat(old)
    diff = [f"{k.rstrip('.')}: {a.get(k)!r} here, {b.get(k)!r} there" for k in sorted(a | b)
            if a.get(k) != b.get(k)]
    if diff:
        raise RecipeError(
            f"run directory '{out}' holds another fine-tuning (" + "; ".join(diff[:5]) +
            (" ..." if len(diff) > 5 else "") + "). Give another finetune.output (or --out), "
            "or delete the directory to start afresh.")


def _loss(settings: Settings) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if settings.mixes:  # mixup's targets carry the label smoothing
        return SoftTargetCrossEntropy()
    if settings.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(settings.label_smoothing)
    return nn.CrossEntropyLoss()


def _mixup(settings: Settings, num_classes: int) -> Any:
    from timm.data import Mixup

    if not settings.mixes:
        return None
    return Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix,
                 prob=settings.mixup_prob, switch_prob=settings.mixup_switch_prob,
                 mode=settings.mixup_mode, label_smoothing=settings.label_smoothing,
                 num_classes=num_classes)


def optimizer_and_schedule(module: nn.Module, settings: Settings, steps_per_epoch: int
                           ) -> tuple[torch.optim.Optimizer, Any]:
    """timm's optimizer with layer-wise lr decay and its scheduler, stepped per update: linear
    warm-up for ``warmup_epochs``, then the schedule over the remaining epochs (MAE's)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    extra = {"betas": settings.betas} if "adam" in settings.optimizer.lower() else {}
    opt = create_optimizer_v2(module, settings.optimizer, lr=settings.learning_rate,
                              weight_decay=settings.weight_decay,
                              layer_decay=settings.layer_decay, **extra)
    schedule, _ = create_scheduler_v2(
        opt, settings.schedule, num_epochs=settings.epochs - settings.warmup_epochs,
        warmup_epochs=settings.warmup_epochs, warmup_lr=settings.warmup_lr,
        min_lr=settings.min_lr, warmup_prefix=True, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    return opt, schedule


def prepare(loaded: LoadedModel, settings: Settings, num_classes: int, name: str) -> nn.Module:
    """The network to train: a new, seeded classifier (unless ``head = 'keep'``) and drop path."""
    module = loaded.module
    if settings.head == "new":
        new_head(module, num_classes, name)
        init_head(module, settings.head_init_std, settings.seed)
    set_drop_path(module, settings.drop_path, name)
    return module


@torch.no_grad()
def accuracy(module: nn.Module, data: ImageDataset, preprocess: Any, compute: Compute) -> float:
    """Top-1 accuracy on ``data`` with the model's own preprocess (on this process alone)."""
    from torch.utils.data import DataLoader

    device = compute.device.device
    module.eval()
    loader = DataLoader(EvalImages(data, preprocess), batch_size=compute.device_batch or 256,
                        num_workers=compute.num_workers, pin_memory=device.type == "cuda")
    correct = 0
    for x, y in loader:
        with compute.device.autocast():
            logits = module(x.to(device, non_blocking=True))
        correct += int((logits.argmax(1).cpu() == y).sum())
    return correct / len(data)


def _snapshot_names(settings: Settings, epochs: int, steps: int, p: Plan) -> list[str]:
    """The snapshots a run has written after ``epochs`` epochs (``steps`` optimiser steps)."""
    k = settings.snapshot_every
    if settings.snapshot_unit == "epoch":
        return [snapshot_name("epoch", e) for e in range(epochs + 1)
                if e % k == 0 or e == settings.epochs]
    total = settings.epochs * p.steps_per_epoch
    return [snapshot_name("step", u) for u in range(steps + 1) if u % k == 0 or u == total]


def _environment() -> dict[str, Any]:
    import importlib.metadata as md
    import platform
    import sys

    from repsim.run.results import _git_commit  # the run's provenance records the same

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    return {"repsim": version("repsim-core"),
            "versions": {d: version(d) for d in ("torch", "torchvision", "timm", "numpy")},
            "python": sys.version.split()[0], "platform": platform.platform(),
            "git_commit": _git_commit()}


def finetune(loaded: LoadedModel, data: ImageDataset, settings: Settings, out: str | Path, *,
             source: Mapping[str, Any], examples: int | None = None,
             eval_data: ImageDataset | None = None, compute: Compute | None = None,
             recipe_text: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``loaded`` on ``data`` into run directory ``out``; returns its provenance.

    ``source`` says what the model and data are (``{"model": {"model": NAME, "params": {...}},
    "data": {...}}``): with the settings, the run's identity, and how the ``finetuned`` entry
    rebuilds the network. A directory with the same identity is resumed from its last epoch
    (bit-identically on the CPU) or, if complete, left as it is; one with another is refused.
    ``examples``: a seeded subset of ``data``. ``eval_data``: top-1 accuracy after each epoch.
    ``recipe_text``: the recipe as given, kept as ``config.toml``. Every process of a
    distributed run calls this (``compute.world``); rank 0 writes.
    """
    compute = compute or Compute()
    out = Path(out)
    p = plan(settings, data, examples, compute)
    identity = _identity(source, settings, data, p)
    _check_identity(out, identity)
    previous = read_json(out / "provenance.json") if (out / "provenance.json").is_file() else {}
    if previous.get("status") == "complete" and (out / "final.safetensors").is_file():
        log.info("fine-tuning run %s is complete; nothing to do", out)
        return previous
    run = _Run(loaded, data, settings, out, p, str(source["model"]["model"]), eval_data,
               compute, previous)
    if compute.world.is_main:
        write_json(out / "resolved.json", identity)
        if recipe_text is not None:
            write_text(out / "config.toml", recipe_text)
    return run.execute(progress)


class _Run:
    """One fine-tuning run: the batches it feeds :func:`repsim.training.train` and what it
    writes after each step and epoch."""

    def __init__(self, loaded: LoadedModel, data: ImageDataset, settings: Settings, out: Path,
                 p: Plan, name: str, eval_data: ImageDataset | None, compute: Compute,
                 previous: dict[str, Any]) -> None:
        self.loaded, self.settings, self.out, self.p, self.name = loaded, settings, out, p, name
        self.eval_data, self.compute, self.world = eval_data, compute, compute.world
        self.device = compute.device.device
        self.module = prepare(loaded, settings, _classes(data), name).to(self.device)
        self.images = TrainImages(data, train_transform(settings, loaded.preprocess, name),
                                  loaded.preprocess.channels)
        self.mixup = _mixup(settings, _classes(data))
        self.start = out / "snapshots" / snapshot_name(settings.snapshot_unit, 0)
        self.meter = PathMeter(self.module) if self.world.is_main else None
        self.total_steps = settings.epochs * p.steps_per_epoch
        # Per epoch, kept across resumes (an epoch redone after a kill replaces its entry).
        self.losses: list[float] = list(previous.get("loss", []))
        self.accuracies: list[float | None] = list(previous.get("eval_accuracy", []))
        self.seconds: list[float] = list(previous.get("epoch_seconds", []))
        self.epoch_start = time.perf_counter()
        self.bar: Any = None

    def execute(self, progress: bool) -> dict[str, Any]:
        from repsim.training import train

        s, out = self.settings, self.out
        model: nn.Module = self.module
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(self.module, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
        checkpoint = out / "checkpoint.pt"
        if self.world.is_main and not checkpoint.exists():
            write_snapshot(self.start, self.module, epoch=0, step=0)
        if progress and self.world.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, desc=f"finetune {self.name}", unit="step",
                            leave=False)
        opt, schedule = optimizer_and_schedule(self.module, s, self.p.steps_per_epoch)
        try:
            train(model, self.batches, _loss(s), opt, s.epochs, schedule=schedule,
                  precision=self.compute.device.precision, accumulate=self.p.accumulate,
                  clip_grad_norm=s.clip_grad, seed=s.seed, checkpoint=checkpoint,
                  on_epoch=self.on_epoch, on_step=self.on_step,
                  state={"path": self.meter} if self.meter is not None else None,
                  save_checkpoint=self.world.is_main)
        finally:
            if self.bar is not None:
                self.bar.close()
        self.module.eval()
        prov: dict[str, Any] = {}
        if self.world.is_main:
            write_snapshot(out / "final.safetensors", self.module, epoch=s.epochs,
                           step=self.total_steps)
            prov = self.record(s.epochs, "complete")  # last: marks the run complete
        if self.world.distributed:
            import torch.distributed as dist

            dist.barrier()  # every rank returns once the files are there
            if not self.world.is_main:
                prov = read_json(out / "provenance.json")
        return prov

    def batches(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of this process's micro-batches, on the device, mixed; the model's
        generators seeded for each (drop path)."""
        from torch.utils.data import DataLoader

        p, world, device = self.p, self.world, self.device
        self.epoch_start = time.perf_counter()  # an epoch's time: its data and steps, no writes
        epoch_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        order = torch.randperm(len(p.examples), generator=torch.Generator().manual_seed(
            epoch_seed)).tolist()
        micro, index = [], []  # this rank's micro-batches and their global indices
        for step in range(p.steps_per_epoch):
            batch = [p.examples[i] for i in order[step * p.batch_size:(step + 1) * p.batch_size]]
            for j in range(p.accumulate):
                c = world.rank * p.accumulate + j
                micro.append([(i, derive(epoch_seed, AUGMENT, i))
                              for i in batch[c * p.device_batch:(c + 1) * p.device_batch]])
                index.append(step * p.micro_per_step + c)
        loader = DataLoader(self.images, batch_sampler=micro,
                            num_workers=self.compute.num_workers, pin_memory=device.type == "cuda")
        for k, (g, (x, y)) in enumerate(zip(index, loader), 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if self.mixup is not None:
                with seeded(derive(epoch_seed, MIX, g)):
                    x, y = self.mixup(x, y)
            seed_device(derive(epoch_seed, MODEL, g), device)
            yield x, y
            if self.bar is not None and k % p.accumulate == 0:
                self.bar.update()

    def on_step(self, steps: int) -> None:
        if self.meter is None:
            return
        self.meter.step()
        s = self.settings
        if s.snapshot_unit == "step" and (steps % s.snapshot_every == 0
                                          or steps == self.total_steps):
            write_snapshot(self.out / "snapshots" / snapshot_name("step", steps), self.module,
                           epoch=(steps - 1) // self.p.steps_per_epoch + 1, step=steps)

    def on_epoch(self, epoch: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.epoch_start
        if self.world.distributed:  # the mean over every process's micro-batches
            import torch.distributed as dist

            t = torch.tensor([loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            loss = float(t) / self.world.size
        if not self.world.is_main:
            return
        acc = None if self.eval_data is None else \
            accuracy(self.module, self.eval_data, self.loaded.preprocess, self.compute)
        del self.losses[epoch - 1:], self.accuracies[epoch - 1:], self.seconds[epoch - 1:]
        self.losses.append(loss)
        self.accuracies.append(acc)
        self.seconds.append(round(elapsed, 3))
        s = self.settings
        if s.snapshot_unit == "epoch" and (epoch % s.snapshot_every == 0 or epoch == s.epochs):
            write_snapshot(self.out / "snapshots" / snapshot_name("epoch", epoch), self.module,
                           epoch=epoch, step=epoch * self.p.steps_per_epoch)
        self.record(epoch, "running")
        log.info("fine-tuning %s: epoch %d/%d, loss %.4f%s, %.2f steps/s", self.name, epoch,
                 s.epochs, loss, "" if acc is None else f", top-1 {acc:.4f}",
                 self.p.steps_per_epoch / max(elapsed, 1e-9))

    def record(self, epochs: int, status: str) -> dict[str, Any]:
        """Write the path lengths and ``provenance.json`` after ``epochs`` epochs."""
        assert self.meter is not None
        lengths = self.meter.write(self.out / "path_length.safetensors", self.start)
        p, s, done = self.p, self.settings, epochs * self.p.steps_per_epoch
        prov = {
            "status": status, "epochs_done": epochs, "epochs": s.epochs, "steps_done": done,
            "steps": self.total_steps, "loss": self.losses, "eval_accuracy": self.accuracies,
            "epoch_seconds": self.seconds,
            "steps_per_second": round(len(self.seconds) * p.steps_per_epoch / sum(self.seconds),
                                      4) if self.seconds else None,
            "snapshots": _snapshot_names(s, epochs, done, p),
            "path_length": "path_length.safetensors",
            "path_efficiency": {g: None if math.isnan(v) else v  # NaN: never moved
                                for g, v in lengths.efficiency().items()},
            "lr": s.learning_rate, "batch_size": p.batch_size, "device_batch": p.device_batch,
            "accumulate": p.accumulate, "world_size": self.world.size,
            "steps_per_epoch": p.steps_per_epoch, "examples": len(p.examples),
            "device": self.compute.device.describe(),
            "model_provenance": self.loaded.provenance, **_environment()}
        write_json(self.out / "provenance.json", prov)
        return prov
