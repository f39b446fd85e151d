"""The training loop shared by evaluators that train networks (probes; fine-tuning, detectors).

Epochs of steps over batches a callable yields per epoch, with mixed precision, gradient
accumulation, optional clipping, a private seeded RNG and checkpoints at epoch boundaries from
which a run resumes bit-identically (on CPU). Imported only when training runs: it imports torch.

Under torch.distributed the same loop trains a model on data spread over ranks (:class:`Shard`):
:func:`data_parallel` wraps it in DistributedDataParallel with :class:`SyncedBatchNorm`, and
:class:`GlobalBatchSampler` gives every step the minibatch one process would take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from repsim.errors import CheckpointError, DeviceError
from repsim.store import atomic_path

Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                                  "fp16": torch.float16}


# What a checkpoint holds besides the state dicts of the model, optimizer, scaler and schedule.
_OWN_KEYS = ("epoch", "loss", "steps", "generator", "rng")


@dataclass
class History:
    """What a run did: the mean loss of every epoch (resumed ones included)."""

    loss: list[float]
    resumed_at: int = 0  # epochs already done in the checkpoint it started from (0: fresh)
    steps: int = 0  # optimizer steps done (resumed ones included)


def train(model: nn.Module, batches: Callable[[torch.Generator], Iterable[tuple[Any, Any]]],
          loss_fn: Callable[[Any, Any], torch.Tensor], optimizer: torch.optim.Optimizer,
          epochs: int, *, schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
          precision: Precision = "fp32", accumulate: int = 1,
          clip_grad_norm: float | None = None, seed: int = 0,
          checkpoint: str | Path | None = None,
          on_epoch: Callable[[int, float], None] | None = None,
          on_step: Callable[[int], None] | None = None,
          state: Mapping[str, Any] | None = None, save_checkpoint: bool = True) -> History:
    """Train ``model`` for ``epochs`` epochs; returns the loss history. The model is left in
    train mode, on the device it was given on (batches must already be there).

    ``batches(generator)`` is called once per epoch and yields ``(inputs, target)`` pairs; the loss
    is ``loss_fn(model(inputs), target)``. ``generator`` is the loop's seeded CPU
    ``torch.Generator``: draw shuffles from it (it is checkpointed). Global-RNG draws inside the
    loop (dropout) come from generators seeded with ``seed`` too; the caller's RNG is restored.

    ``precision``: autocast of the forward and loss to bf16 or fp16 (fp16 with a gradient scaler;
    CUDA only). ``accumulate``: micro-batches per optimizer step, each loss divided by it; an
    epoch's short last group steps with the mean gradient of the micro-batches it had.
    ``schedule`` steps once per optimizer step: a torch scheduler by ``step()``, a timm one (it has
    ``step_update``) by ``step_update(steps)``, timm's per-update convention. ``on_step(steps)``
    runs after every optimizer step and its schedule step; ``steps`` counts the optimizer steps of
    the whole run, resumed ones included. ``clip_grad_norm``: max total gradient 2-norm.

    ``checkpoint``: after each epoch, model, optimizer, schedule, scaler, RNG states and history
    are written there atomically; an existing checkpoint is loaded and the run continues after its
    last epoch. ``on_epoch(epochs_done, epoch_loss)`` runs before that epoch's checkpoint, so an
    epoch whose callback raised is redone (callback included) on resume. ``state``: further
    objects with ``state_dict()``/``load_state_dict()`` (a path-length accumulator) saved in the
    checkpoint and restored after the model and optimizer. ``save_checkpoint=False`` resumes from
    ``checkpoint`` but never writes it (the ranks of a distributed run but one).
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}; got {precision!r}")
    if accumulate < 1:
        raise ValueError(f"accumulate must be at least 1; got {accumulate}")
    device = next(model.parameters()).device
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("precision 'fp16' (autocast with a gradient scaler) is for GPUs; the "
                          "model is on the CPU: use precision 'bf16' or 'fp32' there.")
    dtype = AUTOCAST_DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(seed)
    stateful: dict[str, Any] = {"model": model, "optimizer": optimizer, "scaler": scaler}
    if schedule is not None:
        stateful["schedule"] = schedule
    for name, part in (state or {}).items():
        if name in stateful or name in _OWN_KEYS:
            raise ValueError(f"state name {name!r} is one the loop's checkpoint uses itself")
        stateful[name] = part
    params = [p for group in optimizer.param_groups for p in group["params"]]
    path = Path(checkpoint) if checkpoint is not None else None
    history = History([])

    def step(micro: int) -> None:
        if micro < accumulate:  # each loss was divided by ``accumulate``: make it their mean
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(accumulate / micro)
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
            nn.utils.clip_grad_norm_(params, clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        history.steps += 1
        if hasattr(schedule, "step_update"):  # timm: the lr of the next update, by its index
            schedule.step_update(history.steps)
        elif schedule is not None:
            schedule.step()
        if on_step is not None:
            on_step(history.steps)

    rngs = _global_generators(device)
    with _restored(rngs):
        for g in rngs:
            g.manual_seed(seed)
        if path is not None and path.exists():
            history = _load(path, stateful, generator, rngs, epochs)
        for epoch in range(len(history.loss), epochs):
            model.train()  # the callback may have evaluated it
            total, count = torch.zeros((), device=device), 0
            for inputs, target in batches(generator):
                if count % accumulate == 0:
                    optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = loss_fn(model(inputs), target)
                # No division by 1: its autograd node costs tiny probes ~5 % of a step.
                scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
                total += loss.detach().float()
                count += 1
                if count % accumulate == 0:
                    step(accumulate)
            if count == 0:
                raise ValueError(f"epoch {epoch + 1} yielded no batches")
            if count % accumulate:
                step(count % accumulate)
            history.loss.append(float(total) / count)
            if on_epoch is not None:
                on_epoch(epoch + 1, history.loss[-1])
            if path is not None and save_checkpoint:
                _save(path, stateful, generator, rngs, history)
    return history


def _global_generators(device: torch.device) -> list[torch.Generator]:
    """The global generators random ops in the loop draw from: the CPU's and the model's GPU's."""
    gens = [torch.random.default_generator]
    if device.type == "cuda":
        gens.append(torch.cuda.default_generators[device.index if device.index is not None
                                                  else torch.cuda.current_device()])
    return gens


@contextmanager
def _restored(gens: list[torch.Generator]) -> Iterator[None]:
    """Give the caller back the generators' states after the block (like ``fork_rng``, but only
    these: ``torch.manual_seed`` would also reseed every GPU, lazily if CUDA is not started)."""
    saved = [g.get_state() for g in gens]
    try:
        yield
    finally:
        for g, state in zip(gens, saved):
            g.set_state(state)


def _save(path: Path, stateful: dict[str, Any], generator: torch.Generator,
          rngs: list[torch.Generator], history: History) -> None:
    state = {name: part.state_dict() for name, part in stateful.items()}
    state.update(epoch=len(history.loss), loss=history.loss, steps=history.steps,
                 generator=generator.get_state(), rng=[g.get_state() for g in rngs])
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: Path, stateful: dict[str, Any], generator: torch.Generator,
          rngs: list[torch.Generator], epochs: int) -> History:
    """Restore everything from a checkpoint; the history of the epochs it holds."""
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, part in stateful.items():
            part.load_state_dict(state[name])
        generator.set_state(state["generator"])
        for g, rng in zip(rngs, state["rng"], strict=True):  # a CPU run's checkpoint has one
            g.set_state(rng)
    except Exception as exc:  # truncated, foreign, or from another model, optimizer or device
        raise CheckpointError(f"cannot resume from training checkpoint {path}: {exc}; delete it "
                              "to start afresh.") from exc
    if state["epoch"] > epochs:
        raise CheckpointError(f"training checkpoint {path} is at epoch {state['epoch']}, past the "
                              f"{epochs} asked for; delete it to start afresh.")
    # Checkpoints written before the step count was saved resume with 0: their schedules were
    # torch ones, which keep their own count.
    return History(list(state["loss"]), resumed_at=state["epoch"], steps=state.get("steps", 0))


@dataclass(frozen=True)
class Shard:
    """This rank's rows of a data set spread over the ranks of ``group``: ``positions[i]`` is the
    global position (among ``n``) of local row i. ``group`` None: one process holding all rows.
    ``sync_group``: a second group for the statistics of :class:`SyncedBatchNorm` (their
    collectives run inside DDP's backward, beside its gradient all-reduces)."""

    positions: torch.Tensor
    n: int
    group: Any = None
    sync_group: Any = None

    @classmethod
    def whole(cls, n: int) -> Shard:
        return cls(torch.arange(n), n)


class GlobalBatchSampler:
    """A seeded distributed sampler without padding: each epoch a permutation of all ``n``
    examples (from the loop's generator, the same on every rank) cut into ``n // batch_size``
    global minibatches, the incomplete last one dropped; a rank yields, per step, the local rows
    of its examples in that minibatch. Every rank takes every step, and the ranks' rows of a step
    are exactly the minibatch one process takes (in one process, the rows themselves)."""

    def __init__(self, shard: Shard, batch_size: int) -> None:
        self.batch_size, self.n = batch_size, shard.n
        self.local = torch.full((shard.n,), -1, dtype=torch.long)  # global position -> row
        self.local[shard.positions.long()] = torch.arange(len(shard.positions))

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __call__(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n, generator=generator)
        for i in range(len(self)):
            rows = self.local[order[i * self.batch_size:(i + 1) * self.batch_size]]
            yield rows[rows >= 0]


class _AllReduce(torch.autograd.Function):
    """A sum over the ranks of a group whose gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation with the statistics of the global batch of all ranks of ``group``
    (two differentiable all-reduces: the sums, then the squared deviations), on any device and
    backend; torch's ``SyncBatchNorm`` takes GPUs only. A rank may hold no row of a batch.
    In eval mode it is the BatchNorm it replaced."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group: Any) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.to(next(iter([*bn.parameters(), *bn.buffers()]), torch.empty(0)).device)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.ndim < 2:
            raise ValueError(f"expected at least 2-d input, got {input.ndim}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        all_reduce = _AllReduce.apply
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        sums = all_reduce(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])]),
                          self.group)
        count = sums[-1]
        mean = sums[:-1] / count
        dev = x - mean.view(shape)
        var = all_reduce((dev * dev).sum(dims), self.group) / count
        out = dev * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1), alpha=m)
        return out


def data_parallel(model: nn.Module, shard: Shard) -> nn.Module:
    """``model`` for training on ``shard``: itself in one process; else its BatchNorms synced
    over ``shard.sync_group`` and the whole in ``DistributedDataParallel`` over ``shard.group``."""
    if shard.group is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    def sync(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, SyncedBatchNorm(child, shard.sync_group))
            else:
                sync(child)

    sync(model)
    # No buffer broadcast before every forward: synced statistics are equal on every rank
    # (torch >= 2.14 names the switch forward_sync_buffers and deprecates broadcast_buffers).
    import inspect

    switch = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel).parameters else "broadcast_buffers"
    return DistributedDataParallel(model, process_group=shard.group, **{switch: False})
