"""Every built-in similarity metric as a plain function of two ``[N, D]`` tensors (features
flattened past dim 0, examples in the same order). The registry entries wrap the same code.

Unusable input raises :class:`repsim.errors.FeatureError` naming the metric and the input: NaN/Inf,
mismatched N, too few examples, and (here, where a single value is asked for) features without
variation, for which the metric is undefined. Matrices of many layers report such a layer as NaN
with a note instead, so that one dead layer does not hide the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from repsim.metrics.inference import bootstrap_cka

if TYPE_CHECKING:
    import torch

    from repsim.metrics.base import Metric
    from repsim.metrics.inference import Features, PermutationResult


def _pair(metric: Metric, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    from repsim.errors import FeatureError
    from repsim.metrics.engine import similarity_matrix

    result = similarity_matrix(metric, {"x": x}, {"y": y}, batch_size)
    value = float(result.values[0, 0])
    if value != value:
        why = " ".join(result.notes) or "the value is undefined (NaN)."
        raise FeatureError(
            f"metric '{metric.name}': {why} Pass features that vary across examples (a constant "
            "layer, e.g. a dead ReLU or a constant token, has no similarity to anything)."
        )
    return value


def minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> float:
    """Minibatch linear CKA with the unbiased HSIC_1 (seeds eq. 3-4), consecutive batches."""
    from repsim.metrics.cka import MinibatchCKA

    return _pair(MinibatchCKA(name="minibatch_cka"), x, y, batch_size)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA of Kornblith et al. (2019) on all examples; ``debiased`` uses HSIC_1."""
    from repsim.metrics.cka import LinearCKA, LinearCKAParams

    return _pair(LinearCKA(LinearCKAParams(debiased=debiased)), x, y)


def rbf_cka(x: torch.Tensor, y: torch.Tensor, threshold: float = 1.0,
            debiased: bool = False) -> float:
    """Gaussian-kernel CKA on all examples, σ = threshold · sqrt(median squared distance)."""
    from repsim.metrics.cka import RBFCKA, RBFCKAParams

    return _pair(RBFCKA(RBFCKAParams(threshold=threshold, debiased=debiased)), x, y)


def minibatch_rbf_cka(x: torch.Tensor, y: torch.Tensor, threshold: float = 1.0,
                      batch_size: int = 32) -> float:
    """Gaussian-kernel CKA from HSIC_1 summed over minibatches (per-batch median bandwidth)."""
    from repsim.metrics.cka import MinibatchRBFCKA, MinibatchRBFCKAParams

    return _pair(MinibatchRBFCKA(MinibatchRBFCKAParams(threshold=threshold)), x, y, batch_size)


def cca(x: torch.Tensor, y: torch.Tensor, r2: bool = False) -> float:
    """Mean canonical correlation (``r2``: mean squared, R²_CCA); needs N > rank x + rank y."""
    from repsim.metrics.cca import CCA, CCAParams

    return _pair(CCA(CCAParams(r2=r2)), x, y)


def svcca(x: torch.Tensor, y: torch.Tensor, keep: float = 0.99) -> float:
    """SVCCA: SVD keeping ``keep`` of each layer's variance, then mean canonical correlation."""
    from repsim.metrics.cca import SVCCA, SVCCAParams

    return _pair(SVCCA(SVCCAParams(keep=keep)), x, y)


def pwcca(x: torch.Tensor, y: torch.Tensor) -> float:
    """Projection-weighted CCA (Morcos et al. 2018); weights from the lower-rank input."""
    from repsim.metrics.cca import PWCCA

    return _pair(PWCCA(), x, y)


def procrustes(x: torch.Tensor, y: torch.Tensor, distance: bool = False) -> float:
    """Orthogonal Procrustes similarity ``||X̂ᵀŶ||_*`` in [0, 1] of centred, unit-norm features;
    ``distance`` gives ``sqrt(2 - 2·similarity)``."""
    from repsim.metrics.procrustes import Procrustes, ProcrustesParams

    return _pair(Procrustes(ProcrustesParams(distance=distance)), x, y)


def rsa(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman correlation of the two ``1 - Pearson`` representational dissimilarity matrices."""
    from repsim.metrics.rsa import RSA

    return _pair(RSA(), x, y)


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): mean fraction of shared cosine neighbours."""
    from repsim.metrics.knn import MutualKNN, MutualKNNParams

    return _pair(MutualKNN(MutualKNNParams(k=k)), x, y)


def permutation_test(feats_a: Features, feats_b: Features, metric: str | Metric = "minibatch_cka",
                     *, batch_size: int = 32, n_permutations: int = 1000, seed: int = 0,
                     **params: Any) -> PermutationResult:
    """Permutation test of association for every layer pair; ``metric`` is a registry name
    (with ``params``) or a metric object. See :func:`repsim.metrics.inference.permutation_test`."""
    from repsim.metrics import inference
    from repsim.metrics.base import Metric

    if isinstance(metric, str):
        from repsim.plugins import build_part

        metric = build_part("metric", metric, **params)
    elif params:
        raise TypeError("pass parameters when building the metric object, not both")
    assert isinstance(metric, Metric)
    return inference.permutation_test(feats_a, feats_b, metric, batch_size=batch_size,
                                      n_permutations=n_permutations, seed=seed)


def hsic1(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 - the seeds' notation
    """Unbiased HSIC_1 of two ``[n, n]`` kernel matrices (seeds eq. 4, via U-centring)."""
    from repsim.metrics.cka import u_centre

    uk, ul = u_centre(k.double()[None]), u_centre(l.double()[None])
    return float((uk * ul).sum())


__all__ = [
    "bootstrap_cka",
    "cca",
    "hsic1",
    "linear_cka",
    "minibatch_cka",
    "minibatch_rbf_cka",
    "mutual_knn",
    "permutation_test",
    "procrustes",
    "pwcca",
    "rbf_cka",
    "rsa",
    "svcca",
]
