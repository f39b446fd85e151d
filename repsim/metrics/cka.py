"""Centred kernel alignment: the product's own engine.

``minibatch_cka`` is the estimator of the seeds (Appendix A, eq. 3-4; Nguyen et al. 2021): the
unbiased HSIC_1 of Song et al. (2012), summed over minibatches, normalised at the end. HSIC_1 equals
the inner product of U-centred Gram matrices divided by n(n-3), so each batch's Gram is U-centred
once and the inner products of all layer pairs come from one GEMM (see ``engine``).

``linear_cka`` is Kornblith et al. (2019) with the biased HSIC on all examples at once
(``debiased=True`` uses HSIC_1 on the full batch instead). ``rbf_cka`` and ``minibatch_rbf_cka``
are the same with a Gaussian kernel whose bandwidth follows Kornblith's code: σ = threshold ·
sqrt(median of the n² squared distances, diagonal included).

Written by hand rather than taken from a library because the peers loop over layer pairs in Python
and some average per-batch CKA values, which is a different (biased) quantity.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from repsim.metrics.base import MetricProperties, StreamingMetric

if TYPE_CHECKING:
    import torch

# Variation below this many float32 ulps of a batch's magnitude is rounding noise, not signal.
_CONSTANT_RTOL = 16 * 1.1920929e-07
# Centring and the Gram GEMM run on chunks of batches of about this size per thread: measured on
# 2 cores, chunks that stay in L2 beat one big bmm by 2x at 12480-d (the centred copy never
# reaches DRAM) and tie with it at 768-d; fewer, larger chunks mean fewer parallel regions.
_CHUNK_BYTES_PER_THREAD = 1 << 20


def _chunk_bytes() -> int:
    import torch

    return _CHUNK_BYTES_PER_THREAD * torch.get_num_threads()


def _grams_into(x: torch.Tensor, out: torch.Tensor, first_norm: torch.Tensor) -> None:
    """Centred linear Grams of ``[B, n, D]`` features into float32 ``out`` ``[B, n, n]``, and
    the norm of each batch's first example into float32 ``first_norm`` ``[B]`` (the scale of the
    constant test)."""
    import torch

    b, n, d = x.shape
    step = max(1, _chunk_bytes() // max(1, n * d * 4))
    for s in range(0, b, step):
        xb = x[s : s + step].float()
        xc = xb - xb.mean(dim=1, keepdim=True)
        torch.bmm(xc, xc.transpose(1, 2), out=out[s : s + step])
    torch.linalg.vector_norm(x[:, 0, :].float(), dim=-1, out=first_norm)


def _constant(gram: torch.Tensor, first_norm: torch.Tensor) -> torch.Tensor:
    """Which batches of Grams ``[..., n, n]`` come from features constant to within rounding.

    The test is ``||x - mean||²_F <= rtol² · n · ||x_0||²``. When it holds, x_0 is within
    rtol·sqrt(n) of the mean, so ``n ||x_0||²`` is ``||x||²_F`` to that precision: this is the
    relative test ``||x - mean||_F <= rtol ||x||_F``, without a second pass over the features.
    """
    import torch

    n = gram.shape[-1]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float64)
    return trace <= _CONSTANT_RTOL**2 * n * first_norm.double().square()


def centred_grams(x: torch.Tensor) -> torch.Tensor:
    """``[B, n, D]`` → linear Gram matrices of the batch-centred features, ``[B, n, n]`` float64.

    The GEMM runs in float32 on centred features (precise enough, and the time floor); batches
    whose features are constant to within rounding get an exactly-zero Gram.
    """
    import torch

    b, n = x.shape[:2]
    g32 = torch.empty(b, n, n, dtype=torch.float32, device=x.device)
    first = torch.empty(b, dtype=torch.float32, device=x.device)
    _grams_into(x, g32, first)
    gram = g32.double()
    gram[_constant(gram, first)] = 0.0
    return gram


def _u_centre_(k: torch.Tensor) -> torch.Tensor:
    """In-place U-centring of symmetric kernels ``[..., n, n]``, scaled by 1/sqrt(n(n-3)) (see
    :func:`u_centre`); the input diagonal is ignored. Row sums are taken in float64."""
    import torch

    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"HSIC_1 needs at least 4 examples per batch, got {n}")
    row = k.sum(-1, dtype=torch.float64) - k.diagonal(dim1=-2, dim2=-1)  # off-diagonal sums
    # u_ij = k_ij - (r_i + r_j)/(n-2) + t/((n-1)(n-2)): split the constant between the two terms.
    row -= row.sum(-1, keepdim=True) / (2 * (n - 1))
    row = (row * (1.0 / (n - 2))).to(k.dtype)
    k.sub_(row[..., :, None]).sub_(row[..., None, :])
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k.mul_((1.0 / (n * (n - 3))) ** 0.5)


def u_centre(k: torch.Tensor) -> torch.Tensor:
    """U-centre ``[B, n, n]`` symmetric kernels (Székely & Rizzo 2014), scaled by 1/sqrt(n(n-3)).

    With that scale, ``<u_centre(K), u_centre(L)>`` is exactly the HSIC_1 of eq. 4 of the seeds.
    """
    import torch

    return _u_centre_(k.to(torch.float64, copy=True))


def _double_centre_(k: torch.Tensor) -> torch.Tensor:
    """In-place ``H K H`` of ``[..., n, n]`` symmetric kernels (the biased HSIC's centring)."""
    row = k.mean(-1)
    row -= row.mean(-1, keepdim=True) / 2
    return k.sub_(row[..., :, None]).sub_(row[..., None, :])


def rbf_from_gram_(gram: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place: linear Grams ``[..., n, n]`` → Gaussian kernels exp(-d²/(2σ²)) per batch.

    σ² = threshold² · median of the n² squared distances, diagonal zeros included (Kornblith et
    al.'s ``gram_rbf``). A batch whose median distance is 0 gets an all-zero kernel (undefined).
    """
    import torch

    sq_norms = gram.diagonal(dim1=-2, dim2=-1).clone()
    gram.mul_(-2).add_(sq_norms[..., :, None]).add_(sq_norms[..., None, :]).clamp_(min=0)
    flat = gram.reshape(-1, gram.shape[-1] ** 2)
    m = flat.shape[1]
    # The median of an even count averages the two middle values, as numpy's does.
    median = flat.kthvalue((m + 1) // 2, dim=1).values
    if m % 2 == 0:
        median = (median + flat.kthvalue(m // 2 + 1, dim=1).values) / 2
    undefined = median <= 0
    scale = -1.0 / (2 * threshold**2 * torch.where(undefined, 1.0, median))
    flat.mul_(scale[:, None]).exp_()
    if bool(undefined.any()):
        flat[undefined] = 0.0
    return gram


class _KernelCKA(StreamingMetric):
    """A CKA whose embedding is one centred kernel matrix per batch, flattened.

    ``embed_many`` forms the float32 Grams of a group of layers (about ``4 · _chunk_bytes()`` of
    float64 output) and right away, while they are in cache, ``_finish`` turns them (in place)
    into the final float64 embedding in one preallocated buffer for all layers: few,
    cache-resident tensor operations, and no stacking copies.
    """

    @abstractmethod
    def _finish(self, grams: torch.Tensor, out: torch.Tensor) -> None:
        """Float32 centred linear Grams ``[..., n, n]`` (may be overwritten) → the float64
        embedding in ``out``."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_many([x])[0]

    def embed_many(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        b, n = xs[0].shape[:2]
        out = torch.empty(len(xs), b, n, n, dtype=torch.float64, device=xs[0].device)
        first = torch.empty(len(xs), b, dtype=torch.float32, device=xs[0].device)
        # One group when called by the engine on a cache-sized slice of batches.
        group = max(1, min(len(xs), 4 * _chunk_bytes() // (b * n * n * 8)))
        g32 = torch.empty(group, b, n, n, dtype=torch.float32, device=xs[0].device)
        for start in range(0, len(xs), group):
            stop = min(start + group, len(xs))
            for i in range(start, stop):
                _grams_into(xs[i], g32[i - start], first[i])
            grams = g32[: stop - start]
            constant = _constant(grams, first[start:stop])  # before _finish changes grams
            self._finish(grams, out[start:stop])
            if bool(constant.any()):  # the embedding of a zero Gram is zero
                out[start:stop][constant] = 0.0
        return out.reshape(len(xs), b, n * n)


class MinibatchCKAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int | None = Field(
        None, ge=4, description="estimator minibatch in a run (default: run.batch_size; the "
        "seeds use 32)")


class MinibatchCKA(_KernelCKA):
    """Linear CKA from the unbiased HSIC_1 summed over minibatches."""

    min_batch_size: ClassVar[int] = 4
    u_centred: ClassVar[bool] = True
    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(-1.0, 1.0),  # HSIC_1 can be slightly negative for unrelated features
        invariances=("orthogonal", "isotropic_scaling", "translation", "permutation"),
        streaming=True,
        estimator="unbiased HSIC_1 (Song et al. 2012) summed over consecutive minibatches, "
        "normalised after summation (Nguyen et al. 2021; seeds eq. 3-4)",
        min_examples=4,
    )

    def _finish(self, grams: torch.Tensor, out: torch.Tensor) -> None:
        # U-centring the float32 Grams in cache rounds each entry to ~1e-7 of its size, as the
        # Gram GEMM itself does; the inner products and sums over batches are float64.
        out.copy_(_u_centre_(grams))


class LinearCKAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    debiased: bool = Field(False, description="unbiased HSIC_1 instead of the biased tr(KHLH)")


class LinearCKA(_KernelCKA):
    """Linear CKA on all examples at once (Kornblith et al. 2019).

    Biased HSIC (``tr(KHLH)``) by default; ``debiased=True`` uses HSIC_1, which equals
    ``minibatch_cka`` with one batch of all examples. Implemented as a streaming metric with a
    single batch so every layer pair still comes from one GEMM; memory is O(N²) per layer.
    """

    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(0.0, 1.0),
        invariances=("orthogonal", "isotropic_scaling", "translation", "permutation"),
        streaming=False,
        estimator="biased HSIC tr(KHLH)/(n-1)^2 on all examples (Kornblith et al. 2019)",
        min_examples=2,
    )

    def __init__(self, params: LinearCKAParams | None = None, name: str | None = None) -> None:
        super().__init__(params or LinearCKAParams(), name or "linear_cka")
        self.debiased = bool(self.params.debiased)  # type: ignore[union-attr]
        if self.debiased:
            self.min_batch_size = 4  # type: ignore[misc]
            self.properties = replace(  # type: ignore[misc]
                type(self).properties, range=(-1.0, 1.0), min_examples=4,
                estimator="unbiased HSIC_1 (Song et al. 2012) on all examples at once")

    def _finish(self, grams: torch.Tensor, out: torch.Tensor) -> None:
        if self.debiased:
            _u_centre_(grams)
        # Centring the features centres the Gram (HKH); 1/(n-1)^2 cancels in CKA.
        out.copy_(grams)

    def matrix(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        batch_size: int | None = None,
        row_names: Sequence[str] | None = None,
        col_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        return super().matrix(xs, ys, None, row_names, col_names)


class RBFCKAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(1.0, gt=0, description="σ as a fraction of the median distance")
    debiased: bool = Field(False, description="unbiased HSIC_1 instead of the biased tr(KHLH)")


class RBFCKA(LinearCKA):
    """CKA with a Gaussian kernel on all examples at once (Kornblith et al. 2019, their
    ``cka(gram_rbf(x, threshold), gram_rbf(y, threshold))``); ``debiased`` uses HSIC_1."""

    properties: ClassVar[MetricProperties] = replace(
        LinearCKA.properties,
        estimator="biased HSIC on Gaussian kernels, σ = threshold·sqrt(median squared distance "
        "over all n² pairs), all examples at once (Kornblith et al. 2019)",
    )

    def __init__(self, params: RBFCKAParams | None = None, name: str | None = None) -> None:
        params = params or RBFCKAParams()
        super().__init__(params, name or "rbf_cka")  # type: ignore[arg-type]
        self.threshold = float(params.threshold)
        if self.debiased:
            self.properties = replace(  # type: ignore[misc]
                self.properties,
                estimator="unbiased HSIC_1 on Gaussian kernels, σ = threshold·sqrt(median squared "
                "distance over all n² pairs), all examples at once")

    def _finish(self, grams: torch.Tensor, out: torch.Tensor) -> None:
        kernel = rbf_from_gram_(out.copy_(grams), self.threshold)
        if self.debiased:
            _u_centre_(kernel)
        else:
            _double_centre_(kernel)


class MinibatchRBFCKAParams(MinibatchCKAParams):
    threshold: float = Field(1.0, gt=0, description="σ as a fraction of the median distance")


class MinibatchRBFCKA(_KernelCKA):
    """Gaussian-kernel CKA from HSIC_1 summed over minibatches; each batch's bandwidth comes
    from that batch's median squared distance."""

    min_batch_size: ClassVar[int] = 4
    u_centred: ClassVar[bool] = True
    properties: ClassVar[MetricProperties] = replace(
        MinibatchCKA.properties,
        estimator="unbiased HSIC_1 on Gaussian kernels summed over consecutive minibatches, "
        "σ = threshold·sqrt(median squared distance over the batch's n² pairs)",
    )

    def __init__(self, params: MinibatchRBFCKAParams | None = None,
                 name: str | None = None) -> None:
        params = params or MinibatchRBFCKAParams()
        super().__init__(params, name or "minibatch_rbf_cka")
        self.threshold = float(params.threshold)

    def _finish(self, grams: torch.Tensor, out: torch.Tensor) -> None:
        _u_centre_(rbf_from_gram_(out.copy_(grams), self.threshold))

