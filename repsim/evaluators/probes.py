"""Linear and non-linear probes on cached features (seeds 003, Appendix B.3–B.4, Table 4).

A probe is BatchNorm without affine parameters (MAE's calibration of feature scales, so layers of
different magnitude can be compared and concatenated), then ``depth`` blocks of
Linear → BatchNorm → ReLU, then a linear classifier. Each grid point (base lr × weight decay ×
epochs × warm-up × seed) is one run; runs are ranked on a held-out part of the train split and the
mean ± std of the eval-split accuracy of the best ``top`` runs is reported.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from repsim.errors import FeatureError
from repsim.evaluators._common import (MISSING, cached_layers, expand_layer, figure, json_float,
                                       resolve_layers, resolve_models, table)
from repsim.evaluators.base import (EvalContext, Evaluator, EvalResult, FeatureNeeds,
                                   first_of_ranks)
from repsim.evaluators.params import LinearProbeParams, MlpProbeParams

if TYPE_CHECKING:
    import torch
    from torch import nn

    from repsim.training import Shard

EVAL_CHUNK = 8192  # rows per forward pass at evaluation
# Below this many multiply-adds per step, intra-op threading costs more than it saves (measured:
# a [64, 8] BatchNorm takes 0.6 ms on 2 threads of a loaded 2-core machine, 0.05 ms on one).
SMALL_STEP = 2**22


@contextmanager
def _threads(work: int) -> Iterator[None]:
    """One intra-op thread for tiny probes; the caller's setting is restored after."""
    import torch

    before = torch.get_num_threads()
    if work < SMALL_STEP and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ProbeResult:
    """Outcome of a probe grid: every run, and the best ``top`` by the selection split."""

    mean: float  # mean eval-split accuracy of the selected runs
    std: float  # their sample standard deviation (ddof = 1; 0 for one run)
    runs: list[dict[str, Any]]  # config, selection accuracy and loss, eval accuracy per run
    best: list[int]  # indices into ``runs``, best first
    protocol: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # the best run's probe (eval mode) if asked for


@dataclass(frozen=True)
class ProbeShard:
    """A probe's data spread over ranks: ``index`` holds the global indices of this rank's train
    rows, ``train_labels`` every train label in global order (the held-out part is drawn from
    them). ``group``: the ranks (DDP and the scores); ``sync_group``: a second group of the same
    ranks for the BatchNorm statistics (see :class:`repsim.training.Shard`)."""

    index: torch.Tensor
    train_labels: torch.Tensor
    group: Any = None
    sync_group: Any = None


def probe_shard(ctx: EvalContext, split: str, train_labels: torch.Tensor,
                sync_group: Any = None) -> ProbeShard | None:
    """This rank's rows of a probe's train ``split`` in a distributed run, None in one process
    (the held-out part is drawn from all ``train_labels``). ``sync_group``: BatchNorm's group of
    the same ranks, a new one if not given (groups end with the run's process group)."""
    if ctx.group is None:
        return None
    if sync_group is None:
        import torch.distributed as dist

        sync_group = dist.new_group(backend="gloo")
    return ProbeShard(ctx.local_index(split), train_labels, ctx.group, sync_group)


def build_probe(in_dim: int, num_classes: int, depth: int = 0, hidden: int | None = None
                ) -> nn.Sequential:
    """BatchNorm1d(affine=False) → ``depth`` × (Linear → BatchNorm1d → ReLU) → Linear."""
    from torch import nn

    width = hidden or in_dim
    layers: list[nn.Module] = [nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)]
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
    head = nn.Linear(width if depth else in_dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)  # MAE's head initialisation
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, head)


def _optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float, momentum: float
               ) -> torch.optim.Optimizer:
    """SGD or LARS with MAE's split: weights get weight decay (and LARS's trust ratio); biases and
    BatchNorm parameters get neither."""
    import torch

    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    if kind == "lars":
        from timm.optim import Lars

        # always_adapt: MAE's LARS adapts every weight matrix even without weight decay;
        # timm's default would adapt only when weight_decay != 0.
        return Lars([{"params": weights, "weight_decay": weight_decay, "always_adapt": True},
                     {"params": others, "weight_decay": 0.0}], lr=lr, momentum=momentum)
    return torch.optim.SGD([{"params": weights, "weight_decay": weight_decay},
                            {"params": others, "weight_decay": 0.0}], lr=lr, momentum=momentum)


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0, then half-cycle cosine decay to 0 (MAE's per-iteration schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, depth: int = 0,
                hidden: int | None = None, optimizer: Literal["sgd", "lars"] = "sgd",
                base_lr: float = 0.1, weight_decay: float = 0.0, momentum: float = 0.9,
                batch_size: int = 256, epochs: int = 100, warmup_epochs: int = 10,
                seed: int = 0, shard: Shard | None = None) -> nn.Sequential:
    """Train one probe on ``[N, D]`` features; returns it in eval mode.

    The learning rate is ``base_lr × batch_size / 256`` (MAE's rule); the batch is capped at N and
    incomplete last batches are dropped (BatchNorm needs more than one example).

    ``shard``: ``x`` and ``y`` are this rank's rows of a training set spread over ranks. The probe
    trains under DistributedDataParallel with BatchNorm statistics of the global batch, and every
    step's global minibatch is the one a single process takes from the same seed; each rank's loss
    is its examples' sum × W / batch, so DDP's mean over ranks is the single-process gradient (up
    to the order of float sums).
    """
    import torch
    import torch.nn.functional as F

    from repsim.training import GlobalBatchSampler, Shard, data_parallel, train

    shard = shard or Shard.whole(x.shape[0])
    n = shard.n
    if n < 2:
        raise FeatureError(f"a probe needs at least 2 training examples; got {n}.")
    bs = min(batch_size, n)
    sampler = GlobalBatchSampler(shard, bs)
    total, warmup = epochs * len(sampler), warmup_epochs * len(sampler)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = build_probe(x.shape[1], num_classes, depth, hidden).to(x.device)
    net = data_parallel(model, shard)
    opt = _optimizer(model, optimizer, base_lr * bs / 256, weight_decay, momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, warmup, total))
    y = y.to(x.device, torch.long)

    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows in sampler(gen):
            rows = rows.to(x.device)
            yield x[rows], y[rows]

    if shard.group is None:
        loss = F.cross_entropy
    else:
        import torch.distributed as dist

        scale = dist.get_world_size(shard.group) / bs

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, target, reduction="sum") * scale

    dims = [x.shape[1]] + [hidden or x.shape[1]] * depth + [num_classes]
    work = bs * sum(a * b for a, b in zip(dims, dims[1:]))  # multiply-adds of one forward step
    with _threads(work if x.device.type == "cpu" else SMALL_STEP):
        train(net, batches, loss, opt, epochs, schedule=sched, seed=seed)
    return model.eval()


def _score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, group: Any = None
           ) -> tuple[float, float, int]:
    """(accuracy, mean cross-entropy, examples) of a probe in eval mode; with ``group``, over the
    rows of every rank (each example is on one rank: none dropped, none counted twice)."""
    import torch
    import torch.nn.functional as F

    correct, loss = 0, 0.0
    y = y.to(x.device, torch.long)
    with torch.no_grad():
        for i in range(0, x.shape[0], EVAL_CHUNK):
            logits = model(x[i:i + EVAL_CHUNK])
            correct += int((logits.argmax(1) == y[i:i + EVAL_CHUNK]).sum())
            loss += float(F.cross_entropy(logits, y[i:i + EVAL_CHUNK], reduction="sum"))
    count = x.shape[0]
    if group is not None:
        import torch.distributed as dist

        sums = torch.tensor([correct, loss, count], dtype=torch.float64)
        dist.all_reduce(sums, group=group)
        correct, loss, count = int(sums[0]), float(sums[1]), int(sums[2])
    return correct / count, loss / count, count


def probe_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` class scores of a trained probe (eval mode, no gradients, in chunks); ``[0, C]``
    for no rows (a rank that holds none of a split)."""
    import torch

    with torch.no_grad():
        return torch.cat([model(x[i:i + EVAL_CHUNK])
                          for i in range(0, max(x.shape[0], 1), EVAL_CHUNK)])


def holdout_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held out) of a stratified split (sklearn); unstratified if a class has a
    single example."""
    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    labels = y.cpu().numpy()
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    n_hold = max(1, round(fraction * len(labels)))
    if stratify is not None:
        n_hold = max(n_hold, int((counts > 0).sum()))  # one per class at least
    fit, held = train_test_split(np.arange(len(labels)), test_size=n_hold, random_state=seed,
                                 stratify=stratify)
    return torch.as_tensor(np.sort(fit)), torch.as_tensor(np.sort(held))


def probe_grid(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
               test_y: torch.Tensor, *, depth: int = 0, hidden: int | None = None,
               optimizer: Literal["sgd", "lars"] = "sgd",
               base_lrs: tuple[float, ...] = (0.1, 0.01, 0.001),
               weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3), momentum: float = 0.9,
               batch_size: int = 256, epochs: tuple[int, ...] = (100,),
               warmup_epochs: tuple[int, ...] = (10,), seeds: tuple[int, ...] = (0,),
               top: int = 5, selection: Literal["holdout", "eval"] = "holdout",
               holdout: float = 0.1, split_seed: int = 0, num_classes: int | None = None,
               keep_best: bool = False, shard: ProbeShard | None = None,
               on_run: Callable[[], None] | None = None) -> ProbeResult:
    """Train a probe for every grid point; mean ± std of the eval accuracy of the best ``top``.

    ``selection="holdout"`` (default) trains on the train split minus a stratified ``holdout``
    fraction and ranks runs by held-out accuracy (then lower held-out loss); the eval split is
    only reported. ``selection="eval"`` trains on the whole train split and ranks by eval
    accuracy, as the seeds report (an optimistic estimate). ``keep_best``: return the top-ranked
    run's probe as ``model``. ``on_run`` is called after every grid point.

    ``shard``: the train and test tensors are this rank's rows of data spread over ranks (see
    :class:`ProbeShard`; ``num_classes`` required). The held-out part is drawn from all train
    labels, the same on every rank; probes train with the single-process global minibatches
    (:func:`train_probe`) and are scored over every rank's rows. All ranks get the same result.
    """
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise FeatureError(f"probes need [N, D] features of equal width; got train "
                           f"{tuple(train_x.shape)} and test {tuple(test_x.shape)}.")
    import torch

    from repsim.training import Shard

    train_x, test_x = train_x.float(), test_x.float().to(train_x.device)
    if shard is None:
        shard = ProbeShard(torch.arange(train_x.shape[0]), train_y)
    elif num_classes is None:
        raise ValueError("probe_grid over ranks needs num_classes (the same on every rank)")
    all_y, index = shard.train_labels, shard.index.long()
    n_cls = num_classes or int(max(int(train_y.max()), int(test_y.max()))) + 1
    if selection == "holdout":
        fit, held = holdout_split(all_y, holdout, split_seed)
    else:
        fit, held = torch.arange(all_y.shape[0]), None
    # This rank's rows of the fit part, and their positions in it (in one process: train[fit]).
    place = torch.full((all_y.shape[0],), -1, dtype=torch.long)
    place[fit] = torch.arange(fit.shape[0])
    mine = place[index] >= 0
    fit_x, fit_y = train_x[mine.to(train_x.device)], train_y[mine]
    fit_shard = Shard(place[index][mine], fit.shape[0], shard.group, shard.sync_group)
    if held is not None:
        is_held = torch.zeros(all_y.shape[0], dtype=torch.bool)
        is_held[held] = True
        sel_x, sel_y = train_x[is_held[index].to(train_x.device)], train_y[is_held[index]]
    else:
        sel_x, sel_y = test_x, test_y
    runs: list[dict[str, Any]] = []
    models: list[nn.Module] = []
    n_sel = n_eval = 0
    for lr, wd, ep, wu, seed in itertools.product(base_lrs, weight_decays, epochs, warmup_epochs,
                                                  seeds):
        model = train_probe(fit_x, fit_y, n_cls, depth=depth, hidden=hidden, optimizer=optimizer,
                            base_lr=lr, weight_decay=wd, momentum=momentum,
                            batch_size=batch_size, epochs=ep, warmup_epochs=wu, seed=seed,
                            shard=fit_shard)
        sel_acc, sel_loss, n_sel = _score(model, sel_x, sel_y, shard.group)
        sel_loss = sel_loss if math.isfinite(sel_loss) else math.inf  # a diverged run ranks last
        eval_acc, _, n_eval = (sel_acc, sel_loss, n_sel) if selection == "eval" else \
            _score(model, test_x, test_y, shard.group)
        runs.append({"base_lr": lr, "weight_decay": wd, "epochs": ep, "warmup_epochs": wu,
                     "seed": seed, "selection_accuracy": sel_acc, "selection_loss": sel_loss,
                     "eval_accuracy": eval_acc})
        if keep_best:
            models.append(model)
        if on_run is not None:
            on_run()
    order = sorted(range(len(runs)), key=lambda i: (-runs[i]["selection_accuracy"],
                                                    runs[i]["selection_loss"]))
    best = order[:top]
    accs = [runs[i]["eval_accuracy"] for i in best]
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
    protocol = {
        "architecture": f"BatchNorm1d(affine=False) -> {depth} x (Linear -> BatchNorm1d -> ReLU)"
                        " -> Linear",
        "depth": depth, "hidden": hidden or (train_x.shape[1] if depth else None),
        "optimizer": "timm.optim.Lars (MAE split)" if optimizer == "lars" else "SGD",
        "momentum": momentum, "lr_rule": "base_lr * batch_size / 256",
        "schedule": "per-step linear warm-up, then cosine decay to 0",
        "batch_size": min(batch_size, fit_shard.n),
        "grid": {"base_lr": list(base_lrs), "weight_decay": list(weight_decays),
                 "epochs": list(epochs), "warmup_epochs": list(warmup_epochs),
                 "seed": list(seeds)},
        "top": top, "std": "sample (ddof=1) over the selected runs",
        "selection": selection, "n_fit": fit_shard.n, "n_selection": n_sel, "n_eval": n_eval,
        "num_classes": n_cls,
    }
    if selection == "holdout":
        protocol.update(holdout=holdout, split_seed=split_seed,
                        ranking="held-out accuracy, then held-out cross-entropy")
    else:
        protocol.update(ranking="eval accuracy (the seeds' protocol; optimistic)")
    return ProbeResult(mean, std, runs, best, protocol, models[best[0]] if keep_best else None)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, **grid: Any) -> ProbeResult:
    """MAE-protocol linear probe over a grid (keywords of :func:`probe_grid`)."""
    return probe_grid(train_x, train_y, test_x, test_y, depth=0, **grid)


def mlp_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
              test_y: torch.Tensor, depth: int = 2, hidden: int | None = None,
              **grid: Any) -> ProbeResult:
    """Non-linear probe: ``depth`` blocks of Linear → BatchNorm → ReLU before the classifier."""
    return probe_grid(train_x, train_y, test_x, test_y, depth=depth, hidden=hidden, **grid)


class ProbeEvaluator(Evaluator):
    """``linear_probe`` (depth 0) and ``mlp_probe`` (depths 1–3) on one layer or several
    concatenated (seeds 003 Fig. 2a, 2c, 5)."""

    params: LinearProbeParams
    distributed = True  # DDP over the ranks' shares of the cached features

    def __init__(self, params: LinearProbeParams | None = None, name: str | None = None) -> None:
        mlp = isinstance(params, MlpProbeParams)
        super().__init__(params or LinearProbeParams(),
                         name or ("mlp_probe" if mlp else "linear_probe"))
        self.depths: list[int] = list(params.depths) if isinstance(params, MlpProbeParams) else [0]
        p = self.params
        self.needs = FeatureNeeds(
            splits=(p.train_split, p.eval_split),
            reductions=(p.reduction,) if p.reduction else None,
            layers=cached_layers(None if isinstance(p.layers, str) else p.layers, p.group))

    def describe(self) -> str:
        p = self.params
        grid = self._grid_size()
        inputs = f"layers {p.layers}" if not isinstance(p.layers, str) else \
            {"last": "the last layer", "all": "every layer"}[p.layers] + \
            (f" of group '{p.group}'" if p.group else "")
        return (f"probes of depth {', '.join(map(str, self.depths))} on {inputs}: {grid} runs "
                f"each ({p.optimizer}, up to {max(p.epochs)} epochs, batch {p.batch_size}), "
                f"best {p.top} by {p.selection}")

    def _grid_size(self) -> int:
        """Probe runs per input and depth: the points of the hyper-parameter grid."""
        p = self.params
        return math.prod(len(v) for v in (p.base_lrs, p.weight_decays, p.epochs,
                                          p.warmup_epochs, p.seeds))

    def _inputs(self, ctx: EvalContext, model: str) -> list[list[str]]:
        """Each probe's input as the list of layers whose features are concatenated."""
        spec = self.params.layers
        layers = resolve_layers(ctx, model, None, self.name, self.params.group)
        if spec == "last":
            return [layers[-1:]] if layers else []
        if spec == "all":
            return [[layer] for layer in layers]
        out: list[list[str]] = []
        for entry in spec:
            if isinstance(entry, str):
                out.extend([layer] for layer in expand_layer(ctx, model, entry, self.name))
            else:
                out.append([la for e in entry for la in expand_layer(ctx, model, e, self.name)])
        return out

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        p = self.params
        train_y, eval_y = ctx.labels(p.train_split), ctx.labels(p.eval_split)
        n_cls = int(max(int(train_y.max()), int(eval_y.max()))) + 1
        shard = probe_shard(ctx, p.train_split, train_y)
        local_train_y, local_eval_y = (ctx.local_labels(s) for s in (p.train_split,
                                                                       p.eval_split))
        rows: list[list[Any]] = []
        run_rows: list[list[Any]] = []
        notes: list[str] = []
        results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
        # Replaced by probe_grid's fuller record once a probe has run.
        grid_protocol: dict[str, Any] = {
            "optimizer": p.optimizer, "top": p.top, "selection": p.selection,
            "grid": {"base_lr": p.base_lrs, "weight_decay": p.weight_decays, "epochs": p.epochs,
                     "warmup_epochs": p.warmup_epochs, "seed": p.seeds}}
        tensors: dict[str, torch.Tensor] = {}
        labels_of: dict[str, list[str]] = {}  # input labels per model: rows of the tensors
        inputs_of = {model: self._inputs(ctx, model)
                     for model in resolve_models(ctx, p.models, self.name)}
        grid = self._grid_size()
        progress = ctx.progress(sum(map(len, inputs_of.values())) * len(self.depths) * grid,
                                "probe runs")
        for model, inputs in inputs_of.items():
            results[model] = {}
            if not inputs:
                notes.append(f"{model}: skipped, no layer group '{p.group}'")
            labels_of[model] = ["+".join(layers) for layers in inputs]
            stats = torch.full((len(inputs), len(self.depths), 2), float("nan"),
                               dtype=torch.float64)
            tensors[f"accuracy/{model}"] = stats
            for n, layers in enumerate(inputs):
                label = "+".join(layers)
                try:
                    tr = torch.cat([ctx.local_features(model, la, p.train_split, p.reduction)
                                    for la in layers], 1)
                    ev = torch.cat([ctx.local_features(model, la, p.eval_split, p.reduction)
                                    for la in layers], 1)
                    missing = None
                except MISSING as exc:
                    missing = f"{model} {label}: skipped ({exc})"
                missing = first_of_ranks(missing, ctx.group)
                if missing is not None:
                    notes.append(missing)
                    progress.update(len(self.depths) * grid)
                    continue
                results[model][label] = {}
                for d, depth in enumerate(self.depths):
                    res = probe_grid(
                        tr.to(p.device), local_train_y, ev.to(p.device), local_eval_y,
                        depth=depth, hidden=getattr(p, "hidden", None), optimizer=p.optimizer,
                        base_lrs=tuple(p.base_lrs), weight_decays=tuple(p.weight_decays),
                        momentum=p.momentum, batch_size=p.batch_size, epochs=tuple(p.epochs),
                        warmup_epochs=tuple(p.warmup_epochs), seeds=tuple(p.seeds), top=p.top,
                        selection=p.selection, holdout=p.holdout, split_seed=ctx.seed,
                        num_classes=n_cls, shard=shard, on_run=progress.update)
                    if res.protocol["n_eval"] != eval_y.numel():  # every example once
                        raise RuntimeError(f"{self.name}: scored {res.protocol['n_eval']} "
                                           f"examples of the {eval_y.numel()} of split "
                                           f"'{p.eval_split}'")
                    grid_protocol = {k: v for k, v in res.protocol.items()
                                     if k not in ("depth", "hidden", "n_fit", "n_selection",
                                                  "n_eval", "architecture")}
                    stats[n, d, 0], stats[n, d, 1] = res.mean, res.std
                    best = res.runs[res.best[0]]
                    rows.append([model, label, len(layers), int(tr.shape[1]), depth, res.mean,
                                 res.std, len(res.best), best["base_lr"], best["weight_decay"],
                                 best["epochs"], best["warmup_epochs"]])
                    for rank, i in enumerate(res.best):
                        r = res.runs[i]
                        run_rows.append([model, label, depth, rank + 1, r["base_lr"],
                                         r["weight_decay"], r["epochs"], r["warmup_epochs"],
                                         r["seed"], r["selection_accuracy"], r["eval_accuracy"]])
                    results[model][label][depth] = {
                        "mean": json_float(res.mean), "std": json_float(res.std),
                        "runs": [{k: json_float(v) if isinstance(v, float) else v
                                  for k, v in r.items()} for r in res.runs],
                        "best": res.best, "n_fit": res.protocol["n_fit"],
                        "n_selection": res.protocol["n_selection"]}
        protocol = {
            "evaluator": self.name, "protocol": "MAE linear probe (BatchNorm without affine); "
            "seeds 003 Appendix B.3-B.4", "depths": self.depths,
            "probe": "BatchNorm1d(affine=False) -> depth x (Linear -> BatchNorm1d -> ReLU) -> "
                     "Linear", "hidden": getattr(p, "hidden", None) or "input width",
            "reduction": p.reduction or "the run's reduction per model", "group": p.group,
            "train_split": p.train_split, "eval_split": p.eval_split,
            "n_train": int(train_y.numel()), "n_eval": int(eval_y.numel()),
            **grid_protocol,
            "tensor_layout": "accuracy/<model>: [input, depth, (mean, std)]", "notes": notes,
        }
        depths = self.depths

        def plot():
            inputs = list(dict.fromkeys(lab for m in results.values() for lab in m))
            fig, axes = figure(1, width=max(5.0, 0.6 * len(inputs) * len(depths) + 3))
            ax = axes[0]
            series = [(m, d) for m in results for d in depths]
            w = 0.8 / max(len(series), 1)
            for s, (model, depth) in enumerate(series):
                xs, ys, es = [], [], []
                for x, lab in enumerate(inputs):
                    r = results[model].get(lab, {}).get(depth)
                    if r is not None and r["mean"] is not None:
                        xs.append(x + (s - (len(series) - 1) / 2) * w)
                        ys.append(r["mean"])
                        es.append(r["std"] or 0.0)
                name = model if len(depths) == 1 else f"{model}, depth {depth}"
                ax.bar(xs, ys, w, yerr=es, capsize=2, label=name)
            ax.set_xticks(range(len(inputs)))
            ax.set_xticklabels(inputs, rotation=45, ha="right", fontsize=7)
            n_grid = self._grid_size()
            ax.set_ylabel(f"eval accuracy (mean ± std of best {min(p.top, n_grid)})")
            ax.set_title(self.name)
            ax.legend(fontsize=7)
            return fig

        return EvalResult(
            protocol=protocol,
            tables={
                "accuracy": table(["model", "input", "n_layers", "dim", "depth", "mean", "std",
                                   "n_best", "best_base_lr", "best_weight_decay", "best_epochs",
                                   "best_warmup_epochs"], rows),
                "best_runs": table(["model", "input", "depth", "rank", "base_lr", "weight_decay",
                                    "epochs", "warmup_epochs", "seed", "selection_accuracy",
                                    "eval_accuracy"], run_rows),
            },
            tensors=tensors,
            data={"inputs": labels_of,
                  "results": {m: {lab: {str(d): r for d, r in v.items()} for lab, v in ls.items()}
                              for m, ls in results.items()}},
            figures={"accuracy": plot},
        )
