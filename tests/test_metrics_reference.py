"""Every built-in metric against a plain float64 numpy/scipy reference written here from the
published formula, plus hand-checkable cases and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

import repsim
import repsim.functional as F
from repsim.errors import FeatureError

# ----------------------------------------------------------------------------- references


def centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(0)


def hsic1_ref(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 - the seeds' notation
    """Seeds eq. 4: HSIC_1 with the trace terms, on diagonal-zeroed kernels."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def batches(n: int, bs: int) -> list[slice]:
    """Consecutive minibatches; a last batch of fewer than 4 examples is left out."""
    return [slice(s, min(s + bs, n)) for s in range(0, n, bs) if min(s + bs, n) - s >= 4]


def minibatch_cka_ref(x: np.ndarray, y: np.ndarray, bs: int, kernel=None) -> float:
    kernel = kernel or (lambda a: a @ a.T)
    xy = xx = yy = 0.0
    for b in batches(x.shape[0], bs):
        k, l = kernel(x[b]), kernel(y[b])  # noqa: E741
        xy, xx, yy = xy + hsic1_ref(k, l), xx + hsic1_ref(k, k), yy + hsic1_ref(l, l)
    return xy / np.sqrt(xx * yy)


def gram_rbf_ref(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Kornblith et al.'s ``gram_rbf``: bandwidth from the median of all n² squared distances."""
    dots = x @ x.T
    sq = np.diag(dots)
    d2 = -2 * dots + sq[:, None] + sq[None, :]
    return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


def cka_biased_ref(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kc, lc = h @ k @ h, h @ l @ h
    return float((kc * lc).sum() / np.sqrt((kc * kc).sum() * (lc * lc).sum()))


def inv_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return v @ np.diag(w**-0.5) @ v.T


def cca_ref(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textbook CCA: singular values of Σxx^-1/2 Σxy Σyy^-1/2; also the whitening maps' SVD."""
    xc, yc = centre(x), centre(y)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    wx, wy = inv_sqrt(sxx), inv_sqrt(syy)
    u, rho, vt = np.linalg.svd(wx @ sxy @ wy, full_matrices=False)
    return rho, wx @ u, wy @ vt.T  # correlations, canonical weights of x and of y


def svcca_ref(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    def reduce(a: np.ndarray) -> np.ndarray:
        ac = centre(a)
        _, s, vt = np.linalg.svd(ac, full_matrices=False)
        k = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= keep)) + 1
        return ac @ vt[:k].T

    return float(cca_ref(reduce(x), reduce(y))[0].mean())


def pwcca_ref(x: np.ndarray, y: np.ndarray) -> float:
    """Morcos et al. (2018): α_i = Σ_j |<h_i, x_j>| on the side with fewer neurons."""
    rho, wx, wy = cca_ref(x, y)
    use_x = x.shape[1] <= y.shape[1]
    a, w = (centre(x), wx) if use_x else (centre(y), wy)
    h = a @ w[:, : rho.size]
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ a).sum(axis=1)
    return float((alpha / alpha.sum()) @ rho)


def procrustes_ref(x: np.ndarray, y: np.ndarray) -> float:
    """min_Q ||X̂ - ŶQ||_F by scipy's orthogonal_procrustes on zero-padded normalised features."""
    d = max(x.shape[1], y.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, d - a.shape[1])))  # noqa: E731
    xh = pad(centre(x) / np.linalg.norm(centre(x)))
    yh = pad(centre(y) / np.linalg.norm(centre(y)))
    r, _ = scipy.linalg.orthogonal_procrustes(yh, xh)
    return float(np.linalg.norm(xh - yh @ r))


def rsa_ref(x: np.ndarray, y: np.ndarray) -> float:
    return float(spearmanr(pdist(x, "correlation"), pdist(y, "correlation")).statistic)


def mutual_knn_ref(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Huh et al. (2024)'s ``mutual_knn`` in numpy: cosine kNN, diagonal excluded."""
    def knn(a: np.ndarray) -> np.ndarray:
        z = a / np.linalg.norm(a, axis=1, keepdims=True)
        s = z @ z.T
        np.fill_diagonal(s, -1e8)
        return np.argsort(-s, axis=1)[:, :k]

    n = x.shape[0]
    ma, mb = np.zeros((n, n)), np.zeros((n, n))
    ma[np.arange(n)[:, None], knn(x)] = 1.0
    mb[np.arange(n)[:, None], knn(y)] = 1.0
    return float(((ma * mb).sum(1) / k).mean())


# ----------------------------------------------------------------------------- data


def related(seed: int, n: int = 96, dx: int = 6, dy: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    x = z @ rng.normal(size=(3, dx)) + 0.7 * rng.normal(size=(n, dx)) + rng.normal(size=dx)
    y = np.tanh(z @ rng.normal(size=(3, dy))) + 0.5 * rng.normal(size=(n, dy)) + 2.0
    return x, y


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


SEEDS = [0, 1, 2]

# ----------------------------------------------------------------------------- vs references


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bs", [16, 23, 96])
def test_minibatch_cka_matches_eq4(seed: int, bs: int) -> None:
    x, y = related(seed)
    assert F.minibatch_cka(t(x), t(y), bs) == pytest.approx(minibatch_cka_ref(x, y, bs), abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_cka_matches_kornblith(seed: int) -> None:
    x, y = related(seed)
    assert F.linear_cka(t(x), t(y)) == pytest.approx(
        cka_biased_ref(x @ x.T, y @ y.T), abs=1e-6)
    assert F.linear_cka(t(x), t(y), debiased=True) == pytest.approx(
        minibatch_cka_ref(x, y, x.shape[0]), abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
def test_rbf_cka_matches_kornblith(seed: int, threshold: float) -> None:
    x, y = related(seed)
    kx, ky = gram_rbf_ref(x, threshold), gram_rbf_ref(y, threshold)
    assert F.rbf_cka(t(x), t(y), threshold) == pytest.approx(cka_biased_ref(kx, ky), abs=1e-6)
    unbiased = hsic1_ref(kx, ky) / np.sqrt(hsic1_ref(kx, kx) * hsic1_ref(ky, ky))
    assert F.rbf_cka(t(x), t(y), threshold, debiased=True) == pytest.approx(unbiased, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_minibatch_rbf_cka_matches_per_batch_kernels(seed: int) -> None:
    x, y = related(seed)
    ref = minibatch_cka_ref(x, y, 24, kernel=lambda a: gram_rbf_ref(a, 0.8))
    assert F.minibatch_rbf_cka(t(x), t(y), 0.8, batch_size=24) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_cca_matches_textbook_whitening(seed: int) -> None:
    x, y = related(seed)
    rho = cca_ref(x, y)[0]
    assert F.cca(t(x), t(y)) == pytest.approx(rho.mean(), abs=1e-9)
    assert F.cca(t(x), t(y), r2=True) == pytest.approx((rho**2).mean(), abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_svcca_matches_raghu(seed: int, keep: float) -> None:
    x, y = related(seed, dx=12, dy=9)
    assert F.svcca(t(x), t(y), keep) == pytest.approx(svcca_ref(x, y, keep), abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dims", [(4, 7), (7, 4)])
def test_pwcca_matches_morcos(seed: int, dims: tuple[int, int]) -> None:
    x, y = related(seed, dx=dims[0], dy=dims[1])
    assert F.pwcca(t(x), t(y)) == pytest.approx(pwcca_ref(x, y), abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dims", [(6, 5), (3, 8)])
def test_procrustes_matches_scipy(seed: int, dims: tuple[int, int]) -> None:
    x, y = related(seed, dx=dims[0], dy=dims[1])
    dist = procrustes_ref(x, y)
    assert F.procrustes(t(x), t(y), distance=True) == pytest.approx(dist, abs=1e-9)
    assert F.procrustes(t(x), t(y)) == pytest.approx(1 - dist**2 / 2, abs=1e-9)


def test_procrustes_with_more_features_than_examples() -> None:
    x, y = related(3, n=20, dx=50, dy=30)
    assert F.procrustes(t(x), t(y), distance=True) == pytest.approx(procrustes_ref(x, y),
                                                                    abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_rsa_matches_scipy(seed: int) -> None:
    x, y = related(seed)
    assert F.rsa(t(x), t(y)) == pytest.approx(rsa_ref(x, y), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 5, 10])
def test_mutual_knn_matches_huh(seed: int, k: int) -> None:
    x, y = related(seed)
    assert F.mutual_knn(t(x), t(y), k) == pytest.approx(mutual_knn_ref(x, y, k), abs=1e-12)


# ----------------------------------------------------------------------------- hand-checkable

SIMILARITIES = ["minibatch_cka", "linear_cka", "rbf_cka", "minibatch_rbf_cka", "cca", "svcca",
                "pwcca", "procrustes", "rsa", "mutual_knn"]
ROTATION_INVARIANT = ["minibatch_cka", "linear_cka", "rbf_cka", "minibatch_rbf_cka", "cca",
                      "svcca", "procrustes", "mutual_knn"]


def one(metric: str, x: np.ndarray, y: np.ndarray, **params) -> float:
    return float(repsim.similarity({"x": t(x)}, {"y": t(y)}, metric, batch_size=32,
                                   **params).values[0, 0])


@pytest.mark.parametrize("metric", SIMILARITIES)
def test_identical_and_scaled_copy_give_one(metric: str) -> None:
    x, _ = related(4, n=128)
    assert one(metric, x, x) == pytest.approx(1.0, abs=1e-6)
    assert one(metric, x, 3.5 * x) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("metric", ROTATION_INVARIANT)
def test_orthogonally_rotated_copy_gives_one(metric: str) -> None:
    x, _ = related(5, n=128)
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))[0]
    assert one(metric, x, x @ q) == pytest.approx(1.0, abs=1e-6)


def test_procrustes_distance_of_copies_is_zero() -> None:
    x, _ = related(6)
    q = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))[0]
    assert one("procrustes", x, 2 * x @ q + 1, distance=True) == pytest.approx(0.0, abs=1e-6)


def orthogonal_pair(n: int = 64, dx: int = 4, dy: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Features whose centred columns are exactly orthogonal across x and y (zero covariance)."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(centre(rng.normal(size=(n, dx + dy))))
    return q[:, :dx] @ rng.normal(size=(dx, dx)) + 5.0, q[:, dx:] @ rng.normal(size=(dy, dy))


@pytest.mark.parametrize("metric", ["linear_cka", "cca", "svcca", "pwcca", "procrustes"])
def test_uncorrelated_features_give_zero(metric: str) -> None:
    x, y = orthogonal_pair()
    assert one(metric, x, y) == pytest.approx(0.0, abs=1e-6)


def test_uncorrelated_procrustes_distance_is_sqrt2() -> None:
    x, y = orthogonal_pair()
    assert one("procrustes", x, y, distance=True) == pytest.approx(np.sqrt(2), abs=1e-6)


@pytest.mark.parametrize("metric", ["minibatch_cka", "linear_cka", "rbf_cka", "cca", "rsa",
                                    "procrustes"])
def test_independent_features_are_near_zero(metric: str) -> None:
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(1024, 4)), rng.normal(size=(1024, 4))
    assert abs(one(metric, x, y)) < 0.1


def test_independent_mutual_knn_is_near_chance() -> None:
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(1024, 4)), rng.normal(size=(1024, 4))
    # Shared neighbours of independent layers: about k/(N-1) of k.
    assert one("mutual_knn", x, y, k=10) < 0.05


def test_mutual_knn_by_hand() -> None:
    """Points on the unit circle; nearest neighbour (k=1) by angle."""
    def circle(degrees: list[float]) -> np.ndarray:
        r = np.radians(degrees)
        return np.stack([np.cos(r), np.sin(r)], axis=1)

    x = circle([0, 10, 90, 100])  # pairs (0, 1) and (2, 3)
    assert one("mutual_knn", x, circle([0, 5, 90, 95]), k=1) == 1.0
    assert one("mutual_knn", x, circle([0, 90, 10, 100]), k=1) == 0.0
    # Neighbours 1, 0, 1, 2 against x's 1, 0, 3, 2: examples 0, 1 and 3 agree.
    assert one("mutual_knn", x, circle([0, 10, 35, 70]), k=1) == 0.75


def test_cca_of_a_linear_map_is_one_but_not_cka() -> None:
    """CCA is invariant to any invertible linear map; CKA only to orthogonal ones."""
    x, _ = related(10, n=200)
    a = np.diag([10.0, 1, 1, 1, 1, 0.1]) @ np.linalg.qr(np.random.default_rng(2).normal(
        size=(6, 6)))[0]
    assert one("cca", x, x @ a) == pytest.approx(1.0, abs=1e-9)
    assert one("linear_cka", x, x @ a) < 0.9


# ----------------------------------------------------------------------------- bad input


def test_nan_and_inf_name_metric_and_layer() -> None:
    x = torch.randn(40, 5)
    for bad_value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[7, 2] = bad_value
        for metric in ["minibatch_cka", "cca", "rsa"]:
            with pytest.raises(FeatureError, match=rf"(?s)'{metric}'.*'broken'.*NaN or Inf"):
                repsim.similarity({"broken": bad}, {"ok": x}, metric, batch_size=8)


def test_nan_in_a_dropped_last_batch_is_still_refused() -> None:
    x = torch.randn(34, 5)  # batches of 16: two full, two examples left out
    bad = x.clone()
    bad[-1, 0] = float("nan")
    with pytest.raises(FeatureError, match="NaN or Inf"):
        F.minibatch_cka(bad, x, batch_size=16)


def test_mismatched_n_is_refused_by_every_kind() -> None:
    for metric in ["minibatch_cka", "cca", "mutual_knn"]:
        with pytest.raises(FeatureError, match=rf"'{metric}'.*different numbers of examples"):
            repsim.similarity({"a": torch.randn(40, 3)}, {"b": torch.randn(41, 3)}, metric)


def test_cca_with_too_few_examples_says_why_and_what_to_do() -> None:
    x, y = related(11, n=30, dx=20, dy=20)
    with pytest.raises(FeatureError) as err:
        repsim.similarity({"blocks.3": t(x)}, {"blocks.5": t(y)}, "cca")
    msg = str(err.value)
    for part in ["'cca'", "blocks.3", "blocks.5", "41 examples", "svcca"]:
        assert part in msg
    # SVCCA with fewer kept directions is the documented way out.
    assert 0 <= F.svcca(t(x), t(y), keep=0.5) <= 1


def test_rank_deficient_features_use_their_rank() -> None:
    """Duplicated and constant columns do not count: CCA works at N just above 2·rank."""
    rng = np.random.default_rng(12)
    base = rng.normal(size=(12, 5))
    x = np.hstack([base, base[:, :2] * 3, np.ones((12, 4))])  # 11 columns, rank 5
    y = base @ rng.normal(size=(5, 5))
    assert F.cca(t(x), t(y)) == pytest.approx(1.0, abs=1e-6)


def test_constant_layer_is_nan_in_matrices_and_an_error_for_a_single_pair() -> None:
    x, c = torch.randn(64, 5), torch.ones(64, 5)
    for metric in ["minibatch_cka", "linear_cka", "cca", "procrustes", "rsa", "mutual_knn"]:
        res = repsim.similarity({"const": c, "x": x}, {"x": x}, metric, batch_size=16)
        assert torch.isnan(res.values[0, 0]) and not torch.isnan(res.values[1, 0])
        assert any("const" in note for note in res.notes)
    with pytest.raises(FeatureError, match="(?s)'procrustes'.*constant"):
        F.procrustes(c, x)


def test_rsa_refuses_flat_examples_and_two_features() -> None:
    x = torch.randn(20, 4)
    flat = x.clone()
    flat[3] = 1.0
    with pytest.raises(FeatureError, match="same value in every feature"):
        F.rsa(flat, x)
    with pytest.raises(FeatureError, match="too few"):
        F.rsa(x[:, :2], x)


def test_mutual_knn_needs_more_examples_than_k() -> None:
    with pytest.raises(FeatureError, match="k=10"):
        F.mutual_knn(torch.randn(8, 3), torch.randn(8, 3))


def test_full_batch_metrics_name_their_minimum() -> None:
    with pytest.raises(FeatureError, match="needs at least 4"):
        F.rsa(torch.randn(3, 4), torch.randn(3, 4))

