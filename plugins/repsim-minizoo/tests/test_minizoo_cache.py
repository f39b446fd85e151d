"""Cache keys, hits and misses, and atomic writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from repsim_minizoo import cache, config, zoo
from repsim_minizoo.config import TINY


@pytest.fixture
def counted_pretrain(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace training by a stub returning a fixed state; record each call."""
    calls: list[str] = []

    def fake(objective: str, preset: Any, seed: int, progress: bool = True):
        calls.append(objective)
        return {"w": torch.full((2, 3), float(seed))}, {"loss_final": 0.5, "train_seconds": 0.0}

    monkeypatch.setattr("repsim_minizoo.train.pretrain", fake)
    return calls


def test_cache_root_follows_repsim_cache(tmp_cache: Path) -> None:
    assert cache.cache_root() == tmp_cache / "minizoo"


def test_miss_trains_then_hit_loads(counted_pretrain: list[str], tmp_cache: Path) -> None:
    state, record, path = zoo.pretrained("mae", "tiny", seed=0, progress=False)
    assert counted_pretrain == ["mae"]
    assert path.is_file() and path.parent == tmp_cache / "minizoo"
    assert json.loads(cache.sidecar_path(path).read_text())["loss_final"] == 0.5
    again, record2, path2 = zoo.pretrained("mae", "tiny", seed=0, progress=False)
    assert counted_pretrain == ["mae"]  # hit: no second training
    assert path2 == path and torch.equal(again["w"], state["w"])
    assert record2["loss_final"] == 0.5
    zoo.pretrained("mae", "tiny", seed=1, progress=False)  # another seed: another entry
    assert counted_pretrain == ["mae", "mae"]


def test_key_depends_on_config_and_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    base = zoo.pretrained_key("mae", TINY, 0)
    assert zoo.pretrained_key("mae", TINY, 0) == base
    assert zoo.pretrained_key("mae", TINY, 1) != base
    assert zoo.pretrained_key("dino", TINY, 0) != base
    longer = dataclasses.replace(TINY, schedules={
        **TINY.schedules, "mae": dataclasses.replace(TINY.schedules["mae"], steps=7)})
    assert zoo.pretrained_key("mae", longer, 0) != base
    monkeypatch.setattr(config, "CODE_VERSION", "test-bump")
    assert zoo.pretrained_key("mae", TINY, 0) != base


def test_interrupted_write_leaves_nothing_loadable(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_cache: Path) -> None:
    import safetensors.torch

    path = cache.entry_path("mae", "0123")

    def half_then_interrupt(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # half a header
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.save_weights(path, {"w": torch.ones(3)}, {})
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temporary debris either
    assert cache.load_weights(path) is None


def test_damaged_entry_is_a_miss_and_gets_retrained(counted_pretrain: list[str]) -> None:
    path = cache.entry_path("mae", zoo.pretrained_key("mae", TINY, 0))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")  # e.g. written by something non-atomic
    zoo.pretrained("mae", "tiny", seed=0, progress=False)
    assert counted_pretrain == ["mae"]
    assert cache.load_weights(path) is not None


def test_entry_weights_hold_their_record(tmp_cache: Path) -> None:
    path = cache.entry_path("x", "k")
    cache.save_weights(path, {"w": torch.arange(4.0)}, {"loss_final": 1.25})
    assert cache.read_meta(path) == {"loss_final": 1.25}  # no sidecar: from the file itself
    cache.write_json(cache.sidecar_path(path), {"loss_final": 1.5})
    assert cache.read_meta(path) == {"loss_final": 1.5}
