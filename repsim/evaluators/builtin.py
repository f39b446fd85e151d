"""Built-in evaluators, registered through the same hook as a plugin's.

Only the pydantic parameter models are imported here; each evaluator's module (and torch) is
imported when a recipe builds it.
"""

from __future__ import annotations

from repsim.evaluators.base import Evaluator
from repsim.evaluators.params import (AgreementParams, AttentionCollapseParams,
                                      AttentionDistanceParams, CkaDepthParams, FourierParams,
                                      KnnParams, LinearProbeParams, MlpProbeParams,
                                      PathEfficiencyParams)
from repsim.hookspecs import Register, hookimpl


def _knn(params: KnnParams) -> Evaluator:
    from repsim.evaluators.knn import KnnEvaluator

    return KnnEvaluator(params, "knn")


def _linear_probe(params: LinearProbeParams) -> Evaluator:
    from repsim.evaluators.probes import ProbeEvaluator

    return ProbeEvaluator(params, "linear_probe")


def _mlp_probe(params: MlpProbeParams) -> Evaluator:
    from repsim.evaluators.probes import ProbeEvaluator

    return ProbeEvaluator(params, "mlp_probe")


def _agreement(params: AgreementParams) -> Evaluator:
    from repsim.evaluators.agreement import AgreementEvaluator

    return AgreementEvaluator(params, "prediction_agreement")


def _path_efficiency(params: PathEfficiencyParams) -> Evaluator:
    from repsim.evaluators.path import PathEfficiencyEvaluator

    return PathEfficiencyEvaluator(params, "path_efficiency")


def _cka_vs_depth(params: CkaDepthParams) -> Evaluator:
    from repsim.evaluators.depth import CkaDepthEvaluator

    return CkaDepthEvaluator(params, "cka_vs_depth")


def _attention_distance(params: AttentionDistanceParams) -> Evaluator:
    from repsim.evaluators.attention import AttentionDistanceEvaluator

    return AttentionDistanceEvaluator(params, "attention_distance")


def _attention_collapse(params: AttentionCollapseParams) -> Evaluator:
    from repsim.evaluators.attention import AttentionCollapseEvaluator

    return AttentionCollapseEvaluator(params, "attention_collapse")


def _fourier_features(params: FourierParams) -> Evaluator:
    from repsim.evaluators.fourier import FourierEvaluator

    return FourierEvaluator(params, "fourier_features")


@hookimpl
def register_evaluators(register: Register) -> None:
    register("knn", _knn, params=KnnParams,
             summary="Weighted k-NN accuracy per layer and token reduction (DINO protocol: "
                     "cosine, k=20, T=0.07)",
             reads=["train", "eval"])
    register("linear_probe", _linear_probe, params=LinearProbeParams,
             summary="BatchNorm (no affine) + linear probe over a grid, mean ± std of the best 5; "
                     "one layer or several concatenated",
             reads=["train", "eval"])
    register("mlp_probe", _mlp_probe, params=MlpProbeParams,
             summary="Probes with 1-3 Linear-BatchNorm-ReLU blocks before the classifier",
             reads=["train", "eval"])
    register("prediction_agreement", _agreement, params=AgreementParams,
             summary="Kendall's tau of top-k class rankings (all / both correct / both "
                     "incorrect) and top-1 F1 between models",
             reads=["outputs"])
    register("path_efficiency", _path_efficiency, params=PathEfficiencyParams,
             summary="Fine-tuning path efficiency |θ_T-θ_0| / Σ|θ_t-θ_t-1| globally, per layer "
                     "type and per block, from snapshots",
             reads=["checkpoints"])
    register("cka_vs_depth", _cka_vs_depth, params=CkaDepthParams,
             summary="CKA against relative-depth distance between models of different depth or "
                     "family (after the metrics)",
             reads=["similarity"])
    register("attention_distance", _attention_distance, params=AttentionDistanceParams,
             summary="Mean attention distance per ViT block and head (Park et al. 2023), "
                     "streamed from the attention maps",
             reads=["attention maps (streamed)"])
    register("attention_collapse", _attention_collapse, params=AttentionCollapseParams,
             summary="Attention collapse per ViT block and head: NMI between query and key "
                     "positions, query and head cosine similarity (Park et al. 2023)",
             reads=["attention maps (streamed)"])
    register("fourier_features", _fourier_features, params=FourierParams,
             summary="Δ log amplitude of high frequencies of the token maps per ViT block "
                     "(Park et al. 2023 Fourier analysis), streamed",
             reads=["block tokens (streamed)"])
