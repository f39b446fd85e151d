"""The all-pairs similarity engine.

For a streaming metric, each layer's features are cut into consecutive minibatches and embedded
once per batch (``[B, m]``); the additive terms of *every* layer pair then come from one GEMM of
the stacked embeddings, ``[La, B·m] @ [B·m, Lb]``. No Python loop over layer pairs, no per-batch
``.item()``, float64 sums that shards can add.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from repsim.errors import FeatureError
from repsim.metrics.base import Metric, PairTerms, StreamingMetric

if TYPE_CHECKING:
    import torch


@dataclass
class SimilarityResult:
    """Values of one metric for every (row layer, column layer) pair."""

    values: torch.Tensor  # float64 [len(rows), len(cols)]
    rows: list[str]
    cols: list[str]
    metric: str
    description: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    terms: PairTerms | None = None

    def to_json(self) -> dict[str, Any]:
        vals = [[None if v != v else float(v) for v in row] for row in self.values.tolist()]
        return {
            "metric": self.metric,
            "rows": self.rows,
            "cols": self.cols,
            "values": vals,
            "description": self.description,
            "notes": self.notes,
        }


def check_features(x: torch.Tensor, what: str) -> torch.Tensor:
    """Flatten past dim 0 and refuse NaN/Inf, naming the layer."""
    import torch

    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(x.shape[0], -1)
    if not torch.is_floating_point(x):
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise FeatureError(
            f"{what}: features contain NaN or Inf in {bad} of {x.shape[0]} examples. Check the "
            "model's weights and input normalisation, or select another layer."
        )
    return x


def check_same_n(named: Mapping[str, torch.Tensor], side: str = "") -> int:
    sizes = {name: int(t.shape[0]) for name, t in named.items()}
    if not sizes:
        raise FeatureError(f"no layers given{' for ' + side if side else ''}: pass at least one.")
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise FeatureError(
            f"layers have different numbers of examples ({listing}). Every layer must hold the "
            "same examples in the same order; extract them from one pass over the same data."
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


def embed_layer(metric: StreamingMetric, x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Embeddings of one layer's consecutive minibatches: full batches as one ``[B, m]`` tensor,
    then the last partial batch (if it has at least ``min_batch_size`` examples) as ``[1, m']``."""
    n = x.shape[0]
    full = n // batch_size
    out = []
    if full:
        out.append(metric.embed(x[: full * batch_size].reshape(full, batch_size, -1)))
    rest = n - full * batch_size
    if rest >= metric.min_batch_size:
        out.append(metric.embed(x[full * batch_size :].reshape(1, rest, -1)))
    return out


def dropped_examples(metric: StreamingMetric, n: int, batch_size: int) -> int:
    rest = n % batch_size
    return rest if rest < metric.min_batch_size else 0


def terms_from_embeddings(
    ea: list[torch.Tensor], eb: list[torch.Tensor], keep_batches: bool = False
) -> PairTerms:
    """Pair terms from per-layer embedding lists (``ea[layer][group] -> [B, m]``)."""
    import torch

    total: PairTerms | None = None
    for g in range(len(ea[0])):
        a = torch.stack([layer[g] for layer in ea])  # [La, B, m]
        b = torch.stack([layer[g] for layer in eb])  # [Lb, B, m]
        nb = a.shape[1]
        if keep_batches:
            per = torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0))  # [B, La, Lb]
            sa, sb = (a * a).sum(-1).T, (b * b).sum(-1).T  # [B, La], [B, Lb]
            part = PairTerms(per.sum(0), sa.sum(0), sb.sum(0), nb, 0, [per], [sa], [sb])
        else:
            cross = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
            part = PairTerms(cross, (a * a).sum((1, 2)), (b * b).sum((1, 2)), nb)
        total = part if total is None else total + part
    assert total is not None
    return total


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

    A tensor passed on both sides (self-comparison) is embedded once.
    """
    row_names = list(row_names or [f"row layer {i}" for i in range(len(xs))])
    col_names = list(col_names or [f"column layer {j}" for j in range(len(ys))])
    checked: dict[int, torch.Tensor] = {}
    for t, name in [*zip(xs, row_names), *zip(ys, col_names)]:
        if id(t) not in checked:
            checked[id(t)] = check_features(t, name)
    n = check_same_n({name: checked[id(t)] for t, name in
                      [*zip(xs, row_names), *zip(ys, col_names)]})
    bs = n if batch_size is None else int(batch_size)
    check_batch_size(metric, bs, n)
    embedded = {key: embed_layer(metric, t, bs) for key, t in checked.items()}
    terms = terms_from_embeddings([embedded[id(x)] for x in xs], [embedded[id(y)] for y in ys],
                                  keep_batches)
    terms.n_examples = n - dropped_examples(metric, n, bs)
    return terms


def undefined_notes(values: torch.Tensor, rows: Sequence[str], cols: Sequence[str],
                    terms: PairTerms | None) -> list[str]:
    """Say which layers make values undefined (NaN) and why."""
    import torch

    notes: list[str] = []
    if terms is not None:
        for i in torch.nonzero(terms.self_rows <= 0).flatten().tolist():
            notes.append(f"row layer '{rows[i]}' has constant features: its similarity to every "
                         "layer is undefined (NaN).")
        for j in torch.nonzero(terms.self_cols <= 0).flatten().tolist():
            notes.append(f"column layer '{cols[j]}' has constant features: its similarity to "
                         "every layer is undefined (NaN).")
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
) -> SimilarityResult:
    """Compare every layer of ``feats_a`` with every layer of ``feats_b``."""
    rows, cols = list(feats_a), list(feats_b)
    row_names = [f"layer '{r}' (first input)" for r in rows]
    col_names = [f"layer '{c}' (second input)" for c in cols]
    terms = None
    desc = metric.describe()
    if isinstance(metric, StreamingMetric):
        # A full-batch metric with the streaming form (linear_cka) gets one batch of everything.
        bs = batch_size if metric.properties.streaming else None
        terms = pair_terms_from_features(metric, list(feats_a.values()), list(feats_b.values()),
                                         bs, keep_batches, row_names, col_names)
        values = metric.finalize(terms)
        if bs is not None:
            desc["batch_size"] = bs
    else:
        xs = [check_features(feats_a[r], name) for r, name in zip(rows, row_names)]
        ys = [check_features(feats_b[c], name) for c, name in zip(cols, col_names)]
        check_same_n({**dict(zip(row_names, xs)), **dict(zip(col_names, ys))})
        values = metric.matrix(xs, ys, batch_size)
    notes = undefined_notes(values, rows, cols, terms)
    return SimilarityResult(values, rows, cols, metric.name, desc, notes, terms)
