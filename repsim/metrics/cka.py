"""Centred kernel alignment: the product's own engine.

``minibatch_cka`` is the estimator of the seeds (Appendix A, eq. 3-4; Nguyen et al. 2021): the
unbiased HSIC_1 of Song et al. (2012), summed over minibatches, normalised at the end. HSIC_1 equals
the inner product of U-centred Gram matrices divided by n(n-3), so each batch's Gram is U-centred
once and the inner products of all layer pairs come from one GEMM (see ``engine``).

``linear_cka`` is Kornblith et al. (2019) with the biased HSIC on all examples at once
(``debiased=True`` uses HSIC_1 on the full batch instead).

Written by hand rather than taken from a library because the peers loop over layer pairs in Python
and some average per-batch CKA values, which is a different (biased) quantity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from repsim.metrics.base import MetricProperties, StreamingMetric

if TYPE_CHECKING:
    import torch

# Variation below this many float32 ulps of a layer's magnitude is rounding noise, not signal.
_CONSTANT_RTOL = 16 * 1.1920929e-07


def centred_grams(x: torch.Tensor) -> torch.Tensor:
    """``[B, n, D]`` → linear Gram matrices of the batch-centred features, ``[B, n, n]`` float64.

    The GEMM runs in float32 on centred features (precise enough, and the time floor); batches
    whose features are constant to within rounding get an exactly-zero Gram.
    """
    import torch

    x = x.float()
    xc = x - x.mean(dim=1, keepdim=True)
    gram = torch.bmm(xc, xc.transpose(1, 2)).double()
    spread = xc.abs().amax(dim=(1, 2))
    scale = x.abs().amax(dim=(1, 2))
    constant = spread <= _CONSTANT_RTOL * scale
    if bool(constant.any()):
        gram[constant] = 0.0
    return gram


def u_centre(k: torch.Tensor) -> torch.Tensor:
    """U-centre ``[B, n, n]`` symmetric kernels (Székely & Rizzo 2014), scaled by 1/sqrt(n(n-3)).

    With that scale, ``<u_centre(K), u_centre(L)>`` is exactly the HSIC_1 of eq. 4 of the seeds.
    """
    import torch

    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"HSIC_1 needs at least 4 examples per batch, got {n}")
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    row = k.sum(-1)  # [B, n]; symmetric, so column sums are the same
    total = row.sum(-1)  # [B]
    u = k - row[:, :, None] / (n - 2) - row[:, None, :] / (n - 2)
    u += (total / ((n - 1) * (n - 2)))[:, None, None]
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u * (1.0 / (n * (n - 3))) ** 0.5


class MinibatchCKAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MinibatchCKA(StreamingMetric):
    """Linear CKA from the unbiased HSIC_1 summed over minibatches."""

    min_batch_size: ClassVar[int] = 4
    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(-1.0, 1.0),  # HSIC_1 can be slightly negative for unrelated features
        invariances=("orthogonal", "isotropic_scaling", "translation"),
        streaming=True,
        estimator="unbiased HSIC_1 (Song et al. 2012) summed over consecutive minibatches, "
        "normalised after summation (Nguyen et al. 2021; seeds eq. 3-4)",
        min_examples=4,
    )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return u_centre(centred_grams(x)).reshape(x.shape[0], -1)


class LinearCKAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    debiased: bool = False


class LinearCKA(StreamingMetric):
    """Linear CKA on all examples at once (Kornblith et al. 2019).

    Biased HSIC (``tr(KHLH)``) by default; ``debiased=True`` uses HSIC_1, which equals
    ``minibatch_cka`` with one batch of all examples. Implemented as a streaming metric with a
    single batch so every layer pair still comes from one GEMM; memory is O(N²) per layer.
    """

    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(0.0, 1.0),
        invariances=("orthogonal", "isotropic_scaling", "translation"),
        streaming=False,
        estimator="biased HSIC tr(KHLH)/(n-1)^2 on all examples (Kornblith et al. 2019)",
        min_examples=2,
    )

    def __init__(self, params: LinearCKAParams | None = None, name: str | None = None) -> None:
        super().__init__(params or LinearCKAParams(), name or "linear_cka")
        if self.params.debiased:  # type: ignore[union-attr]
            self.min_batch_size = 4  # type: ignore[misc]

    def describe(self) -> dict:
        desc = super().describe()
        if self.params.debiased:  # type: ignore[union-attr]
            desc["estimator"] = "unbiased HSIC_1 (Song et al. 2012) on all examples at once"
            desc["range"] = [-1.0, 1.0]
        return desc

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        gram = centred_grams(x)
        if self.params.debiased:  # type: ignore[union-attr]
            return u_centre(gram).reshape(x.shape[0], -1)
        # Centring the features centres the Gram (HKH); the 1/(n-1)^2 factor cancels in CKA.
        return gram.reshape(x.shape[0], -1)

    def matrix(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        batch_size: int | None = None,
    ) -> torch.Tensor:
        from repsim.metrics.engine import pair_terms_from_features

        return self.finalize(pair_terms_from_features(self, xs, ys, None))
