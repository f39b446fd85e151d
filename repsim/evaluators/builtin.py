"""Built-in evaluators, registered through the same hook as a plugin's.

Only the pydantic parameter models are imported here; each evaluator's module (and torch) is
imported when a recipe builds it.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from repsim.evaluators.base import Evaluator
from repsim.evaluators.params import (AgreementParams, AttentionCollapseParams,
                                      AttentionDistanceParams, CkaDepthParams, FourierParams,
                                      KnnParams, LinearProbeParams, MlpProbeParams,
                                      PathEfficiencyParams)
from repsim.hookspecs import Register, hookimpl


def _lazy(module: str, cls: str, name: str) -> Callable[[BaseModel], Evaluator]:
    """A builder that imports the evaluator's module (and torch) only when a recipe builds it."""

    def build(params: BaseModel) -> Evaluator:
        import importlib

        return getattr(importlib.import_module(f"repsim.evaluators.{module}"), cls)(params, name)

    return build


@hookimpl
def register_evaluators(register: Register) -> None:
    register("knn", _lazy("knn", "KnnEvaluator", "knn"), params=KnnParams,
             summary="Weighted k-NN accuracy per layer and token reduction (DINO protocol: "
                     "cosine, k=20, T=0.07)",
             reads=["train", "eval"])
    register("linear_probe", _lazy("probes", "ProbeEvaluator", "linear_probe"), params=LinearProbeParams,
             summary="BatchNorm (no affine) + linear probe over a grid, mean ± std of the best 5; "
                     "one layer or several concatenated",
             reads=["train", "eval"])
    register("mlp_probe", _lazy("probes", "ProbeEvaluator", "mlp_probe"), params=MlpProbeParams,
             summary="Probes with 1-3 Linear-BatchNorm-ReLU blocks before the classifier",
             reads=["train", "eval"])
    register("prediction_agreement", _lazy("agreement", "AgreementEvaluator", "prediction_agreement"), params=AgreementParams,
             summary="Kendall's tau of top-k class rankings (all / both correct / both "
                     "incorrect) and top-1 F1 between models",
             reads=["outputs"])
    register("path_efficiency", _lazy("path", "PathEfficiencyEvaluator", "path_efficiency"), params=PathEfficiencyParams,
             summary="Fine-tuning path efficiency |θ_T-θ_0| / Σ|θ_t-θ_t-1| globally, per layer "
                     "type and per block, from snapshots",
             reads=["checkpoints"])
    register("cka_vs_depth", _lazy("depth", "CkaDepthEvaluator", "cka_vs_depth"), params=CkaDepthParams,
             summary="CKA against relative-depth distance between models of different depth or "
                     "family (after the metrics)",
             reads=["similarity"])
    register("attention_distance", _lazy("attention", "AttentionDistanceEvaluator", "attention_distance"), params=AttentionDistanceParams,
             summary="Mean attention distance per ViT block and head (Park et al. 2023), "
                     "streamed from the attention maps",
             reads=["attention maps (streamed)"])
    register("attention_collapse", _lazy("attention", "AttentionCollapseEvaluator", "attention_collapse"), params=AttentionCollapseParams,
             summary="Attention collapse per ViT block and head: NMI between query and key "
                     "positions, query and head cosine similarity (Park et al. 2023)",
             reads=["attention maps (streamed)"])
    register("fourier_features", _lazy("fourier", "FourierEvaluator", "fourier_features"), params=FourierParams,
             summary="Δ log amplitude of high frequencies of the token maps per ViT block "
                     "(Park et al. 2023 Fourier analysis), streamed",
             reads=["block tokens (streamed)"])
