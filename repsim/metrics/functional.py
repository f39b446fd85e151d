"""Every built-in similarity metric as a plain function of two ``[N, D]`` tensors (features
flattened past dim 0, examples in the same order). The registry entries wrap the same code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _pair(metric, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    from repsim.metrics.engine import similarity_matrix, warn_notes

    result = similarity_matrix(metric, {"x": x}, {"y": y}, batch_size)
    warn_notes(result.notes)
    return float(result.values[0, 0])


def minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> float:
    """Minibatch linear CKA with the unbiased HSIC_1 (seeds eq. 3-4), consecutive batches."""
    from repsim.metrics.cka import MinibatchCKA

    return _pair(MinibatchCKA(name="minibatch_cka"), x, y, batch_size)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA of Kornblith et al. (2019) on all examples; ``debiased`` uses HSIC_1."""
    from repsim.metrics.cka import LinearCKA, LinearCKAParams

    return _pair(LinearCKA(LinearCKAParams(debiased=debiased)), x, y)


def hsic1(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 - the seeds' notation
    """Unbiased HSIC_1 of two ``[n, n]`` kernel matrices (seeds eq. 4, via U-centring)."""
    from repsim.metrics.cka import u_centre

    uk, ul = u_centre(k.double()[None]), u_centre(l.double()[None])
    return float((uk * ul).sum())


__all__ = ["hsic1", "linear_cka", "minibatch_cka"]
