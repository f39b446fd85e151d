"""Thread pools: torch's OpenMP pool and the BLAS pool numpy/scipy call into.

On a machine with few cores the two pools spin against each other: a multi-threaded torch pool
busy-waits after each parallel region while OpenBLAS's threads want the same cores, and OpenBLAS's
threads spin after each call while torch's want them. numpy/scipy work (the CCA family,
Procrustes, RSA, scikit-learn) therefore runs with one BLAS thread while torch's pool is
multi-threaded, and with all the cores torch leaves free otherwise (see docs/metrics.md for the
measured effect).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # inspecting the loaded libraries once: it costs milliseconds


def blas_threads() -> int:
    """BLAS threads for numpy/scipy work now: 1 beside a multi-threaded torch pool, else the
    cores this process may use."""
    import torch

    return 1 if torch.get_num_threads() > 1 else available_cores()


@contextmanager
def blas_pool(threads: int | None = None) -> Iterator[None]:
    """Limit the BLAS pool (OpenBLAS, MKL, BLIS) to ``threads`` (default :func:`blas_threads`)
    for the block."""
    with _controller().limit(limits=threads or blas_threads(), user_api="blas"):
        yield
