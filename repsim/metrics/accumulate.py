"""Streaming accumulation of one metric over batches, for every pair of several models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from repsim.errors import FeatureError
from repsim.metrics.base import Metric, PairTerms, StreamingMetric
from repsim.metrics.engine import (
    SimilarityResult,
    check_batch_size,
    check_features,
    is_constant,
    terms_from_groups,
    undefined_notes,
)

if TYPE_CHECKING:
    import torch


class SimilarityAccumulator:
    """Feeds batches of every model's layers into one metric.

    Streaming metrics: each batch, each model's layers are embedded once and every requested model
    pair gets its terms from one GEMM; state is a few ``[La, Lb]`` float64 sums. Other metrics:
    the batches' features are kept (in memory) and the metric runs at the end.
    """

    def __init__(self, metric: Metric, layers: Mapping[str, Sequence[str]],
                 pairs: Sequence[tuple[str, str]], keep_batches: bool = False) -> None:
        self.metric = metric
        self.layers = {m: list(v) for m, v in layers.items()}
        self.pairs = list(pairs)
        self.keep_batches = keep_batches
        self.streaming = isinstance(metric, StreamingMetric) and metric.properties.streaming
        self.terms: dict[tuple[str, str], PairTerms] = {}
        self.batch_size: int | None = None
        self.dropped = 0
        self._stored: dict[str, dict[str, list[torch.Tensor]]] = {m: {} for m in self.layers}

    def update(self, feats: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Add one batch: ``feats[model][layer]`` is ``[n, ...]``, same n for every layer."""
        n = None
        checked: dict[str, list[torch.Tensor]] = {}
        for model, names in self.layers.items():
            checked[model] = []
            for layer in names:
                t = check_features(feats[model][layer], f"model '{model}', layer '{layer}'",
                                   self.metric.name)
                if n is None:
                    n = t.shape[0]
                elif t.shape[0] != n:
                    raise FeatureError(
                        f"model '{model}', layer '{layer}' gave {t.shape[0]} examples in a batch "
                        f"of {n}; every layer must see the same examples."
                    )
                checked[model].append(t)
        if n is None:
            return
        if not self.streaming:
            for model, names in self.layers.items():
                for layer, t in zip(names, checked[model]):
                    self._stored[model].setdefault(layer, []).append(t.detach().cpu())
            return
        metric = self.metric
        assert isinstance(metric, StreamingMetric)
        if self.batch_size is None:
            self.batch_size = n
            check_batch_size(metric, n, n)
        if n < metric.min_batch_size:  # a short last batch: too few examples for the estimator
            self.dropped += n
            return
        # Each model's layers embedded once ([L, 1, m]), then one GEMM per model pair.
        embedded = {m: metric.embed_many([t[None] for t in ts]) for m, ts in checked.items()}
        for a, b in self.pairs:
            part = terms_from_groups([embedded[a]], [embedded[b]], self.keep_batches)
            part.n_examples = n
            old = self.terms.get((a, b))
            self.terms[(a, b)] = part if old is None else old + part

    def result(self, a: str, b: str) -> SimilarityResult:
        import torch

        rows, cols = self.layers[a], self.layers[b]
        desc = self.metric.describe()
        notes: list[str] = []
        terms = None
        constant = None
        if self.streaming:
            if (a, b) not in self.terms:
                raise FeatureError(
                    f"no batch reached metric '{self.metric.name}' for ({a}, {b}): the data gave "
                    f"fewer than {getattr(self.metric, 'min_batch_size', 1)} examples."
                )
            terms = self.terms[(a, b)]
            values = self.metric.finalize(terms)
            desc.update(batch_size=self.batch_size, batches=terms.n_batches,
                        examples=terms.n_examples)
            if self.dropped:
                notes.append(f"{self.dropped} examples of a last short batch were left out: "
                             "HSIC_1 needs at least 4 per batch.")
        else:
            xs = [torch.cat(self._stored[a][r]) for r in rows]
            ys = [torch.cat(self._stored[b][c]) for c in cols]
            values = self.metric.matrix(xs, ys, None, [f"model '{a}', layer '{r}'" for r in rows],
                                        [f"model '{b}', layer '{c}'" for c in cols])
            constant = ([is_constant(x) for x in xs], [is_constant(y) for y in ys])
            desc.update(examples=int(xs[0].shape[0]))
        notes += undefined_notes(values, rows, cols, terms, constant=constant)
        return SimilarityResult(values, rows, cols, self.metric.name, desc, notes, terms)
