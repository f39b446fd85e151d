"""Orthogonal Procrustes on centred, Frobenius-normalised features (Ding et al. 2021; Williams et
al. 2021).

With X̂, Ŷ centred and scaled to unit Frobenius norm (the narrower zero-padded to equal width),
``min_Q ||X̂ - Ŷ Q||_F² = 2 - 2 ||X̂ᵀ Ŷ||_*`` over orthogonal Q. The similarity is the nuclear
norm ``||X̂ᵀ Ŷ||_*`` in [0, 1]; ``distance=True`` gives ``sqrt(2 - 2 ||X̂ᵀ Ŷ||_*)`` in [0, √2],
the Procrustes distance itself (a metric). The nuclear norm is taken in the N-dimensional bases
of the thin SVDs, so wide layers cost O(N·min(N, D)²) once and O(N·r_x·r_y) per pair.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from repsim.metrics.base import MetricProperties
from repsim.metrics.fullbatch import FullBatchMetric, Layer

if TYPE_CHECKING:
    import numpy as np


class ProcrustesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    distance: bool = Field(False, description="return the distance sqrt(2 - 2·similarity)")


class Procrustes(FullBatchMetric):
    """Orthogonal Procrustes similarity (or distance) of centred, unit-norm features."""

    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(0.0, 1.0),
        invariances=("orthogonal", "isotropic_scaling", "translation", "permutation"),
        streaming=False,
        estimator="nuclear norm ||X̂ᵀŶ||_* of centred, Frobenius-normalised features (orthogonal "
        "Procrustes alignment)",
        min_examples=2,
    )

    def __init__(self, params: ProcrustesParams | None = None, name: str | None = None) -> None:
        super().__init__(params or ProcrustesParams(), name or "procrustes")
        self.distance = bool(self.params.distance)  # type: ignore[union-attr]
        if self.distance:
            self.properties = replace(  # type: ignore[misc]
                self.properties, kind="distance", range=(0.0, 2**0.5),
                estimator="Procrustes distance min_Q ||X̂ - ŶQ||_F = sqrt(2 - 2||X̂ᵀŶ||_*) of "
                "centred, Frobenius-normalised features")

    def prepare(self, layer: Layer) -> Any:
        u, s = layer.svd()
        return u * (s / (s**2).sum() ** 0.5)  # X̂ = U S Vᵀ / ||S||; Vᵀ keeps singular values

    def pair(self, a: np.ndarray, b: np.ndarray) -> float:
        import numpy as np

        nuclear = min(1.0, float(np.linalg.norm(a.T @ b, ord="nuc")))
        return (2.0 - 2.0 * nuclear) ** 0.5 if self.distance else nuclear
