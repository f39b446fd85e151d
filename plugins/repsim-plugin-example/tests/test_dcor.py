"""The example plugin's metric against a plain float64 reference of distance correlation."""

import numpy as np
import pytest
import torch

from repsim_plugin_example.dcor import MinibatchDistanceCorrelation


def dcor2_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Bias-corrected dCor² of Székely & Rizzo (2014), written from the paper's definitions."""
    def u_centred(a: np.ndarray) -> np.ndarray:
        n = a.shape[0]
        d = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
        u = d - d.sum(0)[None, :] / (n - 2) - d.sum(1)[:, None] / (n - 2) + d.sum() / ((n - 1) * (n - 2))
        np.fill_diagonal(u, 0.0)
        return u

    n = x.shape[0]
    a, b = u_centred(x), u_centred(y)
    inner = lambda p, q: (p * q).sum() / (n * (n - 3))  # noqa: E731
    return inner(a, b) / np.sqrt(inner(a, a) * inner(b, b))


@pytest.mark.parametrize("n,seed", [(16, 0), (40, 1)])
def test_full_batch_matches_reference(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    y = np.tanh(x @ rng.normal(size=(5, 3))) + 0.3 * rng.normal(size=(n, 3))
    metric = MinibatchDistanceCorrelation(name="minibatch_dcor")
    got = metric.matrix([torch.tensor(x, dtype=torch.float32)], [torch.tensor(y, dtype=torch.float32)])
    assert got[0, 0].item() == pytest.approx(dcor2_reference(x, y), abs=1e-5)


def test_identical_inputs_give_one() -> None:
    x = torch.randn(64, 7, generator=torch.Generator().manual_seed(0))
    metric = MinibatchDistanceCorrelation(name="minibatch_dcor")
    assert metric.matrix([x], [x], batch_size=16)[0, 0].item() == pytest.approx(1.0, abs=1e-9)
