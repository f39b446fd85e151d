"""Core CKA properties, with hypothesis, against a float64 reference of eq. 4 of the seeds."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import repsim
import repsim.functional as F
from repsim.metrics.cka import MinibatchCKA, centred_grams, u_centre

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def hsic1_eq4(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 - the seeds' notation
    """HSIC_1 exactly as eq. 4 writes it: trace terms on diagonal-zeroed kernels."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones((n, 1))
    total = (np.trace(kt @ lt)
             + (one.T @ kt @ one).item() * (one.T @ lt @ one).item() / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (one.T @ kt @ lt @ one).item())
    return total / (n * (n - 3))


def minibatch_cka_eq3(x: np.ndarray, y: np.ndarray, bs: int) -> float:
    """Eq. 3: ratio of HSIC_1 sums over consecutive batches (a last batch under 4 left out)."""
    sums = np.zeros(3)
    for s in range(0, x.shape[0], bs):
        xb, yb = x[s : s + bs], y[s : s + bs]
        if xb.shape[0] < 4:
            continue
        k, l = xb @ xb.T, yb @ yb.T  # noqa: E741
        sums += [hsic1_eq4(k, l), hsic1_eq4(k, k), hsic1_eq4(l, l)]
    return sums[0] / np.sqrt(sums[1] * sums[2])


@st.composite
def pairs(draw, min_n: int = 8, max_n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(min_n, max_n))
    dx, dy = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    z = rng.normal(size=(n, 2))
    x = z @ rng.normal(size=(2, dx)) + rng.normal(size=(n, dx)) + rng.normal(size=dx)
    y = z @ rng.normal(size=(2, dy)) * draw(st.floats(0, 2)) + rng.normal(size=(n, dy))
    return x, y


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def haar(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@SETTINGS
@given(pair=pairs(), bs=st.integers(4, 40))
def test_agrees_with_eq4_reference(pair, bs: int) -> None:
    x, y = pair
    assert abs(F.minibatch_cka(t(x), t(y), bs) - minibatch_cka_eq3(x, y, bs)) < 1e-6


@SETTINGS
@given(pair=pairs(), bs=st.integers(4, 40))
def test_symmetric(pair, bs: int) -> None:
    x, y = pair
    assert abs(F.minibatch_cka(t(x), t(y), bs) - F.minibatch_cka(t(y), t(x), bs)) < 1e-9


@SETTINGS
@given(pair=pairs(), seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3))
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(pair, seed: int, scale: float) -> None:
    x, y = pair
    xq = scale * x @ haar(x.shape[1], seed)
    assert abs(F.minibatch_cka(t(xq), t(y), 16) - F.minibatch_cka(t(x), t(y), 16)) < 1e-5
    assert abs(F.linear_cka(t(xq), t(y)) - F.linear_cka(t(x), t(y))) < 1e-5


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(32, 96))
def test_not_invariant_to_a_general_invertible_map(seed: int, n: int) -> None:
    """Stretching the directions y depends on raises CKA (CCA would not move)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    y = x[:, :2] + 0.1 * rng.normal(size=(n, 2))
    a = np.diag([10.0, 10.0, 1, 1, 1, 1]) @ haar(6, seed)  # invertible, not orthogonal
    before, after = F.minibatch_cka(t(x), t(y), 16), F.minibatch_cka(t(x @ a), t(y), 16)
    assert after - before > 0.1


@SETTINGS
@given(pair=pairs(), bs=st.integers(4, 40))
def test_self_similarity_is_one(pair, bs: int) -> None:
    x, _ = pair
    assert abs(F.minibatch_cka(t(x), t(x), bs) - 1.0) < 1e-9


@SETTINGS
@given(pair=pairs())
def test_one_batch_of_all_examples_is_the_full_batch_unbiased_cka(pair) -> None:
    x, y = pair
    n = x.shape[0]
    assert abs(F.minibatch_cka(t(x), t(y), n) - F.linear_cka(t(x), t(y), debiased=True)) < 1e-12


@SETTINGS
@given(n_a=st.integers(1, 5), n_b=st.integers(1, 5), seed=st.integers(0, 2**31),
       bs=st.sampled_from([8, 13, 32]))
def test_all_pairs_matrix_equals_pairwise_calls(n_a: int, n_b: int, seed: int, bs: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 4, generator=g)
    fa = {f"a{i}": base @ torch.randn(4, 3 + i, generator=g) + torch.randn(64, 3 + i, generator=g)
          for i in range(n_a)}
    fb = {f"b{j}": torch.tanh(base @ torch.randn(4, 5, generator=g)) for j in range(n_b)}
    fb["a0"] = fa["a0"]  # the same tensor on both sides is embedded once
    res = repsim.similarity(fa, fb, "minibatch_cka", batch_size=bs)
    for i, x in enumerate(fa.values()):
        for j, y in enumerate(fb.values()):
            assert abs(res.values[i, j].item() - F.minibatch_cka(x, y, bs)) < 1e-12


@SETTINGS
@given(pair=pairs(min_n=4, max_n=40))
def test_u_centred_inner_product_is_eq4(pair) -> None:
    x, y = pair
    k, l = x @ x.T, y @ y.T  # noqa: E741 - uncentred on purpose: HSIC_1 ignores the mean
    got = F.hsic1(t(k), t(l))
    assert abs(got - hsic1_eq4(k, l)) <= 1e-9 * max(1.0, abs(hsic1_eq4(k, k)))


def test_centred_grams_zero_constant_batches_only() -> None:
    x = torch.randn(3, 8, 5)
    x[1] = torch.tensor([1e3, -2.0, 0.5, 7.0, 1.0])  # batch 1: every example identical
    g = centred_grams(x)
    assert bool((g[1] == 0).all()) and bool((g[0].diagonal() > 0).all())
    xc = (x - x.mean(1, keepdim=True)).double()
    torch.testing.assert_close(g[0], xc[0] @ xc[0].T, rtol=1e-5, atol=1e-5)


def test_wide_features_take_the_chunked_path_and_agree() -> None:
    """At 65·192 features one batch fills a chunk: the per-batch loop must give the same."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 65 * 192, generator=g)
    y = x[:, :4000] @ torch.randn(4000, 50, generator=g) / 60 + torch.randn(64, 50, generator=g)
    ref = minibatch_cka_eq3(x.double().numpy(), y.double().numpy(), 16)
    assert abs(F.minibatch_cka(x, y, 16) - ref) < 1e-6


def test_u_centre_rows_sum_to_zero_and_embedding_matches() -> None:
    x = torch.randn(2, 10, 4, dtype=torch.float64)
    u = u_centre(x @ x.transpose(1, 2))
    torch.testing.assert_close(u.sum(-1), torch.zeros(2, 10, dtype=torch.float64))
    emb = MinibatchCKA().embed(x)
    torch.testing.assert_close(emb, u.reshape(2, -1), rtol=1e-5, atol=1e-5)
