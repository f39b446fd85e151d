"""Similarity metrics: the base classes and the all-pairs engine."""

from repsim.metrics.base import INVARIANCES, Metric, MetricProperties, PairTerms, StreamingMetric
from repsim.metrics.engine import SimilarityResult, similarity_matrix

__all__ = [
    "INVARIANCES",
    "Metric",
    "MetricProperties",
    "PairTerms",
    "SimilarityResult",
    "StreamingMetric",
    "similarity_matrix",
]
