"""Plain functions of tensors: every built-in metric and evaluator, without registries or recipes.

``repsim.functional.linear_cka(x, y)``, ``repsim.functional.minibatch_cka(x, y, batch_size=32)``,
``repsim.functional.knn_accuracy(...)``, ... The registry entries wrap these same implementations.
"""

from __future__ import annotations

from repsim.evaluators.functional import *  # noqa: F403
from repsim.evaluators.functional import __all__ as _evaluator_names
from repsim.metrics.functional import *  # noqa: F403
from repsim.metrics.functional import __all__ as _metric_names

__all__ = sorted([*_metric_names, *_evaluator_names])
