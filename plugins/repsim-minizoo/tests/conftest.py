"""Every test gets its own empty ``REPSIM_CACHE``; nothing touches the user's cache.

One thread: the tiny test models gain nothing from more, and a busy machine (other test runs)
makes oversubscribed threads crawl."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    cache = tmp_path / "cache"
    monkeypatch.setenv("REPSIM_CACHE", str(cache))
    monkeypatch.setenv("REPSIM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield cache
    torch.set_num_threads(threads)
