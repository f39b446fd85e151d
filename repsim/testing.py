"""Contract tests for similarity metrics: repsim's own, and any plugin's.

A metric declares facts in its :class:`~repsim.metrics.base.MetricProperties` (similarity or
distance, range, invariances, symmetry); this module checks them on generated features. Plugin
authors subclass :class:`MetricContract` in their own test suite::

    from repsim.testing import MetricContract

    class TestMyMetric(MetricContract):
        metric = "my_metric"          # a registered name (the plugin must be installed)
        params = {"k": 5}             # optional parameters

pytest then runs one hypothesis test per property: symmetry (if declared), self-similarity (1 for
a similarity whose range tops at 1, 0 for a distance), range, each declared invariance, the
all-pairs matrix against single pairs, and refusal of bad input. :func:`check_metric` runs the
same checks without pytest on a fixed set of seeds. The strategies (:func:`feature_pairs`,
:data:`TRANSFORMS`) are public for your own properties.

Requires the ``test`` extra (hypothesis).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repsim.errors import FeatureError
from repsim.metrics.base import INVARIANCES, Metric
from repsim.metrics.engine import similarity_matrix

Transform = Callable[[torch.Tensor], torch.Tensor]

# Room for the CKAs' float32 Gram GEMM; the float64 metrics are far tighter than this.
DEFAULT_ATOL = 1e-4


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _haar(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))  # sign fix: Haar-distributed, not just orthogonal


def make_features(seed: int, n: int, dx: int, dy: int, coupling: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 ``[n, d]`` feature sets sharing a 3-d latent factor scaled by ``coupling``,
    with a non-zero mean per feature (as real layers have)."""
    rng = _rng(seed)
    z = rng.normal(size=(n, 3))
    x = coupling * z @ rng.normal(size=(3, dx)) + rng.normal(size=(n, dx)) + rng.normal(size=dx)
    y = coupling * z @ rng.normal(size=(3, dy)) + rng.normal(size=(n, dy)) + rng.normal(size=dy)
    return torch.from_numpy(x), torch.from_numpy(y)


@st.composite
def feature_pairs(draw: Any, min_examples: int = 24, max_examples: int = 64, min_dim: int = 2,
                  max_dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Strategy: ``(x, y)`` float64 tensors of the same N, related through a shared latent factor
    of random strength (0 gives independent features). Defaults keep N > 2·D for CCA."""
    n = draw(st.integers(min_examples, max(min_examples, max_examples)))
    dx = draw(st.integers(min_dim, max_dim))
    dy = draw(st.integers(min_dim, max_dim))
    coupling = draw(st.floats(0.0, 3.0))
    return make_features(draw(st.integers(0, 2**32 - 1)), n, dx, dy, coupling)


def _orthogonal(d: int, seed: int) -> Transform:
    q = torch.from_numpy(_haar(d, _rng(seed)))
    return lambda x: x @ q.to(x.dtype)


def _invertible(d: int, seed: int) -> Transform:
    rng = _rng(seed)
    # Singular values in [0.5, 2]: a general invertible map, condition number at most 4.
    a = _haar(d, rng) @ np.diag(rng.uniform(0.5, 2.0, size=d)) @ _haar(d, rng)
    return lambda x: x @ torch.from_numpy(a).to(x.dtype)


def _translation(d: int, seed: int) -> Transform:
    c = torch.from_numpy(3.0 * _rng(seed).normal(size=d))
    return lambda x: x + c.to(x.dtype)


def _scaling(d: int, seed: int) -> Transform:
    a = float(np.exp(_rng(seed).uniform(np.log(0.1), np.log(10.0))))
    return lambda x: a * x


def _permutation(d: int, seed: int) -> Transform:
    p = torch.from_numpy(_rng(seed).permutation(d))
    return lambda x: x[:, p]


#: Invariance name → ``make(d, seed)`` returning a random transform of ``[N, d]`` features.
TRANSFORMS: dict[str, Callable[[int, int], Transform]] = {
    "orthogonal": _orthogonal,
    "isotropic_scaling": _scaling,
    "translation": _translation,
    "invertible_linear": _invertible,
    "permutation": _permutation,
}
assert set(TRANSFORMS) == set(INVARIANCES)


def build_metric(name: str | Metric, params: Mapping[str, Any] | None = None) -> Metric:
    """A registered metric by name (built-in or plugin), or a metric object as given."""
    from repsim.api import get_metric

    return get_metric(name, **dict(params or {}))


def value(metric: Metric, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> float:
    """The metric's value for one pair, through the all-pairs engine."""
    return float(similarity_matrix(metric, {"x": x}, {"y": y}, batch_size).values[0, 0])


def _close(a: float, b: float, atol: float) -> bool:
    return abs(a - b) <= atol


def check_range(metric: Metric, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16,
                atol: float = DEFAULT_ATOL) -> None:
    lo, hi = metric.properties.range
    v = value(metric, x, y, batch_size)
    assert lo - atol <= v <= hi + atol, f"{metric.name}: value {v} outside its range [{lo}, {hi}]"


def check_symmetry(metric: Metric, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16,
                   atol: float = DEFAULT_ATOL) -> None:
    if not metric.properties.symmetric:
        return
    a, b = value(metric, x, y, batch_size), value(metric, y, x, batch_size)
    assert _close(a, b, atol), f"{metric.name} declares symmetry but m(x, y)={a}, m(y, x)={b}"


def check_self_similarity(metric: Metric, x: torch.Tensor, batch_size: int = 16,
                          atol: float = DEFAULT_ATOL) -> None:
    """1 for a similarity whose range tops at 1, 0 for a distance; other ranges are skipped."""
    props = metric.properties
    if props.kind == "distance":
        target = 0.0
    elif props.range[1] == 1.0:
        target = 1.0
    else:
        return
    v = value(metric, x, x, batch_size)
    assert _close(v, target, atol), f"{metric.name}: m(x, x) = {v}, expected {target}"


def check_invariance(metric: Metric, invariance: str, x: torch.Tensor, y: torch.Tensor,
                     seed: int = 0, batch_size: int = 16, atol: float = DEFAULT_ATOL) -> None:
    """``m(T1 x, T2 y) == m(x, y)`` for random transforms of the declared kind on both sides."""
    if invariance not in TRANSFORMS:
        raise AssertionError(f"{metric.name} declares unknown invariance '{invariance}'; "
                             f"known: {', '.join(INVARIANCES)}")
    make = TRANSFORMS[invariance]
    tx, ty = make(x.shape[1], seed), make(y.shape[1], seed + 1)
    before, after = value(metric, x, y, batch_size), value(metric, tx(x), ty(y), batch_size)
    assert _close(before, after, atol), (
        f"{metric.name} declares '{invariance}' invariance but the value moved from {before} "
        f"to {after}")


def check_matrix(metric: Metric, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16,
                 atol: float = DEFAULT_ATOL) -> None:
    """``matrix`` is float64 ``[len(xs), len(ys)]`` and each entry equals the single pair."""
    xs, ys = [x, y], [y, x, x]
    got = metric.matrix(xs, ys, batch_size)
    assert got.dtype == torch.float64 and tuple(got.shape) == (2, 3), (
        f"{metric.name}.matrix gave {got.dtype} {tuple(got.shape)}, expected float64 (2, 3)")
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            single = value(metric, a, b, batch_size)
            assert _close(float(got[i, j]), single, atol), (
                f"{metric.name}: all-pairs entry ({i}, {j}) = {float(got[i, j])} but the single "
                f"pair gives {single}")


def check_bad_input(metric: Metric, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 16) -> None:
    """NaN features and mismatched example counts raise FeatureError naming the layer."""
    bad = x.clone()
    bad[1, 0] = float("nan")
    for a, b, what in [(bad, y, "NaN"), (x, y[:-1], "different numbers of examples")]:
        try:
            similarity_matrix(metric, {"bad_layer": a}, {"y": b}, batch_size)
        except FeatureError as exc:
            assert what in str(exc), f"{metric.name}: the error does not say '{what}': {exc}"
            continue
        raise AssertionError(f"{metric.name} accepted features with {what}")


def check_metric(name: str | Metric, params: Mapping[str, Any] | None = None, *,
                 seeds: int = 5, n: int = 48, dim: int = 5, batch_size: int = 16,
                 atol: float = DEFAULT_ATOL) -> None:
    """Run every contract check on ``seeds`` fixed feature pairs; raises AssertionError."""
    metric = build_metric(name, params)
    dim = max(dim, metric.properties.min_features + 1)
    for seed in range(seeds):
        x, y = make_features(seed, n, dim, dim - 1, coupling=seed / 2)
        check_range(metric, x, y, batch_size, atol)
        check_symmetry(metric, x, y, batch_size, atol)
        check_self_similarity(metric, x, batch_size, atol)
        for invariance in metric.properties.invariances:
            check_invariance(metric, invariance, x, y, seed, batch_size, atol)
        if seed == 0:
            check_matrix(metric, x, y, batch_size, atol)
            check_bad_input(metric, x, y, batch_size)


# One test method runs for many subclasses (one per metric): hypothesis calls that "differing
# executors"; it is safe here because runs are derandomized and share no state.
_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.differing_executors])


class MetricContract:
    """Subclass as ``Test...`` and set ``metric`` (and ``params``) to test a metric's contract."""

    metric: ClassVar[str]
    params: ClassVar[Mapping[str, Any]] = {}
    batch_size: ClassVar[int] = 16
    atol: ClassVar[float] = DEFAULT_ATOL

    def build(self) -> Metric:
        return build_metric(self.metric, self.params)

    def draw_pair(self, data: st.DataObject, metric: Metric
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        need = max(2, metric.properties.min_features)
        return data.draw(feature_pairs(min_dim=need, max_dim=need + 4), label="features")

    @_SETTINGS
    @given(data=st.data())
    def test_range(self, data: st.DataObject) -> None:
        metric = self.build()
        check_range(metric, *self.draw_pair(data, metric), self.batch_size, self.atol)

    @_SETTINGS
    @given(data=st.data())
    def test_symmetry(self, data: st.DataObject) -> None:
        metric = self.build()
        check_symmetry(metric, *self.draw_pair(data, metric), self.batch_size, self.atol)

    @_SETTINGS
    @given(data=st.data())
    def test_self_similarity(self, data: st.DataObject) -> None:
        metric = self.build()
        check_self_similarity(metric, self.draw_pair(data, metric)[0], self.batch_size,
                              self.atol)

    @_SETTINGS
    @given(data=st.data(), seed=st.integers(0, 2**31))
    def test_declared_invariances(self, data: st.DataObject, seed: int) -> None:
        metric = self.build()
        x, y = self.draw_pair(data, metric)
        for invariance in metric.properties.invariances:
            check_invariance(metric, invariance, x, y, seed, self.batch_size, self.atol)

    def test_matrix_matches_single_pairs(self) -> None:
        check_matrix(self.build(), *make_features(0, 48, 5, 4), self.batch_size, self.atol)

    def test_bad_input_is_refused(self) -> None:
        check_bad_input(self.build(), *make_features(1, 48, 5, 4), self.batch_size)


__all__ = [
    "DEFAULT_ATOL",
    "TRANSFORMS",
    "MetricContract",
    "build_metric",
    "check_bad_input",
    "check_invariance",
    "check_matrix",
    "check_metric",
    "check_range",
    "check_self_similarity",
    "check_symmetry",
    "feature_pairs",
    "make_features",
    "value",
]
