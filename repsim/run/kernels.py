"""Per-model minibatch kernels: what lets a run add a model without recomputing the others.

A streaming metric's additive terms for a model pair are inner products of the two models'
per-minibatch embeddings (for the minibatch CKAs: U-centred n×n Gram matrices). The pass stores
each model's embeddings, per layer and minibatch, in its own files; the similarity of every pair
is then computed from those files, after the pass. A model added to a recipe is forwarded alone,
and its pairs with the other models come from their stored kernels; a removed model takes its
files with it. Every run, fresh or reusing, computes the pairs by the same code from the same
stored bytes, so a run that adds a model writes the result files a fresh run of the whole recipe
writes.

Layout: ``cache/SPLIT/kernels/METRIC/MODEL/RANK-FIRST.safetensors``, one file per embedded slice
of minibatches (``FIRST``: the index of its first minibatch among this rank's), holding
``kernels`` ``[layers, minibatches, m]`` float64. For the U-centred kernels (``u_centred``) m is
the strict upper triangle, n(n-1)/2 values: 3,968 bytes per layer and minibatch of 32 (the full
matrix would be 8,192).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.errors import FeatureError
from repsim.run.sinks import MetricSink, Sink, pair_result

if TYPE_CHECKING:
    import torch

    from repsim.metrics.base import StreamingMetric
    from repsim.metrics.results import SimilarityResult

KERNELS = "kernels"
# Minibatches whose pair terms are formed at once after the pass; a constant (not the machine's
# memory or threads), so the sums are added in the same order on every run.
PAIR_CHUNK = 64


def kernel_dir(split_dir: Path, metric_key: str, model: str) -> Path:
    return split_dir / KERNELS / metric_key / model


def _first(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def _compact(e: torch.Tensor, n: int, u_centred: bool) -> torch.Tensor:
    """``[L, B, n²]`` embeddings → what is stored: the strict upper triangle of U-centred ones."""
    import torch

    if not u_centred:
        return e
    iu = torch.triu_indices(n, n, 1, device=e.device)
    return e.reshape(*e.shape[:2], n, n)[:, :, iu[0], iu[1]]


class KernelSink(MetricSink):
    """Embeds the minibatches of several models for one streaming metric and writes each
    model's embeddings to its own files (``kernel_dir``); it sums nothing.

    The models fed together share the cutting into minibatches (the state: minibatch and
    example counters, waiting examples); :class:`ModelShare` is one model's part of that state,
    which that model's stage saves and loads.
    """

    def __init__(self, name: str, metric: StreamingMetric, layers: Mapping[str, Sequence[str]],
                 minibatch: int, dirs: Mapping[str, Path], rank: int = 0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(name, metric, layers, [], minibatch, False, device)
        self.dirs = dict(dirs)
        self.rank = rank
        self._pruned = False

    def _consume(self, feats: Mapping[str, list[torch.Tensor]], n: int,
                 last_batch: int | None = None) -> None:
        import torch

        from repsim.metrics.engine import batch_slices, embed_slice

        first = int(self._states["counts"][0])
        if not self._pruned:
            # Files a killed run wrote after its last saved state are written again from here.
            for d in self.dirs.values():
                for old in d.glob(f"{self.rank:03d}-*.safetensors"):
                    if _first(old) >= first:
                        old.unlink()
            self._pruned = True
        kernels = {}
        for model, ts in feats.items():
            slices = ([(0, n, last_batch)] if last_batch is not None else
                      batch_slices(n, self.minibatch, self.metric.min_batch_size, len(ts)))
            size = slices[0][2]
            parts = [_compact(embed_slice(self.metric, ts, *r), size, self.metric.u_centred)
                     for r in slices]
            kernels[model] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        self._check_finite([torch.linalg.vector_norm(k, dim=-1) for k in kernels.values()],
                           feats, n)
        for model, k in kernels.items():
            store.write_tensors(self.dirs[model] / f"{self.rank:03d}-{first:06d}.safetensors",
                                {"kernels": k.cpu().contiguous()})
        batches = n // self.minibatch if last_batch is None else 1
        self._states["counts"] += torch.tensor([batches, n])

    def share(self, model: str) -> ModelShare:
        return ModelShare(self, model)

    def compute(self) -> tuple[int, int]:
        """(minibatches, examples) embedded: the kernels are read by :func:`pair_results`."""
        return self.counts()


class ModelShare(Sink):
    """One model's part of a :class:`KernelSink`'s state (counters and its waiting examples):
    what that model's stage saves, so it resumes, or is reused, on its own."""

    def __init__(self, parent: KernelSink, model: str) -> None:
        super().__init__(parent.name)
        self.parent, self.model = parent, model

    def update(self, batch: Any) -> None:
        """The parent is fed."""

    def compute(self) -> None:
        """The parent's files are the result."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        prefix = f"pending|{self.model}|"
        return {k: v for k, v in self.parent.state_dict().items()
                if not k.startswith("pending|") or k.startswith(prefix)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith("pending|")}
        Sink.load_state_dict(self.parent, own)
        pending = sorted((k for k in state if k.startswith("pending|")),
                         key=lambda k: int(k.rsplit("|", 1)[1]))
        if pending:
            waiting = self.parent._waiting[0] if self.parent._waiting else {}
            waiting[self.model] = [state[k] for k in pending]
            self.parent._waiting = [waiting]


def _model_batches(directory: Path, world_size: int, what: str) -> list[tuple[Path, int, int]]:
    """(file, index in it, examples) of every stored minibatch of one model, rank after rank,
    each rank's in its order; a gap or an overlap between files is an error."""
    from safetensors import safe_open

    out = []
    for rank in range(world_size):
        expected = 0
        for path in sorted(directory.glob(f"{rank:03d}-*.safetensors"), key=_first):
            if _first(path) != expected:
                raise FeatureError(
                    f"{what}: the stored minibatch kernels of rank {rank} jump from minibatch "
                    f"{expected} to {_first(path)} ({path}). Delete the run directory's cache/ "
                    "and rerun.")
            with safe_open(str(path), framework="pt") as fh:
                shape = fh.get_slice("kernels").get_shape()
            out += [(path, i, shape[2]) for i in range(shape[1])]
            expected += shape[1]
    return out


def _examples(m: int, u_centred: bool) -> int:
    """Examples of a minibatch from the length of its stored embedding."""
    import math

    if u_centred:
        return (1 + math.isqrt(1 + 8 * m)) // 2
    return math.isqrt(m)


def _gather(refs: Sequence[tuple[Path, int, int]], device: torch.device | str
            ) -> list[torch.Tensor]:
    """The stored kernels of consecutive minibatches, ``[L, c, m]`` per run of equal size (only
    the plan's last minibatch may be shorter)."""
    import torch

    loaded: dict[Path, torch.Tensor] = {}
    runs: list[list[torch.Tensor]] = []
    last = None
    for path, i, m in refs:
        if path not in loaded:
            loaded[path] = store.read_tensors(path)["kernels"]
        if m != last:
            runs.append([])
            last = m
        runs[-1].append(loaded[path][:, i])
    return [torch.stack(r, dim=1).to(device) for r in runs]


def pair_results(metric: StreamingMetric, metric_key: str, split_dir: Path,
                 layers: Mapping[str, Sequence[str]], pairs: Sequence[tuple[str, str]],
                 minibatch: int, examples: int, unit: int, world_size: int,
                 keep_batches: bool, device: torch.device | str = "cpu"
                 ) -> dict[tuple[str, str], SimilarityResult]:
    """Every pair's result from the stored kernels of its two models, in the plan's order of
    minibatches (``examples`` drawn, cut into units of ``unit`` over ``world_size`` ranks):
    ``PAIR_CHUNK`` minibatches at a time, every model's files read once."""
    import torch

    from repsim.metrics.base import PairTerms
    from repsim.run.distributed import global_batch_order, plan_counts

    least = metric.min_batch_size
    batches, taken = plan_counts(examples, unit, minibatch, least)
    if not batches:
        raise FeatureError(
            f"no minibatch reached metric '{metric_key}': the data gave {examples} examples, "
            f"fewer than the {least} its estimator needs.")
    order = global_batch_order(examples, unit, minibatch, least, world_size)
    refs = {}
    for model in dict.fromkeys(m for pair in pairs for m in pair):
        what = f"metric '{metric_key}', model '{model}'"
        rank_major = _model_batches(kernel_dir(split_dir, metric_key, model), world_size, what)
        stored = sum(_examples(m, metric.u_centred) for _, _, m in rank_major)
        if (len(rank_major), stored) != (batches, taken):
            raise FeatureError(
                f"{what}: {len(rank_major)} minibatches of {stored} examples are stored; the "
                f"batch plan has {batches} of {taken}. Delete the run directory's cache/ and "
                "rerun.")
        refs[model] = [rank_major[g] for g in order]
    w = 2.0 if metric.u_centred else 1.0  # the triangle holds half of each inner product
    f64 = {"dtype": torch.float64, "device": device}
    cross = {(a, b): torch.zeros(len(layers[a]), len(layers[b]), **f64) for a, b in pairs}
    own = {m: torch.zeros(len(layers[m]), **f64) for m in refs}
    per_cross: dict[tuple[str, str], list[torch.Tensor]] = {p: [] for p in pairs}
    per_own: dict[str, list[torch.Tensor]] = {m: [] for m in refs}
    for c0 in range(0, batches, PAIR_CHUNK):
        chunk = {m: _gather(r[c0 : c0 + PAIR_CHUNK], device) for m, r in refs.items()}
        for m, runs in chunk.items():
            for e in runs:
                sq = torch.linalg.vector_norm(e, dim=-1).square_().mul_(w)  # [L, c]
                own[m] += sq.sum(1)
                if keep_batches:
                    per_own[m].append(sq.T)
        for a, b in pairs:
            for ea, eb in zip(chunk[a], chunk[b]):
                per = torch.bmm(ea.transpose(0, 1), eb.permute(1, 2, 0)).mul_(w)  # [c, La, Lb]
                cross[(a, b)] += per.sum(0)
                if keep_batches:
                    per_cross[(a, b)].append(per)
    out = {}
    for a, b in pairs:
        kept = ([torch.cat(per_cross[(a, b)]).cpu()], [torch.cat(per_own[a]).cpu()],
                [torch.cat(per_own[b]).cpu()]) if keep_batches else ([], [], [])
        terms = PairTerms(cross[(a, b)].cpu(), own[a].cpu(), own[b].cpu(), batches, taken, *kept)
        out[(a, b)] = pair_result(metric, minibatch, layers[a], layers[b], terms,
                                  examples - taken)
    return out
