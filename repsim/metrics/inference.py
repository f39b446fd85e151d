"""Uncertainty for streaming (CKA-form) metrics: bootstrap intervals and permutation tests.

Bootstrap over minibatches: a minibatch CKA is ``Σ_b c_b / sqrt(Σ_b a_b · Σ_b d_b)`` over the
per-batch terms the engine keeps with ``keep_batches=True``. Resampling B batches with
replacement is a multinomial weight vector over batches, so every resample of every layer pair is
one GEMM of the weights with the stacked per-batch terms; no feature is touched again. The
interval is the percentile interval of the resampled values. Batches are the resampling unit
because the terms of one batch share its examples (they are independent across batches, not
within one).

Permutation test: shuffle the example order of the second input (breaking the pairing with the
first), recompute the metric, repeat. The first input is embedded once; only the shuffled side
is re-embedded. The p-value is ``(1 + #{null >= observed}) / (1 + permutations)`` for a
similarity (``<=`` for a distance), which is exact under the null of no association.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from repsim.errors import FeatureError

if TYPE_CHECKING:
    import torch

    from repsim.metrics.base import Metric, PairTerms
    from repsim.metrics.results import SimilarityResult

    Features = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def _batch_terms(source: PairTerms | SimilarityResult
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch ``cross [B, La, Lb]``, ``self_rows [B, La]``, ``self_cols [B, Lb]``."""
    import torch

    terms = getattr(source, "terms", source)
    if terms is None or not getattr(terms, "batch_cross", None):
        raise FeatureError(
            "bootstrap needs the per-batch terms of a streaming metric, and these results have "
            "none. Compute them with keep_batches=True (repsim.similarity(..., "
            "keep_batches=True)), or set `bootstrap` in the recipe's [run] table."
        )
    cross = torch.cat(terms.batch_cross).double()
    rows = torch.cat(terms.batch_self_rows).double()
    cols = torch.cat(terms.batch_self_cols).double()
    if cross.shape[0] < 2:
        raise FeatureError(
            f"bootstrap over minibatches needs at least 2 batches, got {cross.shape[0]}. Use a "
            "smaller batch size or more examples."
        )
    return cross, rows, cols


def bootstrap_distribution(source: PairTerms | SimilarityResult, n_resamples: int = 2000,
                           seed: int = 0) -> torch.Tensor:
    """CKA of ``n_resamples`` minibatch resamples, ``[n_resamples, La, Lb]`` float64."""
    import torch

    cross, rows, cols = _batch_terms(source)
    nb, la, lb = cross.shape
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(nb, (n_resamples, nb), generator=gen)
    weights = torch.zeros(n_resamples, nb, dtype=torch.float64)
    weights.scatter_add_(1, picks, torch.ones(n_resamples, nb, dtype=torch.float64))
    c = (weights @ cross.reshape(nb, -1)).reshape(n_resamples, la, lb)
    a, d = weights @ rows, weights @ cols
    return c / (a[:, :, None] * d[:, None, :]).sqrt()


def bootstrap_interval(source: PairTerms | SimilarityResult | None, n_resamples: int = 2000,
                       confidence: float = 0.95, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval ``(low, high)``, each ``[La, Lb]``, from per-batch terms."""
    import torch

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    dist = bootstrap_distribution(source, n_resamples, seed)  # type: ignore[arg-type]
    alpha = (1 - confidence) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    low, high = torch.quantile(dist, q, dim=0)
    return low, high


def bootstrap_cka(
    source: PairTerms | SimilarityResult | Features,
    other: Features | None = None,
    *,
    batch_size: int = 32,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval ``(low, high)`` of minibatch CKA, each ``[La, Lb]``.

    ``source`` is a result of ``repsim.similarity(..., keep_batches=True)`` (or its
    :class:`PairTerms`), or features: two tensors, or two mappings layer → tensor, compared
    with ``minibatch_cka`` in batches of ``batch_size``.
    """
    if other is not None:
        from repsim.metrics.cka import MinibatchCKA
        from repsim.metrics.engine import similarity_matrix

        source = similarity_matrix(MinibatchCKA(name="minibatch_cka"), _named(source, "x"),
                                   _named(other, "y"), batch_size, keep_batches=True)
    return bootstrap_interval(source, n_resamples, confidence, seed)  # type: ignore[arg-type]


@dataclass
class PermutationResult:
    """Observed values, the permutation null and one-sided p-values, each per layer pair."""

    observed: torch.Tensor  # [La, Lb]
    null: torch.Tensor  # [n_permutations, La, Lb]
    p_value: torch.Tensor  # [La, Lb]
    metric: str
    description: dict[str, Any]


def _named(feats: Any, default: str) -> dict[str, torch.Tensor]:
    return dict(feats) if isinstance(feats, Mapping) else {default: feats}


def permutation_test(
    feats_a: Features,
    feats_b: Features,
    metric: Metric,
    *,
    batch_size: int = 32,
    n_permutations: int = 1000,
    seed: int = 0,
) -> PermutationResult:
    """Permutation test of association for every layer pair (tensors, or mappings layer →
    tensor): shuffle the examples of ``feats_b``, recompute, compare with the observed value."""
    import torch

    from repsim.metrics.base import StreamingMetric
    from repsim.metrics.engine import (
        embed_groups,
        similarity_matrix,
        terms_from_groups,
    )

    m = metric
    a, b = _named(feats_a, "x"), _named(feats_b, "y")
    observed = similarity_matrix(m, a, b, batch_size)  # validates the features
    xs, ys = list(a.values()), list(b.values())
    n = int(next(iter(b.values())).shape[0])
    gen = torch.Generator().manual_seed(seed)
    null = torch.empty(n_permutations, len(xs), len(ys), dtype=torch.float64)
    if isinstance(m, StreamingMetric):
        bs = batch_size if m.properties.streaming else n
        fixed = embed_groups(m, [x.reshape(n, -1) for x in xs], bs)
        flat_ys = [y.reshape(n, -1) for y in ys]
        for p in range(n_permutations):
            perm = torch.randperm(n, generator=gen)
            shuffled = embed_groups(m, [y[perm] for y in flat_ys], bs)
            null[p] = m.finalize(terms_from_groups(fixed, shuffled))
    else:
        for p in range(n_permutations):
            perm = torch.randperm(n, generator=gen)
            null[p] = m.matrix(xs, [y.reshape(n, -1)[perm] for y in ys], batch_size)
    obs = observed.values
    if m.properties.kind == "distance":
        extreme = (null <= obs).sum(0)
    else:
        extreme = (null >= obs).sum(0)
    p_value = (1.0 + extreme.double()) / (1.0 + n_permutations)
    desc = {**observed.description, "n_permutations": n_permutations, "seed": seed,
            "test": "one-sided permutation test, examples of the second input shuffled"}
    return PermutationResult(obs, null, p_value, m.name, desc)
