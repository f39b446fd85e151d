"""Tables (tabulate) and figures (matplotlib) of similarity results.

Rows, columns and axes are labelled with the layers' full names (``blocks.0``,
``blocks.0.norm1``), as recipes, ``repsim layers`` and the result files name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from repsim.metrics.results import SimilarityResult


def format_value(v: float) -> str:
    return "undefined" if v != v else f"{v:.3f}"


def matrix_table(values: torch.Tensor, rows: Sequence[str], cols: Sequence[str],
                 fmt: str = "github",
                 intervals: tuple[torch.Tensor, torch.Tensor] | None = None) -> str:
    """The matrix as a table; with ``intervals`` each cell reads ``value [low, high]``."""
    from tabulate import tabulate

    cells = [[format_value(v) for v in row] for row in values.tolist()]
    if intervals is not None:
        lows, highs = intervals[0].tolist(), intervals[1].tolist()
        cells = [[f"{c} [{format_value(lo)}, {format_value(hi)}]" for c, lo, hi in zip(*t)]
                 for t in zip(cells, lows, highs)]
    body = [[r, *row] for r, row in zip(rows, cells)]
    return tabulate(body, headers=["", *cols], tablefmt=fmt, disable_numparse=True)


def records_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "github") -> str:
    from tabulate import tabulate

    def cell(v: Any) -> Any:
        return format_value(v) if isinstance(v, float) else v

    return tabulate([[cell(v) for v in r] for r in rows], headers=list(headers), tablefmt=fmt,
                    disable_numparse=True)


def result_table(result: SimilarityResult, fmt: str = "github") -> str:
    return matrix_table(result.values, result.rows, result.cols, fmt)


def heatmap(values: torch.Tensor, rows: Sequence[str], cols: Sequence[str], title: str,
            xlabel: str, ylabel: str, vrange: tuple[float, float] = (0.0, 1.0)) -> Figure:
    """A layer × layer heatmap, first layer at the bottom-left as in the seeds' figures."""
    from matplotlib.figure import Figure

    import matplotlib

    v = values.double().numpy()
    # undefined values (constant features) in grey, not blank
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#bbbbbb")
    size = (max(3.5, 0.35 * len(cols) + 2), max(3.0, 0.35 * len(rows) + 1.5))
    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    im = ax.imshow(v, origin="lower", cmap=cmap, vmin=vrange[0], vmax=vrange[1],
                   aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if bool(values.isnan().any()):
        title += "\n(grey: undefined, constant features)"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig
