"""Mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation
Hypothesis").

For every example, take its k nearest neighbours (cosine similarity of the L2-normalised
features, itself excluded) in each layer; the alignment is the mean over examples of the
fraction of neighbours the two layers share. Each layer's neighbour sets are computed once and
every layer pair's overlap counts come from one sparse product of the neighbour indicators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from repsim.metrics.base import MetricProperties
from repsim.metrics.fullbatch import FullBatchMetric, Layer

if TYPE_CHECKING:
    import numpy as np


class MutualKNNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, ge=1, description="neighbours per example")


class MutualKNN(FullBatchMetric):
    """Mean fraction of shared k nearest neighbours (cosine) per example."""

    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(0.0, 1.0),
        invariances=("orthogonal", "isotropic_scaling", "permutation"),
        streaming=False,
        estimator="mutual k-NN alignment: mean |kNN_x(i) ∩ kNN_y(i)| / k, cosine neighbours "
        "excluding i (Huh et al. 2024)",
        min_examples=3,
    )

    def __init__(self, params: MutualKNNParams | None = None, name: str | None = None) -> None:
        super().__init__(params or MutualKNNParams(), name or "mutual_knn")
        self.k = int(self.params.k)  # type: ignore[union-attr]

    def prepare(self, layer: Layer) -> Any:
        import numpy as np
        from scipy import sparse

        n = layer.n
        if n <= self.k:
            raise self.error(layer.name, f"k={self.k} neighbours need at least {self.k + 1} "
                             f"examples, got {n}", "Use a smaller k or more examples.")
        norms = np.linalg.norm(layer.x, axis=1, keepdims=True)
        zero = norms[:, 0] <= 16 * layer.eps * float(norms.max())
        if bool(zero.any()):
            raise self.error(layer.name, f"{int(zero.sum())} examples have all-zero features, so "
                             "their cosine neighbours are undefined",
                             "Select another layer (e.g. before the ReLU) or use 'linear_cka'.")
        z = layer.x / norms
        sim = z @ z.T
        np.fill_diagonal(sim, -np.inf)
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, : self.k]
        cols = (np.arange(n)[:, None] * n + nearest).ravel()
        return sparse.csr_matrix((np.ones(cols.size), (np.zeros(cols.size, int), cols)),
                                 shape=(1, n * n))

    def values(self, rows: Sequence[Any], cols: Sequence[Any]) -> np.ndarray:
        from scipy import sparse

        a, b = sparse.vstack(rows).tocsr(), sparse.vstack(cols).tocsr()
        n = int(round(a.shape[1] ** 0.5))
        return (a @ b.T).toarray() / (n * self.k)
