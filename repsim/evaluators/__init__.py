"""Evaluators: analyses on cached features (k-NN, probes, prediction agreement, ...)."""

from repsim.evaluators.base import EvalContext, Evaluator, EvalResult, FeatureNeeds

__all__ = ["EvalContext", "EvalResult", "Evaluator", "FeatureNeeds"]
