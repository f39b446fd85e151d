"""Bias-corrected distance correlation, accumulated over minibatches.

dCor² is CKA with Euclidean distance matrices in place of Gram matrices: U-centre each batch's
distance matrix (the core's ``u_centre``) and let the core's engine do the rest. As a
``StreamingMetric`` it gets every layer pair in one GEMM per batch, like ``minibatch_cka``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from repsim.metrics import MetricProperties, StreamingMetric

if TYPE_CHECKING:
    import torch


class MinibatchDistanceCorrelation(StreamingMetric):
    """Squared bias-corrected distance correlation, summed over minibatches then normalised."""

    min_batch_size: ClassVar[int] = 4
    properties: ClassVar[MetricProperties] = MetricProperties(
        kind="similarity",
        range=(-1.0, 1.0),
        invariances=("orthogonal", "isotropic_scaling", "translation"),
        streaming=True,
        estimator="U-centred distance matrices (Székely & Rizzo 2014), summed over minibatches",
        min_examples=4,
    )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        from repsim.metrics.cka import u_centre

        d = torch.cdist(x.double(), x.double())  # [B, n, n] Euclidean distances
        return u_centre(d).reshape(x.shape[0], -1)
