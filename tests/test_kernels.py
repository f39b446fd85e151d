"""The stored minibatch kernels give the minibatch CKA of an all-float64 computation and of the
in-memory engine, whatever the forward batches, and refuse kernels that do not fit the plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repsim.errors import FeatureError
from repsim.metrics.cka import MinibatchCKA
from repsim.run.kernels import KernelSink, kernel_dir, pair_results
from repsim.run.sinks import MetricSink

N, MB = 68, 16  # four minibatches of 16 and a short last one of 4


def features() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, 48, generator=g)
    return {"a": {f"l{i}": base @ torch.randn(48, 40, generator=g) + 3.0 for i in range(3)},
            "b": {f"l{i}": torch.randn(N, 24, generator=g) + base[:, :24] for i in range(2)}}


def hsic1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ over minibatches of the unbiased HSIC_1 (Song et al. 2012), all in float64."""
    def u(k: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        k = k.clone().fill_diagonal_(0)
        r = k.sum(1)
        out = k - (r[:, None] + r[None, :]) / (n - 2) + r.sum() / ((n - 1) * (n - 2))
        return out.fill_diagonal_(0)
    total = 0.0
    for s in range(0, N, MB):
        xa, ya = x[s : s + MB].double(), y[s : s + MB].double()
        xa, ya = xa - xa.mean(0), ya - ya.mean(0)
        n = xa.shape[0]
        total += float((u(xa @ xa.T) * u(ya @ ya.T)).sum()) / (n * (n - 3))
    return total


def stored(tmp_path: Path, forward: int) -> KernelSink:
    feats, metric = features(), MinibatchCKA(name="minibatch_cka")
    layers = {m: list(v) for m, v in feats.items()}
    sink = KernelSink("k", metric, layers, MB,
                      {m: kernel_dir(tmp_path, "minibatch_cka", m) for m in layers})
    for s in range(0, N, forward):
        sink.update_features({m: {k: t[s : s + forward] for k, t in v.items()}
                              for m, v in feats.items()})
    sink.close()
    return sink


def results(tmp_path: Path, keep: bool = False):
    layers = {m: list(v) for m, v in features().items()}
    return pair_results(MinibatchCKA(name="minibatch_cka"), "minibatch_cka", tmp_path, layers,
                        [("a", "b"), ("a", "a")], MB, N, MB, 1, keep)


@pytest.mark.parametrize("forward", [5, 16, 68])
def test_kernels_give_the_float64_minibatch_cka(tmp_path: Path, forward: int) -> None:
    stored(tmp_path, forward)
    res = results(tmp_path)[("a", "b")]
    feats = features()
    xs, ys = list(feats["a"].values()), list(feats["b"].values())
    cross = torch.tensor([[hsic1(x, y) for y in ys] for x in xs], dtype=torch.float64)
    cka = cross / torch.outer(torch.tensor([hsic1(x, x) for x in xs]),
                              torch.tensor([hsic1(y, y) for y in ys])).sqrt()
    # float32 Grams: ~1e-7 of each entry, as the in-memory engine
    torch.testing.assert_close(res.values, cka, rtol=1e-6, atol=0)
    assert (res.terms.n_batches, res.terms.n_examples) == (5, 68)


def test_kernels_equal_the_in_memory_sink_and_keep_bootstrap_terms(tmp_path: Path) -> None:
    stored(tmp_path, 16)
    feats = features()
    sink = MetricSink("m", MinibatchCKA(name="minibatch_cka"), {m: list(v) for m, v in
                                                                feats.items()},
                      [("a", "b"), ("a", "a")], MB, keep_batches=True)
    sink.update_features(feats)
    sink.close()
    memory = sink.compute()
    kept = results(tmp_path, keep=True)
    for pair in memory:
        torch.testing.assert_close(kept[pair].values, memory[pair].values, rtol=1e-6, atol=1e-9)
        assert kept[pair].terms.batch_cross[0].shape == memory[pair].terms.batch_cross[0].shape
        torch.testing.assert_close(kept[pair].terms.batch_cross[0].sum(0), kept[pair].terms.cross)
    # the same stored bytes give the same result bytes
    assert torch.equal(results(tmp_path)[("a", "b")].values, kept[("a", "b")].values)


def test_missing_kernels_are_refused(tmp_path: Path) -> None:
    stored(tmp_path, 16)
    sorted(kernel_dir(tmp_path, "minibatch_cka", "b").glob("*.safetensors"))[0].unlink()
    with pytest.raises(FeatureError, match="jump from minibatch 0"):
        results(tmp_path)
