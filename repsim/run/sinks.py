"""Sinks: the stateful consumers of feature batches.

Every sink has the shape of torchmetrics' ``Metric``: states declared with :meth:`Sink.add_state`
and a reduction (``"sum"`` for additive sums, ``"cat"`` for per-batch rows), ``update(batch)``,
``state_dict()`` / ``load_state_dict()`` (what a checkpoint saves and a resume loads),
``merge(other)`` (shards of the same data combine: sums add, rows concatenate) and
``compute()``. Checkpointing is one loop over sinks (:func:`save_states`, :func:`load_states`);
nothing outside a sink reads its internals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from repsim import store
from repsim.errors import FeatureError, RecipeError

if TYPE_CHECKING:
    import torch

    from repsim.evaluators.base import StreamingEvaluator
    from repsim.metrics.base import PairTerms, StreamingMetric
    from repsim.metrics.results import SimilarityResult
    from repsim.run.features import FeatureBatch

Reduce = Literal["sum", "cat"]

# The metric sink embeds waiting examples once they fill this many minibatches or bytes: per
# engine call there are a few tensor operations per layer, which one minibatch of 32 does not
# pay for. Measured on 2 cores (2 models x 12 layers, 1024 x 768-d, minibatch 32): 5.3x the Gram
# floor embedding each minibatch alone, 3.5x waiting for 4, 4.3x for 16 (the copies leave the
# cache); the bytes bound keeps flattened tokens in memory bounds.
FLUSH_MINIBATCHES = 4
FLUSH_BYTES = 16 << 20


class Sink(ABC):
    """A stateful consumer of :class:`~repsim.run.features.FeatureBatch` es."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._states: dict[str, torch.Tensor] = {}
        self._reduce: dict[str, Reduce] = {}

    def add_state(self, key: str, default: torch.Tensor, dist_reduce_fx: Reduce = "sum") -> None:
        """Declare a state tensor and how shards combine it."""
        self._states[key] = default
        self._reduce[key] = dist_reduce_fx

    @abstractmethod
    def update(self, batch: FeatureBatch) -> None: ...

    @abstractmethod
    def compute(self) -> Any: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._states)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = set(state) - set(self._states)
        if unknown:
            raise ValueError(f"sink '{self.name}': unknown state {sorted(unknown)}")
        for key, value in state.items():
            old = self._states[key]
            self._states[key] = value.to(old.device, old.dtype)

    def merge(self, other: Sink) -> None:
        """Combine the state of a sink fed another shard of the same data."""
        self.merge_state(other.state_dict())

    def merge_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Combine the state (``state_dict()``) of a sink fed another shard: sums add, rows
        concatenate after this sink's."""
        import torch

        if set(state) != set(self._states):
            raise ValueError(f"sink '{self.name}': cannot merge sinks of different states")
        for key, how in self._reduce.items():
            theirs = state[key].to(self._states[key].device)
            self._states[key] = (self._states[key] + theirs if how == "sum"
                                 else torch.cat([self._states[key], theirs]))

    def reorder_batches(self, order: Sequence[int]) -> None:
        """Put the rows of the ``"cat"`` states in ``order`` (merged shards in the data's order)."""
        import torch

        for key, how in self._reduce.items():
            if how == "cat":
                t = self._states[key]
                if len(order) != t.shape[0]:
                    raise ValueError(f"sink '{self.name}': {len(order)} positions for "
                                     f"{t.shape[0]} rows of '{key}'")
                self._states[key] = t[torch.as_tensor(order, dtype=torch.long, device=t.device)]


class MetricSink(Sink):
    """One streaming metric over every requested pair of several models.

    The examples of forward batches are cut into the estimator's minibatches of ``minibatch``
    examples, in order, whatever the forward batch size, so the result equals the sequential
    minibatch estimate over the same ordered examples. Waiting examples are embedded in slices of
    many minibatches: each model's layers once, then every layer pair of each model pair from one
    GEMM; the states are float64 ``[La, Lb]`` sums on the engine's device.
    """

    def __init__(self, name: str, metric: StreamingMetric, layers: Mapping[str, Sequence[str]],
                 pairs: Sequence[tuple[str, str]], minibatch: int, keep_batches: bool = False,
                 device: torch.device | str = "cpu") -> None:
        import torch

        from repsim.metrics.engine import check_batch_size

        super().__init__(name)
        if not metric.properties.streaming:
            raise TypeError(f"metric '{metric.name}' needs all examples at once; a MetricSink "
                            "takes streaming metrics only")
        check_batch_size(metric, minibatch, minibatch)
        self.metric = metric
        self.layers = {m: list(v) for m, v in layers.items()}
        self.pairs = list(pairs)
        self.minibatch = minibatch
        self.keep_batches = keep_batches
        self.device = device
        f64 = {"dtype": torch.float64, "device": device}
        for a, b in self.pairs:
            la, lb = len(self.layers[a]), len(self.layers[b])
            self.add_state(f"{a}|{b}|cross", torch.zeros(la, lb, **f64))
            self.add_state(f"{a}|{b}|self_rows", torch.zeros(la, **f64))
            self.add_state(f"{a}|{b}|self_cols", torch.zeros(lb, **f64))
            if keep_batches:
                self.add_state(f"{a}|{b}|batch_cross", torch.zeros(0, la, lb, **f64), "cat")
                self.add_state(f"{a}|{b}|batch_self_rows", torch.zeros(0, la, **f64), "cat")
                self.add_state(f"{a}|{b}|batch_self_cols", torch.zeros(0, lb, **f64), "cat")
        self.add_state("counts", torch.zeros(2, dtype=torch.int64))  # minibatches, examples
        self.add_state("dropped", torch.zeros(1, dtype=torch.int64))  # of a short last batch
        # Waiting examples: one model -> layers mapping per forward batch, concatenated once.
        self._waiting: list[dict[str, list[torch.Tensor]]] = []

    # -- state

    def state_dict(self) -> dict[str, torch.Tensor]:
        pending = {f"pending|{m}|{i}": t for m, ts in self._pending().items()
                   for i, t in enumerate(ts)}
        return super().state_dict() | pending

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith("pending|")}
        super().load_state_dict(own)
        waiting: dict[str, list[torch.Tensor]] = {}
        for key in sorted((k for k in state if k.startswith("pending|")),
                          key=lambda k: int(k.rsplit("|", 1)[1])):
            waiting.setdefault(key.split("|")[1], []).append(state[key])
        self._waiting = [waiting] if waiting else []

    def merge(self, other: Sink) -> None:
        """Add another shard's sums; at most one of the two may hold a partial minibatch (the
        last one of the data), which the merged sink keeps."""
        assert isinstance(other, MetricSink)
        other._flush()
        self.merge_state(other.state_dict())

    def merge_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self._flush()
        theirs = {k: v for k, v in state.items() if not k.startswith("pending|")}
        waiting = len(theirs) < len(state)
        if self._waiting and waiting:
            raise ValueError(f"sink '{self.name}': both shards hold a partial minibatch; shards "
                             "must be cut at minibatch boundaries")
        super().merge_state(theirs)
        if waiting:
            twin = self.empty_like()
            twin.load_state_dict(state)
            self._waiting = twin._waiting

    def empty_like(self) -> MetricSink:
        """A sink of the same metric, layers and pairs with nothing in it."""
        return MetricSink(self.name, self.metric, self.layers, self.pairs, self.minibatch,
                          self.keep_batches, self.device)

    def counts(self) -> tuple[int, int]:
        """(minibatches, examples) added to the sums so far."""
        batches, examples = (int(v) for v in self._states["counts"].tolist())
        return batches, examples

    def close(self) -> None:
        """The data ended: add every waiting example (full minibatches, then a last short one if
        the estimator takes that many, else they are counted as left out)."""
        self._flush()
        rest = self.pending_examples
        if rest >= self.metric.min_batch_size:
            self._consume(self._pending(), rest, last_batch=rest)
        elif rest:
            self._states["dropped"] += rest
        self._waiting = []

    @property
    def pending_examples(self) -> int:
        return sum(int(next(iter(w.values()))[0].shape[0]) for w in self._waiting)

    def _pending(self) -> dict[str, list[torch.Tensor]]:
        """The waiting examples, model -> one tensor per layer (concatenated once, here)."""
        import torch

        if len(self._waiting) > 1:
            self._waiting = [{m: [torch.cat([w[m][i] for w in self._waiting])
                                  for i in range(len(self.layers[m]))] for m in self.layers}]
        return self._waiting[0] if self._waiting else {}

    # -- feeding

    def update(self, batch: FeatureBatch) -> None:
        self.update_features(batch.features)

    def update_features(self, feats: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Add one forward batch: ``feats[model][layer]`` is ``[n, ...]``, same n everywhere.

        Examples wait until they fill :data:`FLUSH_MINIBATCHES` minibatches (or
        :data:`FLUSH_BYTES`): the engine then embeds them in one slice, so its per-call work is
        shared by many minibatches whatever the forward batch.
        """
        import torch

        from repsim.metrics.engine import as_matrix

        incoming: dict[str, list[torch.Tensor]] = {}
        n = None
        for model, names in self.layers.items():
            incoming[model] = []
            for layer in names:
                t = as_matrix(feats[model][layer])
                if n is None:
                    n = t.shape[0]
                elif t.shape[0] != n:
                    raise FeatureError(
                        f"metric '{self.metric.name}': model '{model}', layer '{layer}' gave "
                        f"{t.shape[0]} examples in a batch of {n}; every layer must see the same "
                        "examples.")
                incoming[model].append(t)
        if not n:
            return
        if not self._waiting and n >= FLUSH_MINIBATCHES * self.minibatch:
            # A large forward batch (a GPU's): its full minibatches go straight to the engine.
            full = n // self.minibatch * self.minibatch
            self._consume({m: [t[:full] for t in ts] for m, ts in incoming.items()}, full)
            if full < n:
                self._waiting = [{m: [t[full:].clone() for t in ts]
                                  for m, ts in incoming.items()}]
            return
        # Own copies: a view (a CLS token, flattened tokens) would keep the raw outputs alive.
        self._waiting.append({m: [t.clone(memory_format=torch.contiguous_format) for t in ts]
                              for m, ts in incoming.items()})
        size = sum(t.numel() * t.element_size() for w in self._waiting for ts in w.values()
                   for t in ts)
        if self.pending_examples >= FLUSH_MINIBATCHES * self.minibatch or size >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Add the full minibatches of the waiting examples to the sums; keep the rest."""
        n = self.pending_examples
        full = n // self.minibatch * self.minibatch
        if not full:
            return
        feats = self._pending()
        self._waiting = [{m: [t[full:].clone() for t in ts] for m, ts in feats.items()}] \
            if full < n else []
        self._consume({m: [t[:full] for t in ts] for m, ts in feats.items()}, full)

    def _consume(self, feats: Mapping[str, list[torch.Tensor]], n: int,
                 last_batch: int | None = None) -> None:
        """Add ``n`` examples cut into minibatches (the last one of ``last_batch``)."""
        self._add(self._terms(feats, n, last_batch))

    def _terms(self, feats: Mapping[str, list[torch.Tensor]], n: int,
               last_batch: int | None = None) -> dict[tuple[str, str], PairTerms]:
        """Terms of ``n`` examples cut into minibatches (the last one of ``last_batch``)."""
        from repsim.metrics.engine import batch_slices, embed_slice, terms_from_groups

        slices = ([(0, n, last_batch)] if last_batch is not None else
                  batch_slices(n, self.minibatch, self.metric.min_batch_size,
                               max(len(ts) for ts in feats.values())))
        out: dict[tuple[str, str], PairTerms] = {}
        for start, stop, size in slices:
            embedded = {m: embed_slice(self.metric, ts, start, stop, size)
                        for m, ts in feats.items()}
            for a, b in self.pairs:
                part = terms_from_groups([embedded[a]], [embedded[b]], self.keep_batches)
                part.n_examples = stop - start
                out[(a, b)] = part if (a, b) not in out else out[(a, b)] + part
        self._check_finite([t for pt in out.values() for t in (pt.self_rows, pt.self_cols)],
                           feats, n)
        return out

    def _check_finite(self, sums: Sequence[torch.Tensor],
                      feats: Mapping[str, list[torch.Tensor]], n: int) -> None:
        """NaN/Inf features reach every sum of their layer: one check of the small ``sums``
        instead of one per layer and batch (each a device sync), then the layer is found and
        named."""
        import torch

        from repsim.metrics.engine import check_features

        if bool(torch.isfinite(torch.cat([s.flatten() for s in sums])).all()):
            return
        for model, ts in feats.items():
            for layer, t in zip(self.layers[model], ts):
                what = f"model '{model}', layer '{layer}'"
                check_features(t[:n], what, self.metric.name)
        raise FeatureError(
            f"metric '{self.metric.name}': the features of a layer overflow float32 in the Gram "
            "matrix (values above ~1e19). Rescale the features before comparing them.")

    def _add(self, terms: Mapping[tuple[str, str], PairTerms]) -> None:
        import torch

        s = self._states
        for (a, b), t in terms.items():
            p = f"{a}|{b}|"
            s[p + "cross"] += t.cross
            s[p + "self_rows"] += t.self_rows
            s[p + "self_cols"] += t.self_cols
            if self.keep_batches:
                for key, rows in (("batch_cross", t.batch_cross),
                                  ("batch_self_rows", t.batch_self_rows),
                                  ("batch_self_cols", t.batch_self_cols)):
                    s[p + key] = torch.cat([s[p + key], *rows])
        first = next(iter(terms.values()))
        s["counts"] += torch.tensor([first.n_batches, first.n_examples])

    # -- result

    def _final_terms(self) -> tuple[dict[tuple[str, str], PairTerms], int, int, int]:
        """Every pair's terms with the waiting examples added (their full minibatches, then a
        last, short one if the estimator takes that many), without changing the state:
        (terms, minibatches, examples, examples left out)."""
        from repsim.metrics.base import PairTerms

        s = self._states
        batches, examples = (int(v) for v in s["counts"].tolist())
        terms = {}
        for a, b in self.pairs:
            p = f"{a}|{b}|"
            keep = self.keep_batches
            terms[(a, b)] = PairTerms(
                s[p + "cross"].clone(), s[p + "self_rows"].clone(), s[p + "self_cols"].clone(),
                batches, examples, [s[p + "batch_cross"]] if keep else [],
                [s[p + "batch_self_rows"]] if keep else [],
                [s[p + "batch_self_cols"]] if keep else [])
        waiting = self.pending_examples
        full = waiting // self.minibatch * self.minibatch
        rest = waiting - full
        if full:
            part = self._terms({m: [t[:full] for t in ts] for m, ts in self._pending().items()},
                               full)
            terms = {k: terms[k] + part[k] for k in terms}
            batches, examples = batches + full // self.minibatch, examples + full
        if rest >= self.metric.min_batch_size:
            last = self._terms({m: [t[full:] for t in ts] for m, ts in self._pending().items()},
                               rest, last_batch=rest)
            terms = {k: terms[k] + last[k] for k in terms}
            batches, examples = batches + 1, examples + rest
        dropped = int(s["dropped"]) + (rest if rest < self.metric.min_batch_size else 0)
        return terms, batches, examples, dropped

    def compute(self) -> dict[tuple[str, str], SimilarityResult]:
        """The result of every pair (float64 on the host)."""
        terms, batches, examples, dropped = self._final_terms()
        if not batches:
            raise FeatureError(
                f"no minibatch reached metric '{self.metric.name}': the data gave "
                f"{self.pending_examples} examples, fewer than the "
                f"{self.metric.min_batch_size} its estimator needs.")
        return {(a, b): pair_result(self.metric, self.minibatch, self.layers[a], self.layers[b],
                                    _to_host(t), dropped)
                for (a, b), t in terms.items()}


def pair_result(metric: StreamingMetric, minibatch: int, rows: Sequence[str],
                cols: Sequence[str], terms: PairTerms, dropped: int) -> SimilarityResult:
    """The result of one model pair from its summed terms (on the host), with notes on a left-out
    short last minibatch and on undefined values."""
    from repsim.metrics.engine import undefined_notes
    from repsim.metrics.results import SimilarityResult

    values = metric.finalize(terms)
    desc = metric.describe() | {"batch_size": minibatch, "batches": terms.n_batches,
                                "examples": terms.n_examples}
    notes = [f"{dropped} examples of a last short minibatch were left out: the estimator needs "
             f"at least {metric.min_batch_size} per minibatch."] if dropped else []
    notes += undefined_notes(values, rows, cols, terms)
    return SimilarityResult(values, list(rows), list(cols), metric.name, desc, notes, terms)


def _to_host(t: PairTerms) -> PairTerms:
    from repsim.metrics.base import PairTerms

    def cpu(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.cpu() for x in xs]

    return PairTerms(t.cross.cpu(), t.self_rows.cpu(), t.self_cols.cpu(), t.n_batches,
                     t.n_examples, cpu(t.batch_cross), cpu(t.batch_self_rows),
                     cpu(t.batch_self_cols))


class ObserverSink(Sink):
    """A streaming evaluator watching raw outputs of chosen layers during one split's pass."""

    def __init__(self, name: str, evaluator: StreamingEvaluator,
                 layers: Mapping[str, Sequence[str]]) -> None:
        super().__init__(name)
        self.evaluator = evaluator
        self.layers = {m: list(v) for m, v in layers.items()}

    def update(self, batch: FeatureBatch) -> None:
        for model, layers in self.layers.items():
            for layer in layers:
                self.evaluator.observe(batch.split, model, layer, batch.raw[model][layer],
                                       batch.labels, batch.info[model])

    def _own(self, key: str) -> bool:
        # An evaluator's state keys start with 'MODEL|' (each model's stage saves its own share
        # and is reused alone); a sink of every model of the evaluator owns all of them.
        return key.split("|", 1)[0] in self.layers

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.evaluator.state().items() if self._own(k)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace this sink's models' share of the evaluator's state; other models' is kept."""
        others = {k: v for k, v in self.evaluator.state().items() if not self._own(k)}
        self.evaluator.load_state(others | dict(state))

    def merge_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Observer state is additive: the sums of both shards (a layer one shard never saw
        counts as zero there)."""
        mine = self.state_dict()
        self.load_state_dict({k: mine[k] + state[k] if k in mine and k in state
                              else mine.get(k, state.get(k))  # type: ignore[misc]
                              for k in sorted({*mine, *state})})

    def compute(self) -> None:
        """The evaluator itself reports, after the pass."""


# ---------------------------------------------------------------- checkpoints


def save_states(state_dir: Path, sinks: Sequence[Sink], batches: int, done: bool,
                world_size: int = 1, fingerprint: str | None = None,
                stages: Mapping[Path, tuple[Sequence[Sink], str]] | None = None) -> None:
    """Save every sink's state, then the progress record last (a resume trusts only what the
    progress record says was saved, for the pass of that ``fingerprint``). ``stages``: other
    state folders saved first the same way, each with its sinks and fingerprint (one
    checkpoint of a pass whose models are stages of their own)."""
    for folder, (own, fp) in (stages or {}).items():
        save_states(folder, own, batches, done, world_size, fp)
    for sink in sinks:
        state = sink.state_dict()
        if state:
            store.write_tensors(state_dir / f"sink_{sink.name}.safetensors", state)
    store.write_json(state_dir / "progress.json", {"batches": batches, "done": done,
                                                    "world_size": world_size,
                                                    "fingerprint": fingerprint})


def saved_fingerprint(state_dir: Path) -> str | None:
    """The fingerprint of the pass whose state is saved in ``state_dir`` (None if none is)."""
    progress_file = state_dir / "progress.json"
    return store.read_json(progress_file).get("fingerprint") if progress_file.exists() else None


def load_states(state_dir: Path, sinks: Sequence[Sink], world_size: int = 1) -> int:
    """Load what :func:`save_states` saved; returns the batches already seen (0 if none). A
    state saved by a run of another number of processes is refused (its shares differ)."""
    progress_file = state_dir / "progress.json"
    if not progress_file.exists():
        return 0
    progress = store.read_json(progress_file)
    if progress.get("world_size", 1) != world_size:
        raise RecipeError(
            f"'{state_dir.parent.parent.parent}' holds a run started with "
            f"{progress.get('world_size', 1)} processes; resume it with as many (--nproc), or "
            "start again in another directory.")
    for sink in sinks:
        path = state_dir / f"sink_{sink.name}.safetensors"
        if path.exists():
            sink.load_state_dict(store.read_tensors(path))
    return int(progress["batches"])


def saved_batches(state_dir: Path) -> int:
    """The batches a saved state has seen (0 if none is saved)."""
    progress_file = state_dir / "progress.json"
    return int(store.read_json(progress_file)["batches"]) if progress_file.exists() else 0


def pass_done(state_dir: Path) -> bool:
    progress_file = state_dir / "progress.json"
    return progress_file.exists() and bool(store.read_json(progress_file).get("done"))
