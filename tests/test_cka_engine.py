"""The all-pairs engine and the streaming accumulator: batching, per-batch terms, shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import repsim
from repsim.metrics.cka import MinibatchCKA, rbf_from_gram_
from repsim.metrics.engine import pair_terms_from_features
from repsim.run.sinks import MetricSink


def hsic1_eq4(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    s = kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (kt @ lt).sum()
    return (np.trace(kt @ lt) + s) / (n * (n - 3))


def layers(seed: int, n: int, count: int, d: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(99))
    return {f"l{i}": z @ torch.randn(3, d, generator=g) + torch.randn(n, d, generator=g)
            for i in range(count)}


def test_per_batch_terms_are_eq4_per_batch_and_sum_to_totals() -> None:
    fa, fb = layers(0, 72, 2), layers(1, 72, 3)
    res = repsim.similarity(fa, fb, batch_size=16, keep_batches=True)
    terms = res.terms
    cross = torch.cat(terms.batch_cross)  # 4 batches of 16, then 8
    assert cross.shape == (5, 2, 3) and terms.n_batches == 5 and terms.n_examples == 72
    torch.testing.assert_close(cross.sum(0), terms.cross)
    torch.testing.assert_close(torch.cat(terms.batch_self_rows).sum(0), terms.self_rows)
    torch.testing.assert_close(torch.cat(terms.batch_self_cols).sum(0), terms.self_cols)
    x, y = fa["l1"].double().numpy()[64:], fb["l2"].double().numpy()[64:]
    assert cross[4, 1, 2].item() == pytest.approx(hsic1_eq4(x @ x.T, y @ y.T), rel=1e-5)
    plain = repsim.similarity(fa, fb, batch_size=16)
    torch.testing.assert_close(plain.values, res.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,batches,examples", [(70, 3, 70), (66, 2, 64), (64, 2, 64)])
def test_a_short_last_batch_counts_only_with_four_examples(n: int, batches: int,
                                                           examples: int) -> None:
    fa = layers(2, n, 1)
    terms = pair_terms_from_features(MinibatchCKA(), list(fa.values()), list(fa.values()), 32)
    assert (terms.n_batches, terms.n_examples) == (batches, examples)


def test_shards_add_up_to_the_whole() -> None:
    fa, fb = layers(3, 96, 2), layers(4, 96, 2)
    m = MinibatchCKA()
    xa, xb = list(fa.values()), list(fb.values())
    whole = pair_terms_from_features(m, xa, xb, 16)
    first = pair_terms_from_features(m, [x[:48] for x in xa], [y[:48] for y in xb], 16)
    second = pair_terms_from_features(m, [x[48:] for x in xa], [y[48:] for y in xb], 16)
    total = first + second
    torch.testing.assert_close(total.cross, whole.cross, rtol=1e-10, atol=1e-12)
    assert (total.n_batches, total.n_examples) == (6, 96)
    torch.testing.assert_close(m.finalize(total), m.finalize(whole))


def test_metric_sink_streams_to_the_same_matrix_with_flat_state() -> None:
    models = {"a": layers(5, 160, 3), "b": layers(6, 160, 2)}
    names = {m: list(v) for m, v in models.items()}
    sink = MetricSink("cka", MinibatchCKA(name="minibatch_cka"), names, [("a", "b"), ("a", "a")],
                      minibatch=32)
    for s in range(0, 160, 32):
        sink.update_features({m: {k: v[s : s + 32] for k, v in feats.items()}
                              for m, feats in models.items()})
        assert sink.state_dict()["a|b|cross"].shape == (3, 2)  # state does not grow with batches
    out = sink.compute()
    expected = repsim.similarity(models["a"], models["b"], batch_size=32)
    torch.testing.assert_close(out[("a", "b")].values, expected.values, rtol=0, atol=1e-12)
    expected_aa = repsim.similarity(models["a"], models["a"], batch_size=32)
    torch.testing.assert_close(out[("a", "a")].values, expected_aa.values, rtol=0, atol=1e-12)


def test_input_dtypes_and_shapes() -> None:
    x = torch.randn(48, 4, 3)  # flattened past dim 0
    y = torch.randn(48, 12)
    ref = repsim.similarity({"x": x.reshape(48, -1)}, {"y": y}).values
    for xx in (x, x.double(), x.half().float()):
        got = repsim.similarity({"x": xx}, {"y": y}).values
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-3 if xx is not x else 1e-12)
    ints = torch.randint(0, 5, (48, 6))
    assert repsim.similarity({"i": ints}, {"i": ints}).values.item() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [5, 6])
def test_rbf_bandwidth_uses_numpy_median_of_all_entries(n: int) -> None:
    x = torch.randn(2, n, 3, dtype=torch.float64)
    gram = x @ x.transpose(1, 2)
    got = rbf_from_gram_(gram.clone(), 0.7)
    for b in range(2):
        d2 = torch.cdist(x[b], x[b]).square().numpy()
        ref = np.exp(-d2 / (2 * 0.7**2 * np.median(d2)))
        np.testing.assert_allclose(got[b].numpy(), ref, rtol=1e-9, atol=1e-12)


def test_compare_gathers_features_for_full_batch_metrics() -> None:
    torch.manual_seed(8)
    net_a, net_b = torch.nn.Sequential(torch.nn.Linear(6, 5)), torch.nn.Sequential(
        torch.nn.Linear(6, 4), torch.nn.Tanh())
    data = [torch.randn(32, 6) for _ in range(3)]
    got = repsim.compare(net_a, net_b, data, "0", "*", metric="cca")
    with torch.no_grad():
        xs = torch.cat(data)
        fa = {"0": net_a[0](xs)}
        fb = {"0": net_b[0](xs), "1": net_b(xs)}
    expected = repsim.similarity(fa, fb, "cca").values
    torch.testing.assert_close(got.values, expected, rtol=0, atol=1e-12)


def test_slices_of_batches_give_the_same_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    import repsim.metrics.engine as engine

    fa, fb = layers(10, 150, 3), layers(11, 150, 2)  # 9 batches of 16, then 6
    whole = repsim.similarity(fa, fb, batch_size=16, keep_batches=True)
    monkeypatch.setattr(engine, "_SLICE_MIN_BATCHES", 1)
    monkeypatch.setattr(engine, "_SLICE_BYTES_PER_THREAD", 1)  # one batch per slice
    assert len(engine.batch_slices(150, 16, 4, 5)) == 10
    sliced = repsim.similarity(fa, fb, batch_size=16, keep_batches=True)
    torch.testing.assert_close(sliced.values, whole.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(sliced.terms.batch_cross),
                               torch.cat(whole.terms.batch_cross), rtol=1e-12, atol=1e-15)
    assert (sliced.terms.n_batches, sliced.terms.n_examples) == (10, 150)
