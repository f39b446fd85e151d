"""Every built-in evaluator's computation as a plain function of tensors.

The implementations live in the evaluator modules, which import torch only inside functions, so
importing this module stays light.
"""

from __future__ import annotations

from repsim.evaluators.agreement import kendall_tau_topk, prediction_agreement, top1_f1
from repsim.evaluators.attention import attention_collapse, attention_distance, attention_nmi
from repsim.evaluators.depth import cka_vs_depth, relative_depth
from repsim.evaluators.fourier import fourier_features, fourier_profile, token_spectrum
from repsim.evaluators.knn import knn_accuracy, knn_predict
from repsim.evaluators.path import path_efficiency
from repsim.evaluators.probes import linear_probe, mlp_probe

__all__ = [
    "attention_collapse",
    "attention_distance",
    "attention_nmi",
    "cka_vs_depth",
    "fourier_features",
    "fourier_profile",
    "kendall_tau_topk",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "mlp_probe",
    "path_efficiency",
    "prediction_agreement",
    "relative_depth",
    "token_spectrum",
    "top1_f1",
]
