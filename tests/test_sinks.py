"""The sink protocol: update / state_dict / load_state_dict / merge / compute.

Every streaming metric, the feature cache and the streaming observers: a sink fed two halves and
merged equals one sink fed everything; state round-trips through a safetensors file (the run's
checkpoint); the result does not depend on the forward batch size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import repsim
from repsim import store
from repsim.evaluators.attention import AttentionCollapseEvaluator
from repsim.plugins import build_part, registry
from repsim.run.cache import CacheWriter, CachePlan, FeatureReader
from repsim.run.features import FeatureBatch
from repsim.errors import FeatureError
from repsim.run.sinks import FLUSH_MINIBATCHES, MetricSink, ObserverSink

STREAMING = [p.name for p in registry("metric") if p.create().properties.streaming]
N, MB = 230, 16  # 14 full minibatches, then 6 examples


def features(seed: int, layers: int, dims: tuple[int, ...] = (7, 12, 5)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 4, generator=g, dtype=torch.float64)
    return {f"l{i}": (z @ torch.randn(4, dims[i % len(dims)], generator=g, dtype=torch.float64)
                      + 0.5 * torch.randn(N, dims[i % len(dims)], generator=g,
                                          dtype=torch.float64)).float()
            for i in range(layers)}


MODELS = {"a": features(0, 3), "b": features(1, 2)}
PAIRS = [("a", "b"), ("a", "a")]


def sink(metric: str, keep: bool = False) -> MetricSink:
    return MetricSink(metric, build_part("metric", metric), {m: list(f) for m, f in MODELS.items()},
                      PAIRS, MB, keep_batches=keep)


def feed(s: MetricSink, start: int, stop: int, forward: int) -> None:
    for lo in range(start, stop, forward):
        hi = min(lo + forward, stop)
        s.update_features({m: {k: v[lo:hi] for k, v in f.items()} for m, f in MODELS.items()})


def test_every_registered_streaming_metric_is_covered() -> None:
    assert {"minibatch_cka", "minibatch_rbf_cka"} <= set(STREAMING)


@pytest.mark.parametrize("metric", STREAMING)
@pytest.mark.parametrize("forward", [16, 48, 50, 128, 7])
def test_result_does_not_depend_on_the_forward_batch(metric: str, forward: int) -> None:
    s = sink(metric)
    feed(s, 0, N, forward)
    out = s.compute()
    for a, b in PAIRS:
        expected = repsim.similarity(MODELS[a], MODELS[b], metric=metric, batch_size=MB)
        torch.testing.assert_close(out[(a, b)].values, expected.values, rtol=1e-12, atol=1e-12)
        desc = out[(a, b)].description
        assert (desc["batches"], desc["examples"], desc["batch_size"]) == (15, N, MB)


@pytest.mark.parametrize("metric", STREAMING)
def test_merge_of_two_halves_equals_one_sink_fed_all(metric: str) -> None:
    whole = sink(metric, keep=True)
    feed(whole, 0, N, 40)
    first, second = sink(metric, keep=True), sink(metric, keep=True)
    feed(first, 0, 112, 40)  # a minibatch boundary (7 x 16)
    feed(second, 112, N, 40)  # holds the last, partial minibatch
    first.merge(second)
    w, m = whole.compute(), first.compute()
    for pair in PAIRS:
        torch.testing.assert_close(m[pair].values, w[pair].values, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.cat(m[pair].terms.batch_cross),
                                   torch.cat(w[pair].terms.batch_cross), rtol=1e-12, atol=1e-15)


def test_merge_refuses_two_partial_minibatches() -> None:
    first, second = sink("minibatch_cka"), sink("minibatch_cka")
    feed(first, 0, 20, 20)
    feed(second, 20, 40, 20)
    with pytest.raises(ValueError, match="partial minibatch"):
        first.merge(second)


def test_state_round_trips_through_a_checkpoint_file(tmp_path: Path) -> None:
    whole = sink("minibatch_cka", keep=True)
    feed(whole, 0, N, 50)
    before = sink("minibatch_cka", keep=True)
    feed(before, 0, 100, 50)
    assert before.pending_examples > 0  # the checkpoint holds examples waiting for the engine
    store.write_tensors(tmp_path / "state.safetensors", before.state_dict())
    after = sink("minibatch_cka", keep=True)
    after.load_state_dict(store.read_tensors(tmp_path / "state.safetensors"))
    feed(after, 100, N, 50)
    for pair in PAIRS:
        assert torch.equal(after.compute()[pair].values, whole.compute()[pair].values)


def test_waiting_examples_are_flushed_in_slices_and_state_stays_bounded() -> None:
    s = sink("minibatch_cka")
    feed(s, 0, N, 7)  # forward batches of 7: flushed once 16 minibatches wait
    assert s.pending_examples < FLUSH_MINIBATCHES * MB
    assert int(s.state_dict()["counts"][0]) == (N // (FLUSH_MINIBATCHES * MB)) * FLUSH_MINIBATCHES


def test_nan_features_are_named_with_their_layer() -> None:
    s = sink("minibatch_cka")
    bad = {m: dict(f) for m, f in MODELS.items()}
    bad["b"]["l1"] = bad["b"]["l1"].clone()
    bad["b"]["l1"][3, 0] = float("nan")
    with pytest.raises(FeatureError, match="model 'b', layer 'l1'.*NaN"):
        s.update_features(bad)  # the sums are checked when the engine takes the examples
        s.compute()


def test_a_short_last_minibatch_is_left_out_and_said() -> None:
    s = sink("minibatch_cka")
    feed(s, 0, 35, 35)  # 2 x 16, then 3 < 4 examples
    out = s.compute()[("a", "b")]
    assert out.description["examples"] == 32 and "3 examples" in out.notes[0]


def batch(index: int, lo: int, hi: int, raw: dict[str, dict[str, torch.Tensor]]) -> FeatureBatch:
    return FeatureBatch("eval", index, torch.arange(lo, hi), torch.arange(lo, hi),
                        torch.arange(lo, hi) % 3, {}, raw,
                        {"vit": {"num_prefix_tokens": 1, "family": "vit", "grid_size": (3, 3),
                                 "patch_size": (4, 4)}})


def test_observers_merge_like_one_observer_fed_all() -> None:
    g = torch.Generator().manual_seed(0)
    maps = (torch.randn(12, 2, 10, 10, generator=g) * 2).softmax(-1)
    layers = {"vit": ["blocks.0.attn.attn_drop:in"]}

    def observer() -> ObserverSink:
        return ObserverSink("observer_collapse", AttentionCollapseEvaluator(), layers)

    whole, first, second = observer(), observer(), observer()
    for i, (lo, hi) in enumerate([(0, 5), (5, 12)]):
        b = batch(i, lo, hi, {"vit": {layers["vit"][0]: maps[lo:hi]}})
        whole.update(b)
        (first if i == 0 else second).update(b)
    first.merge(second)
    w, m = whole.state_dict(), first.state_dict()
    assert set(w) == set(m)
    for key in w:
        torch.testing.assert_close(m[key], w[key], rtol=1e-12, atol=1e-12)


def test_cache_writers_of_two_shards_read_as_one(tmp_path: Path) -> None:
    tokens = torch.randn(10, 5, 3)
    plan = CachePlan({("vit", "blocks.0", "cls"), ("vit", "blocks.0", "gap")})
    plan.own[("vit", "blocks.0")] = "cls"
    writers = [CacheWriter(tmp_path / "cache" / "eval", plan, {"vit": 1}, torch.float16)
               for _ in range(2)]
    for i, (lo, hi) in enumerate([(0, 4), (4, 10)]):  # each shard written by its own writer
        writers[i].update(batch(i, lo, hi, {"vit": {"blocks.0": tokens[lo:hi]}}))
    writers[0].merge(writers[1])
    reader = writers[0].compute()
    assert isinstance(reader, FeatureReader)
    cls = reader.features("vit", "blocks.0", "cls", "eval")
    assert cls.dtype == torch.float32
    torch.testing.assert_close(cls, tokens[:, 0].half().float(), rtol=0, atol=0)
    torch.testing.assert_close(reader.features("vit", "blocks.0", "gap", "eval"),
                               tokens.mean(1).half().float(), rtol=0, atol=0)
    assert torch.equal(reader.labels("eval"), torch.arange(10) % 3)
