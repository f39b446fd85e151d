"""cka_vs_depth bins layer pairs exactly: a distance on a bin edge opens the next bin."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from repsim.evaluators.depth import cka_vs_depth


def _distance(i: int, j: int, la: int, lb: int) -> Fraction:
    """|r_a − r_b| with r = (i + 1) / L, the module's relative depth, as an exact rational."""
    return abs(Fraction(i + 1, la) - Fraction(j + 1, lb))


def _reference(values: torch.Tensor, bins: int) -> tuple[list[int], list[float], list[int]]:
    """Counts, means and nearest columns computed with exact rationals."""
    la, lb = values.shape
    members: list[list[float]] = [[] for _ in range(bins)]
    for i in range(la):
        for j in range(lb):
            b = int(_distance(i, j, la, lb) * bins)  # bin b holds [b / bins, (b + 1) / bins)
            members[b].append(float(values[i, j]))
    nearest = [min(range(lb), key=lambda j: (_distance(i, j, la, lb), j)) for i in range(la)]
    return ([len(m) for m in members], [sum(m) / len(m) if m else float("nan") for m in members],
            nearest)


def _values(la: int, lb: int) -> torch.Tensor:
    """1 where the two layers sit at the same relative depth, else a value in [0, 0.9)."""
    g = torch.Generator().manual_seed(la * 100 + lb)
    v = 0.9 * torch.rand(la, lb, generator=g, dtype=torch.float64)
    for i in range(la):
        for j in range(lb):
            if _distance(i, j, la, lb) == 0:
                v[i, j] = 1.0
    return v


@pytest.mark.parametrize("la, lb", [(10, 10), (12, 12), (12, 24), (6, 12)])
@pytest.mark.parametrize("bins", [10, 6, 4])
def test_bins_match_exact_rational_binning(la: int, lb: int, bins: int) -> None:
    values = _values(la, lb)
    count, mean, nearest = _reference(values, bins)
    c = cka_vs_depth(values, bins=bins)
    assert c["count"].tolist() == count
    assert c["mean"].tolist() == pytest.approx(mean, nan_ok=True)
    assert c["matched_col"].tolist() == nearest
    assert c["matched"].tolist() == [values[i, j].item() for i, j in enumerate(nearest)]


def test_same_depth_bin_holds_only_same_depth_pairs() -> None:
    # 10 x 10 with 10 bins: bin 0 is [0, 0.1), so it holds the diagonal and nothing else.
    c = cka_vs_depth(_values(10, 10), bins=10)
    assert c["count"][0].item() == 10 and c["mean"][0].item() == 1.0
