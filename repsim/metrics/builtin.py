"""Built-in metrics, registered through the same hook as a plugin's.

Only pydantic parameter models and metric classes are imported here, from modules that import
torch, numpy and scipy inside their functions, so collecting the registry stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from repsim.hookspecs import Register, hookimpl


def _builder(cls: type, name: str) -> Callable[[Any], Any]:
    def build(params: Any) -> Any:
        return cls(params, name)

    build.__name__ = f"build_{name}"
    return build


@hookimpl
def register_metrics(register: Register) -> None:
    from repsim.metrics.cca import CCA, PWCCA, SVCCA, CCAParams, PWCCAParams, SVCCAParams
    from repsim.metrics.cka import (
        RBFCKA,
        LinearCKA,
        LinearCKAParams,
        MinibatchCKA,
        MinibatchCKAParams,
        MinibatchRBFCKA,
        MinibatchRBFCKAParams,
        RBFCKAParams,
    )
    from repsim.metrics.knn import MutualKNN, MutualKNNParams
    from repsim.metrics.procrustes import Procrustes, ProcrustesParams
    from repsim.metrics.rsa import RSA, RSAParams

    entries: list[tuple[str, type, type, str]] = [
        ("minibatch_cka", MinibatchCKA, MinibatchCKAParams,
         "Linear CKA, unbiased HSIC_1 summed over minibatches (the seeds' estimator)"),
        ("linear_cka", LinearCKA, LinearCKAParams,
         "Linear CKA on all examples (Kornblith et al. 2019); debiased option"),
        ("rbf_cka", RBFCKA, RBFCKAParams,
         "Gaussian-kernel CKA on all examples, median-distance bandwidth; debiased option"),
        ("minibatch_rbf_cka", MinibatchRBFCKA, MinibatchRBFCKAParams,
         "Gaussian-kernel CKA, HSIC_1 summed over minibatches, per-batch median bandwidth"),
        ("cca", CCA, CCAParams,
         "Mean canonical correlation (R²_CCA option); needs N > rank x + rank y"),
        ("svcca", SVCCA, SVCCAParams,
         "SVD to 99% of the variance, then mean canonical correlation (Raghu et al. 2017)"),
        ("pwcca", PWCCA, PWCCAParams,
         "Projection-weighted CCA (Morcos et al. 2018); not symmetric"),
        ("procrustes", Procrustes, ProcrustesParams,
         "Orthogonal Procrustes similarity of centred, unit-norm features; distance option"),
        ("rsa", RSA, RSAParams, "Spearman correlation of 1 - Pearson RDMs"),
        ("mutual_knn", MutualKNN, MutualKNNParams,
         "Mutual k-nearest-neighbour alignment (Huh et al. 2024)"),
    ]
    for name, cls, params, summary in entries:
        register(name, _builder(cls, name), params=params, summary=summary,
                 **cls.properties.as_info())
