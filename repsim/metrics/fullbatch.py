"""The base of metrics that need every example at once (CCA family, Procrustes, RSA, k-NN).

They run in float64 numpy/scipy on all N examples: each layer is prepared once (centred, its
SVD or RDM or neighbour sets computed), then every layer pair combines two prepared layers.
numpy and scipy are imported inside the functions so that registering these metrics stays cheap.

Shared rules, documented in docs/metrics.md:

- NaN/Inf features, mismatched N, or fewer than ``properties.min_examples`` examples raise
  :class:`~repsim.errors.FeatureError` naming metric and layer.
- A layer whose features do not vary across examples (``engine.is_constant``) gets NaN values,
  like the CKAs; ``undefined_notes`` names it.
- Numerical rank: singular values of the centred features above ``max(N, D) · eps · s_max``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from repsim.errors import FeatureError
from repsim.metrics.base import Metric

if TYPE_CHECKING:
    import numpy as np
    import torch


class Layer:
    """One layer's features as float64 numpy, with what the metrics derive from them."""

    def __init__(self, x: np.ndarray, eps: float, name: str) -> None:
        self.name = name
        self.eps = eps  # machine epsilon of the dtype the features came in
        self.x = x
        self.xc = x - x.mean(axis=0)
        self._svd: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def svd(self) -> tuple[np.ndarray, np.ndarray]:
        """``(U, s)`` of the centred features, truncated to their numerical rank: ``U`` is an
        orthonormal basis ``[N, r]`` of the span of the centred columns."""
        import numpy as np

        if self._svd is None:
            u, s, _ = np.linalg.svd(self.xc, full_matrices=False)
            tol = max(self.xc.shape) * self.eps * (s[0] if s.size else 0.0)
            r = int((s > tol).sum())
            self._svd = (u[:, :r], s[:r])
        return self._svd


class FullBatchMetric(Metric):
    """A metric computed from all examples at once, one layer pair at a time.

    Subclasses implement :meth:`pair` (or :meth:`values` to share work across pairs) on
    :class:`Layer` objects, each prepared once.
    """

    def prepare(self, layer: Layer) -> Any:
        """Per-layer work shared by every pair the layer is in (default: the layer itself)."""
        return layer

    def pair(self, a: Any, b: Any) -> float:
        """The value of one pair of prepared layers; a subclass overrides this or ``values``."""
        raise TypeError(f"metric class {type(self).__name__} must override pair() or values()")

    def values(self, rows: Sequence[Any], cols: Sequence[Any]) -> np.ndarray:
        """``[len(rows), len(cols)]`` values of prepared, non-constant layers."""
        import numpy as np

        return np.array([[self.pair(a, b) for b in cols] for a in rows], dtype=np.float64)

    def error(self, layer: str, problem: str, fix: str) -> FeatureError:
        return FeatureError(f"metric '{self.name}', {layer}: {problem}. {fix}")

    def matrix(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        batch_size: int | None = None,
        row_names: Sequence[str] | None = None,
        col_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        import numpy as np
        import torch

        from repsim.metrics.engine import check_features, check_same_n, is_constant
        from repsim.threads import blas_pool

        row_names = list(row_names or [f"row layer {i}" for i in range(len(xs))])
        col_names = list(col_names or [f"column layer {j}" for j in range(len(ys))])
        layers: dict[int, Layer] = {}
        constant: dict[int, bool] = {}
        for t, name in [*zip(xs, row_names), *zip(ys, col_names)]:
            if id(t) not in layers:
                x = check_features(t, name, self.name).detach().cpu()
                eps = float(torch.finfo(x.dtype).eps)
                layers[id(t)] = Layer(x.double().numpy(), eps, name)
                constant[id(t)] = is_constant(x)
        n = check_same_n({lay.name: lay.x for lay in layers.values()}, metric=self.name)
        need = self.properties.min_examples
        if n < need:
            raise FeatureError(f"metric '{self.name}': {n} examples are too few; it needs at least "
                               f"{need}. Compare on more examples.")
        out = np.full((len(xs), len(ys)), np.nan)
        with blas_pool():  # see repsim.threads: the BLAS and torch pools must not spin together
            prepared = {key: (None if constant[key] else self.prepare(lay))
                        for key, lay in layers.items()}
            rows = [prepared[id(x)] for x in xs]
            cols = [prepared[id(y)] for y in ys]
            ri = [i for i, p in enumerate(rows) if p is not None]
            ci = [j for j, p in enumerate(cols) if p is not None]
            if ri and ci:
                out[np.ix_(ri, ci)] = self.values([rows[i] for i in ri], [cols[j] for j in ci])
        return torch.from_numpy(out)
