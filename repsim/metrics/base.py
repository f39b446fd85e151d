"""What every similarity metric declares and offers.

A metric compares two lists of layers (features ``[N, D]``, examples in the same order) and returns
the matrix of values for every layer pair. A *streaming* metric works from sums over minibatches
of inner products of per-layer embeddings, so the run never holds all features in memory and the
engine gets every layer pair of every model pair with one GEMM per batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch

# Names used in MetricProperties.invariances, so the contract tests know what to check.
INVARIANCES = (
    "orthogonal",  # x -> x Q for orthogonal Q
    "isotropic_scaling",  # x -> a x, a > 0
    "translation",  # x -> x + c
    "invertible_linear",  # x -> x A for invertible A
    "permutation",  # permuting feature columns
)


@dataclass(frozen=True)
class MetricProperties:
    """Facts a metric declares; ``repsim list metrics`` and the contract tests read them."""

    kind: Literal["similarity", "distance"]
    range: tuple[float, float]
    invariances: tuple[str, ...]
    streaming: bool
    estimator: str
    min_examples: int = 2
    symmetric: bool = True
    min_features: int = 1  # features per example the estimator needs (RSA's Pearson: 3)

    def as_info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "range": list(self.range),
            "invariances": list(self.invariances),
            "streaming": self.streaming,
            "estimator": self.estimator,
        }


@dataclass
class PairTerms:
    """Additive sums of one streaming metric for one (rows × cols) layer pair set.

    Accumulators from shards of the same data add up (``a + b``); ``batch_*`` keep per-batch terms
    when requested (bootstrap over minibatches).
    """

    cross: torch.Tensor  # [La, Lb] float64
    self_rows: torch.Tensor  # [La]
    self_cols: torch.Tensor  # [Lb]
    n_batches: int = 0
    n_examples: int = 0
    batch_cross: list[torch.Tensor] = field(default_factory=list)  # each [b, La, Lb]
    batch_self_rows: list[torch.Tensor] = field(default_factory=list)  # each [b, La]
    batch_self_cols: list[torch.Tensor] = field(default_factory=list)  # each [b, Lb]

    def __add__(self, other: PairTerms) -> PairTerms:
        return PairTerms(
            self.cross + other.cross,
            self.self_rows + other.self_rows,
            self.self_cols + other.self_cols,
            self.n_batches + other.n_batches,
            self.n_examples + other.n_examples,
            self.batch_cross + other.batch_cross,
            self.batch_self_rows + other.batch_self_rows,
            self.batch_self_cols + other.batch_self_cols,
        )

    @property
    def T(self) -> PairTerms:  # noqa: N802 (as torch's .T)
        """The same terms with rows and columns swapped."""
        return PairTerms(self.cross.T, self.self_cols, self.self_rows, self.n_batches,
                         self.n_examples, [c.transpose(1, 2) for c in self.batch_cross],
                         self.batch_self_cols, self.batch_self_rows)


class Metric(ABC):
    """A similarity (or distance) index between two layers' features.

    ``properties`` is a class attribute; a metric whose parameters change those facts (a distance
    option, a debiased estimator) assigns ``self.properties`` in ``__init__``.
    """

    properties: ClassVar[MetricProperties]

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        self.params = params
        self.name = name or type(self).__name__.lower()

    def describe(self) -> dict[str, Any]:
        """Name, estimator and parameters, recorded with every result."""
        return {
            "metric": self.name,
            **self.properties.as_info(),
            "params": self.params.model_dump() if self.params is not None else {},
        }

    @abstractmethod
    def matrix(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        batch_size: int | None = None,
        row_names: Sequence[str] | None = None,
        col_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Values for every pair ``(xs[i], ys[j])`` as a float64 ``[len(xs), len(ys)]`` tensor.

        Every tensor is ``[N, D]`` with the same N. Streaming metrics read ``batch_size``
        (consecutive minibatches); the others use all N examples at once. The names (one per
        tensor) go into error messages; unusable input raises :class:`repsim.errors.FeatureError`.
        """


class StreamingMetric(Metric):
    """A metric of the form ``finalize(Σ_b <e_a(b), e_b(b)>, Σ_b |e_a(b)|², Σ_b |e_b(b)|²)``.

    ``embed`` maps one layer's features for ``B`` batches of ``n`` examples, ``[B, n, D]``, to
    per-batch embeddings ``[B, m]`` whose inner products are the metric's additive terms (for
    minibatch CKA: U-centred Grams, flattened, scaled so that the inner product is HSIC_1).
    """

    min_batch_size: ClassVar[int] = 2
    # True when every embedding is a flattened symmetric n×n matrix with a zero diagonal (the
    # U-centred kernels of the minibatch CKAs): a run then stores only the strict upper triangle
    # of each (half the bytes) and doubles the inner products, which is exact.
    u_centred: ClassVar[bool] = False

    def minibatch(self, default: int) -> int:
        """The estimator's minibatch in a run: the metric's own ``batch_size`` parameter, else
        ``default`` (the run's forward batch size)."""
        return int(getattr(self.params, "batch_size", None) or default)

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n, D]`` features → ``[B, m]`` float64 embeddings."""

    def embed_many(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Several layers' ``[B, n, D_l]`` features (same B, n) → ``[L, B, m]`` float64.

        The engine calls this once per group of equal-sized batches; override it to share work
        across layers (the built-in CKAs write every layer into one preallocated buffer).
        """
        import torch

        return torch.stack([self.embed(x) for x in xs])

    def finalize(self, terms: PairTerms) -> torch.Tensor:
        """Default: the normalised inner product (CKA form); undefined pairs are NaN."""
        denom = (terms.self_rows[:, None] * terms.self_cols[None, :]).sqrt()
        return terms.cross / denom

    def matrix(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        batch_size: int | None = None,
        row_names: Sequence[str] | None = None,
        col_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        from repsim.metrics.engine import pair_terms_from_features

        terms = pair_terms_from_features(self, xs, ys, batch_size, row_names=row_names,
                                         col_names=col_names)
        return self.finalize(terms)
