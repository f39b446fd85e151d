"""What a similarity computation returns: values for every layer pair, and how they were made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from repsim.metrics.base import PairTerms


@dataclass
class SimilarityResult:
    """Values of one metric for every (row layer, column layer) pair.

    ``terms`` are the additive sums of a streaming metric (None for full-batch metrics);
    ``intervals`` the bootstrap ``(low, high)`` where one was computed.
    """

    values: torch.Tensor  # float64 [len(rows), len(cols)]
    rows: list[str]
    cols: list[str]
    metric: str
    description: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    terms: PairTerms | None = None
    intervals: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def T(self) -> SimilarityResult:  # noqa: N802 (as torch's .T)
        """The result with rows and columns swapped."""
        return replace(
            self, values=self.values.T, rows=self.cols, cols=self.rows,
            terms=self.terms.T if self.terms is not None else None,
            intervals=(self.intervals[0].T, self.intervals[1].T)
            if self.intervals is not None else None)

    def block(self, rows: Sequence[str], cols: Sequence[str]) -> SimilarityResult:
        """The sub-result of the named row and column layers, in the order given."""
        missing = [r for r in rows if r not in self.rows] + [c for c in cols if c not in self.cols]
        if missing:
            raise KeyError(f"layers {missing} are not in this result; rows: {self.rows}, "
                           f"columns: {self.cols}")
        ri = [self.rows.index(r) for r in rows]
        ci = [self.cols.index(c) for c in cols]
        return replace(
            self, values=self.values[ri][:, ci], rows=list(rows), cols=list(cols), terms=None,
            intervals=tuple(t[ri][:, ci] for t in self.intervals)  # type: ignore[arg-type]
            if self.intervals is not None else None)

    def diagonal(self) -> torch.Tensor:
        """Values of same-position pairs (row i with column i), float64."""
        return self.values.diagonal()

    def diag_mean(self) -> float:
        """Mean of the defined same-position values; NaN if none is defined."""
        d = self.diagonal()
        defined = d[~d.isnan()]
        return float(defined.mean()) if defined.numel() else float("nan")

    def confidence_interval(self, n_resamples: int = 2000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Bootstrap ``(low, high)`` over minibatches; needs ``keep_batches=True``."""
        from repsim.metrics.inference import bootstrap_interval

        return bootstrap_interval(self.terms, n_resamples=n_resamples, confidence=confidence,
                                  seed=seed)

    def to_json(self) -> dict[str, Any]:
        def plain(t: torch.Tensor) -> list[list[float | None]]:
            return [[None if v != v else float(v) for v in row] for row in t.tolist()]

        out = {
            "metric": self.metric,
            "rows": self.rows,
            "cols": self.cols,
            "values": plain(self.values),
            "description": self.description,
            "notes": self.notes,
        }
        if self.intervals is not None:
            out["ci_low"], out["ci_high"] = plain(self.intervals[0]), plain(self.intervals[1])
        return out
