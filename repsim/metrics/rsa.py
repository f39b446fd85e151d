"""Representational similarity analysis (Kriegeskorte et al. 2008).

Each layer's representational dissimilarity matrix is ``1 - Pearson correlation`` between the
feature vectors of every two examples; two layers are compared by the Spearman correlation of
their RDMs' upper triangles (i < j). Each layer's condensed RDM is ranked once
(``scipy.stats.rankdata``, ties averaged) and every layer pair is then one inner product of
standardised ranks, the Pearson correlation of ranks, which is Spearman's rho.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from repsim.metrics.base import MetricProperties
from repsim.metrics.fullbatch import FullBatchMetric, Layer

if TYPE_CHECKING:
    import numpy as np


class RSAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RSA(FullBatchMetric):
    """Spearman correlation of 1 - Pearson RDMs."""

    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(-1.0, 1.0),
        invariances=("isotropic_scaling", "permutation"),
        streaming=False,
        estimator="Spearman correlation of the upper triangles of 1 - Pearson RDMs",
        min_examples=4,
        min_features=3,  # the Pearson correlation of two 2-vectors is always ±1
    )

    def __init__(self, params: RSAParams | None = None, name: str | None = None) -> None:
        super().__init__(params or RSAParams(), name or "rsa")

    def prepare(self, layer: Layer) -> Any:
        import numpy as np
        from scipy.spatial.distance import pdist
        from scipy.stats import rankdata

        x = layer.x
        if x.shape[1] < self.properties.min_features:
            raise self.error(
                layer.name, f"{x.shape[1]} features per example are too few: the Pearson "
                "correlation of two vectors of fewer than 3 values is ±1 or undefined",
                "Compare layers with at least 3 features, or use 'linear_cka'.")
        spread = np.linalg.norm(x - x.mean(axis=1, keepdims=True), axis=1)
        flat = spread <= 16 * layer.eps * np.linalg.norm(x, axis=1)
        if bool(flat.any()):
            raise self.error(
                layer.name,
                f"{int(flat.sum())} examples have the same value in every feature, so their "
                "Pearson correlation with other examples (the RDM) is undefined",
                "Select a layer whose features vary within each example, or use 'linear_cka'.")
        ranks = rankdata(pdist(x, metric="correlation"))
        ranks -= ranks.mean()
        norm = np.linalg.norm(ranks)
        return ranks / norm if norm > 0 else None

    def values(self, rows: Sequence[Any], cols: Sequence[Any]) -> np.ndarray:
        import numpy as np

        # A layer whose RDM entries are all tied has no defined rank correlation.
        out = np.full((len(rows), len(cols)), np.nan)
        ri = [i for i, r in enumerate(rows) if r is not None]
        ci = [j for j, c in enumerate(cols) if c is not None]
        if ri and ci:
            a = np.stack([rows[i] for i in ri])
            b = np.stack([cols[j] for j in ci])
            out[np.ix_(ri, ci)] = np.clip(a @ b.T, -1.0, 1.0)
        return out
