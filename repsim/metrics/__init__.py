"""Similarity metrics: the base classes and the all-pairs engine."""

from repsim.metrics.base import INVARIANCES, Metric, MetricProperties, PairTerms, StreamingMetric
from repsim.metrics.engine import similarity_matrix
from repsim.metrics.results import SimilarityResult
from repsim.metrics.fullbatch import FullBatchMetric

__all__ = [
    "INVARIANCES",
    "FullBatchMetric",
    "Metric",
    "MetricProperties",
    "PairTerms",
    "SimilarityResult",
    "StreamingMetric",
    "similarity_matrix",
]
