"""Bootstrap intervals over minibatches and permutation tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import repsim
from repsim.errors import FeatureError
from repsim.functional import bootstrap_cka, permutation_test
from repsim.metrics.inference import bootstrap_distribution


def population_cka(a: np.ndarray, b: np.ndarray, s1: float, s2: float) -> float:
    """Linear CKA of x = zA + s1·e1, y = zB + s2·e2 (z, e standard normal), from the covariances:
    ||Σxy||²_F / (||Σxx||_F ||Σyy||_F)."""
    sxx = a.T @ a + s1**2 * np.eye(a.shape[1])
    syy = b.T @ b + s2**2 * np.eye(b.shape[1])
    return float(((a.T @ b) ** 2).sum() / np.sqrt((sxx**2).sum() * (syy**2).sum()))


def sample(seed: int, a: np.ndarray, b: np.ndarray, s1: float, s2: float, n: int = 1024
           ) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, a.shape[0]))
    x = z @ a + s1 * rng.normal(size=(n, a.shape[1]))
    y = z @ b + s2 * rng.normal(size=(n, b.shape[1]))
    return torch.from_numpy(x), torch.from_numpy(y)


def test_bootstrap_intervals_cover_the_population_value() -> None:
    """200 independent data sets (fixed seeds, so the outcome is fixed): the 90% interval holds
    the population CKA in 84%-96% of them (nominal 90% ± about 3 binomial standard errors).
    Measured: 179 of 200."""
    rng = np.random.default_rng(1234)
    a, b, s1, s2 = rng.normal(size=(2, 6)), rng.normal(size=(2, 4)), 1.5, 1.0
    truth = population_cka(a, b, s1, s2)
    covered = 0
    for seed in range(200):
        x, y = sample(seed, a, b, s1, s2)
        res = repsim.similarity({"x": x}, {"y": y}, batch_size=32, keep_batches=True)
        low, high = res.confidence_interval(n_resamples=1000, confidence=0.9, seed=seed)
        covered += int(low.item() <= truth <= high.item())
    assert 0.84 <= covered / 200 <= 0.96


def test_bootstrap_distribution_is_resampling_of_batches() -> None:
    """The GEMM over multinomial weights equals recomputing CKA from resampled batch terms."""
    x, y = sample(0, np.ones((1, 3)), np.ones((1, 2)), 1.0, 1.0, n=256)
    res = repsim.similarity({"x": x, "x2": x**2}, {"y": y}, batch_size=32, keep_batches=True)
    dist = bootstrap_distribution(res, n_resamples=50, seed=3)
    picks = torch.randint(8, (50, 8), generator=torch.Generator().manual_seed(3))
    cross = torch.cat(res.terms.batch_cross)
    rows, cols = torch.cat(res.terms.batch_self_rows), torch.cat(res.terms.batch_self_cols)
    for r in range(50):
        p = picks[r]
        expected = cross[p].sum(0) / (rows[p].sum(0)[:, None] * cols[p].sum(0)[None, :]).sqrt()
        torch.testing.assert_close(dist[r], expected, rtol=1e-12, atol=1e-14)


def test_bootstrap_from_features_equals_from_a_result() -> None:
    x, y = sample(1, np.ones((1, 3)), np.ones((1, 2)), 1.0, 1.0, n=256)
    res = repsim.similarity({"x": x}, {"y": y}, batch_size=16, keep_batches=True)
    low, high = bootstrap_cka(x, y, batch_size=16, n_resamples=300, seed=5)
    torch.testing.assert_close((low, high), res.confidence_interval(300, 0.95, 5))
    assert low.item() < res.values.item() < high.item()


def test_bootstrap_needs_per_batch_terms_and_two_batches() -> None:
    x = torch.randn(64, 3)
    with pytest.raises(FeatureError, match="keep_batches=True"):
        bootstrap_cka(repsim.similarity({"x": x}, {"y": x}))
    with pytest.raises(FeatureError, match="at least 2 batches"):
        bootstrap_cka(x, x, batch_size=64)


def test_permutation_test_of_related_and_unrelated_layers() -> None:
    x, y = sample(2, np.ones((1, 4)), np.ones((1, 3)), 1.0, 1.0, n=256)
    noise = torch.from_numpy(np.random.default_rng(0).normal(size=(256, 3)))
    res = permutation_test({"x": x}, {"y": y, "noise": noise}, n_permutations=199, seed=0)
    assert res.null.shape == (199, 1, 2) and res.p_value.shape == (1, 2)
    assert res.p_value[0, 0].item() == pytest.approx(1 / 200)  # nothing beats a real relation
    counted = (1 + (res.null[:, 0, 1] >= res.observed[0, 1]).sum().item()) / 200
    assert res.p_value[0, 1].item() == pytest.approx(counted)
    # HSIC_1 is unbiased: the null of minibatch CKA is centred on 0.
    assert abs(res.null.mean().item()) < 3 * res.null.std().item() / 199**0.5


def test_permutation_p_values_of_independent_data_are_not_small() -> None:
    """Under independence the p-value is uniform: over 30 fixed seeds, its mean is near 1/2 and
    few fall under 0.05 (bounds: mean in [0.3, 0.7], at most 5 of 30 below 0.05)."""
    ps = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        x, y = (torch.from_numpy(rng.normal(size=(128, 3))) for _ in range(2))
        ps.append(permutation_test(x, y, n_permutations=49, seed=seed).p_value.item())
    assert 0.3 <= float(np.mean(ps)) <= 0.7 and sum(p < 0.05 for p in ps) <= 5


def test_permutation_test_of_full_batch_metrics_and_distances() -> None:
    x, y = sample(3, np.ones((1, 3)), np.ones((1, 2)), 0.5, 0.5, n=64)
    assert permutation_test(x, y, "cca", n_permutations=19).p_value.item() == pytest.approx(0.05)
    res = permutation_test(x, y, "procrustes", n_permutations=19, distance=True)
    assert res.description["kind"] == "distance" and res.p_value.item() == pytest.approx(0.05)
