"""Canonical correlation analysis family: ``cca``, ``svcca`` (Raghu et al. 2017) and ``pwcca``
(Morcos et al. 2018).

The canonical correlations of X and Y are the singular values of ``U_xᵀ U_y``, where ``U`` is an
orthonormal basis of the centred features' column span (their SVD). That is exactly the usual
``Σxx^{-1/2} Σxy Σyy^{-1/2}`` without forming inverses, and it handles rank deficiency by
truncating to the numerical rank r.

Rule for small N (N < D, or any rank deficiency): with ranks r_x and r_y, the two spans meet in
at least ``r_x + r_y - (N - 1)`` dimensions whatever the data, giving that many correlations of
exactly 1. ``cca`` and ``pwcca`` therefore require ``N >= r_x + r_y + 1`` and raise otherwise;
``svcca`` applies the same rule after keeping only the top singular directions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from repsim.metrics.base import MetricProperties
from repsim.metrics.fullbatch import FullBatchMetric, Layer

if TYPE_CHECKING:
    import numpy as np


class CCAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r2: bool = Field(False, description="mean squared canonical correlation (R²_CCA) instead")


class SVCCAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: float = Field(0.99, gt=0, le=1, description="fraction of variance the SVD step keeps")


class PWCCAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Basis:
    """A layer reduced to an orthonormal basis ``u`` ``[N, r]`` of its centred span."""

    def __init__(self, layer: Layer, u: np.ndarray) -> None:
        self.layer = layer
        self.u = u

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])


class CCA(FullBatchMetric):
    """Mean canonical correlation ρ̄ (or R²_CCA, the mean of ρ², with ``r2=True``) over the
    ``min(r_x, r_y)`` canonical pairs (Kornblith et al. 2019, section 3)."""

    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(0.0, 1.0),
        invariances=("invertible_linear", "orthogonal", "isotropic_scaling", "translation",
                     "permutation"),
        streaming=False,
        estimator="mean canonical correlation over min(rank x, rank y) pairs; exact CCA on "
        "centred features truncated to numerical rank; needs N >= rank x + rank y + 1",
        min_examples=3,
    )
    what = "CCA"
    fix = "Use more examples, 'svcca' (keeps the top singular directions), or fewer features " \
          "(e.g. a CLS token instead of all tokens)."

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        super().__init__(params or CCAParams(), name or "cca")
        self.r2 = bool(getattr(self.params, "r2", False))
        if self.r2:
            self.properties = replace(  # type: ignore[misc]
                self.properties,
                estimator="R²_CCA: mean squared canonical correlation over min(rank x, rank y) "
                "pairs; exact CCA on centred features truncated to numerical rank")

    def prepare(self, layer: Layer) -> Any:
        return _Basis(layer, layer.svd()[0])

    def check_examples(self, a: _Basis, b: _Basis) -> None:
        """The small-N rule of the module docstring."""
        n = a.layer.n
        if a.rank + b.rank > n - 1:
            raise self.error(
                f"{a.layer.name} and {b.layer.name}",
                f"{self.what} of ranks {a.rank} and {b.rank} needs at least "
                f"{a.rank + b.rank + 1} examples, got {n}; with fewer, "
                f"{a.rank + b.rank - n + 1} canonical correlations are 1 whatever the data",
                self.fix)

    def pair(self, a: _Basis, b: _Basis) -> float:
        import numpy as np

        self.check_examples(a, b)
        rho = np.clip(np.linalg.svd(a.u.T @ b.u, compute_uv=False), 0.0, 1.0)
        return float((rho**2).mean() if self.r2 else rho.mean())


class SVCCA(CCA):
    """SVCCA (Raghu et al. 2017): keep the top singular directions of each centred layer that
    explain ``keep`` of its variance, then the mean canonical correlation of what is left."""

    properties: ClassVar[MetricProperties] = replace(
        CCA.properties,
        invariances=("orthogonal", "isotropic_scaling", "translation", "permutation"),
        estimator="mean canonical correlation after keeping the top singular directions that "
        "explain `keep` of each layer's variance (Raghu et al. 2017)",
    )
    what = "SVCCA"
    fix = "Use more examples or a lower `keep`."

    def __init__(self, params: SVCCAParams | None = None, name: str | None = None) -> None:
        super().__init__(params or SVCCAParams(), name or "svcca")

    def prepare(self, layer: Layer) -> Any:
        import numpy as np

        u, s = layer.svd()
        explained = np.cumsum(s**2) / np.sum(s**2)
        keep = float(self.params.keep)  # type: ignore[union-attr]
        k = int(np.searchsorted(explained, keep - 1e-12) + 1)
        return _Basis(layer, u[:, : min(k, u.shape[1])])


class PWCCA(CCA):
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by how much
    of the layer's neurons each canonical variate accounts for.

    Weights ``α_i ∝ Σ_j |<h_i, x_j>|`` over the neurons ``x_j`` (centred columns) of the layer
    with the lower rank (the first argument on a tie, as in the authors' code), ``h_i`` its unit
    canonical variates. Not symmetric when the ranks are equal.
    """

    properties: ClassVar[MetricProperties] = replace(
        CCA.properties,
        invariances=("isotropic_scaling", "translation", "permutation"),
        estimator="projection-weighted mean canonical correlation, weights from the lower-rank "
        "layer's neurons (Morcos et al. 2018); exact CCA truncated to numerical rank",
        symmetric=False,
    )
    what = "PWCCA"

    def __init__(self, params: PWCCAParams | None = None, name: str | None = None) -> None:
        super().__init__(params or PWCCAParams(), name or "pwcca")

    def pair(self, a: _Basis, b: _Basis) -> float:
        import numpy as np

        self.check_examples(a, b)
        p, rho, qt = np.linalg.svd(a.u.T @ b.u, full_matrices=False)
        rho = np.clip(rho, 0.0, 1.0)
        m = rho.shape[0]
        # Canonical variates (unit norm, mutually orthogonal) of the weighting side.
        side, h = (a, a.u @ p[:, :m]) if a.rank <= b.rank else (b, b.u @ qt[:m].T)
        weights = np.abs(h.T @ side.layer.xc).sum(axis=1)
        return float(weights @ rho / weights.sum())
