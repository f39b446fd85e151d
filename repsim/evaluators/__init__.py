"""Evaluators: analyses on cached features (k-NN, probes, prediction agreement, ...)."""

from __future__ import annotations

from typing import Any

from repsim.evaluators.base import (
    EvalContext,
    Evaluator,
    EvalResult,
    FeatureNeeds,
    ObserveSpec,
    StreamingEvaluator,
)


def evaluate(name: str, ctx: EvalContext, **params: Any) -> EvalResult:
    """Run a registered evaluator from Python: ``evaluate("knn", ctx, k=20)``.

    ``ctx`` is any :class:`EvalContext`, e.g. an
    :class:`~repsim.evaluators.context.InMemoryContext` over tensors.
    """
    from repsim.plugins import registry

    evaluator = registry("evaluator").get(name).create(params)
    evaluator.name = name
    return evaluator.evaluate(ctx)


__all__ = ["EvalContext", "EvalResult", "Evaluator", "FeatureNeeds", "ObserveSpec",
           "StreamingEvaluator", "evaluate"]
