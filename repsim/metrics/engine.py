"""The all-pairs similarity engine.

For a streaming metric, each layer's features are cut into consecutive minibatches and embedded
once per batch (``[B, m]``); the additive terms of *every* layer pair then come from one GEMM of
the stacked embeddings, ``[La, B·m] @ [B·m, Lb]``, per cache-sized slice of batches. No Python
loop over layer pairs, no per-batch ``.item()``, float64 sums that shards can add.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from repsim.errors import FeatureError
from repsim.metrics.base import Metric, PairTerms, StreamingMetric
from repsim.metrics.results import SimilarityResult

if TYPE_CHECKING:
    import torch


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """Flatten past dim 0 (a 1-d tensor is one feature) and make integer features float."""
    import torch

    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(x.shape[0], -1)
    return x if torch.is_floating_point(x) else x.float()


def check_features(x: torch.Tensor, what: str, metric: str | None = None) -> torch.Tensor:
    """Flatten past dim 0 and refuse NaN/Inf, naming the layer (and the metric, if given)."""
    import torch

    x = as_matrix(x)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        where = f"metric '{metric}', {what}" if metric else what
        raise FeatureError(
            f"{where}: features contain NaN or Inf in {bad} of {x.shape[0]} examples. Check the "
            "model's weights and input normalisation, or select another layer."
        )
    return x


def check_same_n(named: Mapping[str, torch.Tensor], metric: str | None = None) -> int:
    """The common number of examples of named layers; a FeatureError listing them otherwise."""
    sizes = {name: int(t.shape[0]) for name, t in named.items()}
    where = f"metric '{metric}': " if metric else ""
    if not sizes:
        raise FeatureError(f"{where}no layers given: pass at least one.")
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise FeatureError(
            f"{where}layers have different numbers of examples ({listing}). Every layer must hold "
            "the same examples in the same order; extract them from one pass over the same data."
        )
    return next(iter(sizes.values()))


def check_batch_size(metric: Metric, batch_size: int, n: int) -> None:
    need = getattr(metric, "min_batch_size", 1)
    if batch_size < need:
        raise FeatureError(
            f"batch size {batch_size} is too small for metric '{metric.name}': its estimator needs "
            f"at least {need} examples per minibatch (HSIC_1 divides by n(n-3)). Use batch_size >= "
            f"{need}; the seeds use 32."
        )
    if n < need:
        raise FeatureError(
            f"{n} examples are too few for metric '{metric.name}', which needs at least {need}."
        )


# Batches are embedded and multiplied in slices whose embeddings (all layers) take about this
# many bytes per thread, so the GEMM reads them from cache instead of DRAM, and memory stays
# bounded whatever N; at least _SLICE_MIN_BATCHES per slice, so that per-call overheads
# (a few tensor operations per layer and slice) stay small. Sized for the CKAs' n² float64
# entries per batch and layer. Measured on 2 cores: at 36 layers × 4096 examples × 768-d, 1.37x
# the Gram floor when every batch is embedded first, 1.2-1.3x in slices.
_SLICE_BYTES_PER_THREAD = 2 << 20
_SLICE_MIN_BATCHES = 16


def batch_slices(n: int, batch_size: int, min_batch: int, layers: int | None = None
                 ) -> list[tuple[int, int, int]]:
    """``(start, stop, batch)`` example ranges cut into consecutive minibatches of ``batch``:
    runs of full batches (sized for ``layers`` layers' embeddings; all in one run if None), then
    the last partial batch if it has at least ``min_batch`` examples."""
    import torch

    full = n // batch_size
    step = full
    if layers is not None:
        budget = _SLICE_BYTES_PER_THREAD * torch.get_num_threads()
        step = max(_SLICE_MIN_BATCHES, budget // max(1, layers * batch_size**2 * 8))
    out = [(s * batch_size, min(s + step, full) * batch_size, batch_size)
           for s in range(0, full, max(1, step))]
    rest = n - full * batch_size
    if rest >= min_batch:
        out.append((full * batch_size, n, rest))
    return out


def embed_slice(metric: StreamingMetric, xs: Sequence[torch.Tensor], start: int, stop: int,
                batch: int) -> torch.Tensor:
    """Embeddings ``[L, B, m]`` of examples ``start:stop`` of several layers, cut into ``B``
    consecutive minibatches of ``batch``."""
    return metric.embed_many([x[start:stop].reshape((stop - start) // batch, batch, -1)
                              for x in xs])


def embed_groups(metric: StreamingMetric, xs: Sequence[torch.Tensor],
                 batch_size: int) -> list[torch.Tensor]:
    """Embeddings of several layers' consecutive minibatches, ``[L, B, m]`` per group: the full
    batches, then the last partial batch (if it has at least ``min_batch_size`` examples)."""
    n = xs[0].shape[0]
    return [embed_slice(metric, xs, *r)
            for r in batch_slices(n, batch_size, metric.min_batch_size)]


def dropped_examples(metric: StreamingMetric, n: int, batch_size: int) -> int:
    rest = n % batch_size
    return rest if rest < metric.min_batch_size else 0


def _squared_norms(e: torch.Tensor) -> torch.Tensor:
    """``[L, B, m]`` → per-batch squared norms ``[L, B]`` without an ``e*e`` temporary."""
    import torch

    return torch.linalg.vector_norm(e, dim=-1).square()


def terms_from_groups(ga: Sequence[torch.Tensor], gb: Sequence[torch.Tensor],
                      keep_batches: bool = False) -> PairTerms:
    """Pair terms from stacked embeddings, ``ga[group]`` ``[La, B, m]`` and ``gb[group]``
    ``[Lb, B, m]``: one GEMM per group gives every layer pair."""
    import torch

    total: PairTerms | None = None
    for a, b in zip(ga, gb):
        nb = a.shape[1]
        sa, sb = _squared_norms(a), _squared_norms(b)  # [La, B], [Lb, B]
        if keep_batches:
            per = torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0))  # [B, La, Lb]
            part = PairTerms(per.sum(0), sa.sum(1), sb.sum(1), nb, 0, [per], [sa.T], [sb.T])
        else:
            cross = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
            part = PairTerms(cross, sa.sum(1), sb.sum(1), nb)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no embedded batches")
    return total


def _take(e: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Rows ``index`` of ``e``: a view when they are consecutive (the common case)."""
    if index == list(range(index[0], index[0] + len(index))):
        return e[index[0] : index[0] + len(index)]
    import torch

    return e.index_select(0, torch.tensor(index, device=e.device))


def pair_terms_from_features(
    metric: StreamingMetric,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    batch_size: int | None = None,
    keep_batches: bool = False,
    row_names: Sequence[str] | None = None,
    col_names: Sequence[str] | None = None,
) -> PairTerms:
    """Additive terms of a streaming metric for all pairs of two layer lists held in memory.

    A tensor passed on both sides (self-comparison) is embedded once. NaN/Inf features raise
    :class:`FeatureError` naming metric and layer; the check reads the small sums rather than
    the features (a NaN or Inf reaches every sum of its layer), which saves a pass over them.
    A layer without variation gets zero self-terms, hence NaN values (see ``undefined_notes``).
    """
    row_names = list(row_names or [f"row layer {i}" for i in range(len(xs))])
    col_names = list(col_names or [f"column layer {j}" for j in range(len(ys))])
    named = [*zip(xs, row_names), *zip(ys, col_names)]
    unique: dict[int, int] = {}
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    for t, name in named:
        if id(t) not in unique:
            unique[id(t)] = len(tensors)
            tensors.append(as_matrix(t))
            names.append(name)
    n = check_same_n(dict(zip(names, tensors)), metric=metric.name)
    bs = n if batch_size is None else int(batch_size)
    check_batch_size(metric, bs, n)
    ia, ib = [unique[id(x)] for x in xs], [unique[id(y)] for y in ys]
    terms: PairTerms | None = None
    for start, stop, batch in batch_slices(n, bs, metric.min_batch_size, len(tensors)):
        e = embed_slice(metric, tensors, start, stop, batch)
        part = terms_from_groups([_take(e, ia)], [_take(e, ib)], keep_batches)
        terms = part if terms is None else terms + part
    assert terms is not None  # check_batch_size guarantees one batch
    dropped = dropped_examples(metric, n, bs)
    terms.n_examples = n - dropped
    if dropped:  # examples of a short last batch reach no sum: check them directly
        for t, name in zip(tensors, names):
            check_features(t[n - dropped :], name, metric.name)
    for value, i in [*zip(terms.self_rows.tolist(), ia), *zip(terms.self_cols.tolist(), ib)]:
        if value != value or value in (float("inf"), float("-inf")):
            check_features(tensors[i], names[i], metric.name)
            raise FeatureError(
                f"metric '{metric.name}', {names[i]}: the features overflow float32 in the Gram "
                "matrix (values above ~1e19). Rescale the features before comparing them."
            )
    return terms


def is_constant(x: torch.Tensor) -> bool:
    """Whether ``[N, D]`` features do not vary across examples beyond rounding of their dtype:
    ``||x - mean||_F <= 16 eps ||x||_F`` (the full-batch metrics' rule)."""
    import torch

    eps = torch.finfo(x.dtype).eps if torch.is_floating_point(x) else 0.0
    x64 = x.double()
    return bool(torch.linalg.norm(x64 - x64.mean(0)) <= 16 * eps * torch.linalg.norm(x64))


def undefined_notes(values: torch.Tensor, rows: Sequence[str], cols: Sequence[str],
                    terms: PairTerms | None, *,
                    constant: tuple[Sequence[bool], Sequence[bool]] | None = None) -> list[str]:
    """Say which layers make values undefined (NaN) and why.

    Constant layers come from ``constant`` (flags per row and column layer), else from zero
    self-terms, else from rows (columns) that are entirely NaN.
    """
    import torch

    if constant is not None:
        bad_rows = [i for i, c in enumerate(constant[0]) if c]
        bad_cols = [j for j, c in enumerate(constant[1]) if c]
    elif terms is not None:
        bad_rows = torch.nonzero(terms.self_rows <= 0).flatten().tolist()
        bad_cols = torch.nonzero(terms.self_cols <= 0).flatten().tolist()
    else:
        nan = torch.isnan(values)
        bad_rows = torch.nonzero(nan.all(1)).flatten().tolist() if values.shape[1] else []
        bad_cols = torch.nonzero(nan.all(0)).flatten().tolist() if values.shape[0] else []
        if len(bad_rows) == values.shape[0] or len(bad_cols) == values.shape[1]:
            bad_rows, bad_cols = [], []  # an all-NaN matrix does not say which side is at fault
    notes = [f"row layer '{rows[i]}' has constant features: its similarity to every layer is "
             "undefined (NaN)." for i in bad_rows]
    notes += [f"column layer '{cols[j]}' has constant features: its similarity to every layer "
              "is undefined (NaN)." for j in bad_cols]
    if not notes and bool(torch.isnan(values).any()):
        pairs = torch.nonzero(torch.isnan(values)).tolist()[:5]
        listing = ", ".join(f"({rows[i]}, {cols[j]})" for i, j in pairs)
        notes.append(f"undefined (NaN) values for {listing}: a layer's features are constant or "
                     "degenerate for this metric.")
    return notes


def warn_notes(notes: Sequence[str]) -> None:
    """Surface undefined values to Python callers (the CLI prints notes itself)."""
    from repsim.errors import MetricUndefinedWarning

    for note in notes:
        warnings.warn(note, MetricUndefinedWarning, stacklevel=3)


def similarity_matrix(
    metric: Metric,
    feats_a: Mapping[str, torch.Tensor],
    feats_b: Mapping[str, torch.Tensor],
    batch_size: int | None = None,
    keep_batches: bool = False,
    row_names: Sequence[str] | None = None,
    col_names: Sequence[str] | None = None,
) -> SimilarityResult:
    """Compare every layer of ``feats_a`` with every layer of ``feats_b``: the one routine for
    features held in memory (the API, and the run's full-batch metrics).

    Streaming metrics use consecutive minibatches of ``batch_size``; a full-batch metric with
    the streaming form (``linear_cka``) gets one batch of everything, the others run on all
    examples at once. ``row_names``/``col_names`` name the layers in error messages.
    """
    rows, cols = list(feats_a), list(feats_b)
    row_names = list(row_names or [f"layer '{r}' (first input)" for r in rows])
    col_names = list(col_names or [f"layer '{c}' (second input)" for c in cols])
    desc = metric.describe()
    if isinstance(metric, StreamingMetric):
        bs = batch_size if metric.properties.streaming else None
        terms = pair_terms_from_features(metric, list(feats_a.values()), list(feats_b.values()),
                                         bs, keep_batches, row_names, col_names)
        values = metric.finalize(terms)
        if bs is not None:
            desc["batch_size"] = bs
        desc["examples"] = terms.n_examples
        return SimilarityResult(values, rows, cols, metric.name, desc,
                                undefined_notes(values, rows, cols, terms), terms)
    xs = [check_features(feats_a[r], name, metric.name) for r, name in zip(rows, row_names)]
    ys = [check_features(feats_b[c], name, metric.name) for c, name in zip(cols, col_names)]
    n = check_same_n({**dict(zip(row_names, xs)), **dict(zip(col_names, ys))},
                     metric=metric.name)
    values = metric.matrix(xs, ys, None, row_names, col_names)
    constant = ([is_constant(x) for x in xs], [is_constant(y) for y in ys])
    desc["examples"] = n
    return SimilarityResult(values, rows, cols, metric.name, desc,
                            undefined_notes(values, rows, cols, None, constant=constant))
