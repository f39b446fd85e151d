"""CKA against layer distance between models of different depth or family (seeds 003 Fig. 11).

Layer i (0-based) of a model compared through L layers sits at relative depth r = (i + 1) / L:
the fraction of the compared stack completed at its output, so the last layer of every model is at
1 whatever its depth. The distance of a layer pair is |r_a − r_b|; the curve is the mean CKA of
the pairs in each of ``bins`` equal-width distance bins over [0, 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from repsim.evaluators._common import MISSING, figure, json_float, resolve_pairs, table
from repsim.evaluators.base import Access, EvalContext, Evaluator, EvalResult, FeatureNeeds
from repsim.evaluators.params import CkaDepthParams

if TYPE_CHECKING:
    import torch


def relative_depth(n_layers: int) -> torch.Tensor:
    """``(i + 1) / L`` for i = 0 … L−1 (float64)."""
    import torch

    return torch.arange(1, n_layers + 1, dtype=torch.float64) / n_layers


def cka_vs_depth(values: torch.Tensor, bins: int = 10) -> dict[str, torch.Tensor]:
    """Bin a ``[La, Lb]`` similarity matrix by relative-depth distance of its layer pairs.

    Returns ``edges`` ``[bins + 1]``, per-bin ``mean``, ``std`` (population; NaN for an empty bin)
    and ``count`` of defined values, the layers' ``depth_a`` / ``depth_b``, and ``matched``
    ``[La]``: each row layer's value with the column layer nearest in relative depth
    (``matched_col`` its index; the shallower one on a tie).
    """
    import torch

    v = values.double()
    la, lb = v.shape
    da, db = relative_depth(la), relative_depth(lb)
    # Exact arithmetic: |(i+1)/La − (j+1)/Lb| = n / (La·Lb) with the integer
    # n = |(i+1)·Lb − (j+1)·La|. In floats a distance on a bin edge lands on either side by
    # rounding (4/6 − 1/6 = 0.49999999999999994); in integers bin b, [b/bins, (b+1)/bins),
    # is floor(n·bins / (La·Lb)), and n < La·Lb keeps it below ``bins``.
    num = ((torch.arange(1, la + 1)[:, None] * lb) - (torch.arange(1, lb + 1)[None, :] * la)).abs()
    which = (num * bins).div(la * lb, rounding_mode="floor").flatten()
    vals = v.flatten()
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    ok = ~vals.isnan()
    count = torch.bincount(which[ok], minlength=bins).double()
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, which[ok], vals[ok])
    mean = total / count
    sq = torch.zeros(bins, dtype=torch.float64).index_add_(0, which[ok], vals[ok] ** 2)
    std = (sq / count - mean ** 2).clamp_min(0).sqrt()
    col = num.argmin(1)  # exact distances; argmin keeps the first (shallower) index on a tie
    return {"edges": edges, "mean": mean, "std": std, "count": count, "depth_a": da,
            "depth_b": db, "matched": v.gather(1, col[:, None])[:, 0], "matched_col": col}


class CkaDepthEvaluator(Evaluator):
    """CKA vs relative-depth distance for pairs of models, from the run's similarity results."""

    params: CkaDepthParams
    needs = FeatureNeeds(splits=())
    access = Access(similarity=True)

    def __init__(self, params: CkaDepthParams | None = None, name: str | None = "cka_vs_depth"
                 ) -> None:
        super().__init__(params or CkaDepthParams(), name)

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        p = self.params
        bin_rows: list[list[Any]] = []
        matched_rows: list[list[Any]] = []
        notes: list[str] = []
        curves: dict[str, dict[str, torch.Tensor]] = {}
        tensors: dict[str, torch.Tensor] = {}
        for a, b in resolve_pairs(ctx, None, p.pairs, self.name):
            try:
                res = ctx.similarity(p.metric, a, b)
            except MISSING as exc:
                notes.append(f"{a} vs {b}: skipped, no '{p.metric}' result ({exc})")
                continue
            rows, cols, values = list(res.rows), list(res.cols), res.values
            if p.group is not None:
                keep_a = [i for i, la in enumerate(rows) if la in ctx.groups(a).get(p.group, [])]
                keep_b = [j for j, lb in enumerate(cols) if lb in ctx.groups(b).get(p.group, [])]
                if not keep_a or not keep_b:
                    notes.append(f"{a} vs {b}: skipped, group '{p.group}' matches no compared "
                                 "layer of one of the models")
                    continue
                rows, cols = [rows[i] for i in keep_a], [cols[j] for j in keep_b]
                values = values[keep_a][:, keep_b]
            pair = f"{a} vs {b}"
            c = curves[pair] = cka_vs_depth(values, p.bins)
            fam = (ctx.model_info(a).get("family", "?"), ctx.model_info(b).get("family", "?"))
            for k in range(p.bins):
                bin_rows.append([a, b, f"{fam[0]}-{fam[1]}", float(c["edges"][k]),
                                 float(c["edges"][k + 1]), float(c["mean"][k]),
                                 float(c["std"][k]), int(c["count"][k])])
            for i, la in enumerate(rows):
                j = int(c["matched_col"][i])
                matched_rows.append([a, b, la, float(c["depth_a"][i]), cols[j],
                                     float(c["depth_b"][j]), float(c["matched"][i])])
            tensors[f"by_distance/{pair}"] = torch.stack([c["mean"], c["std"], c["count"]])
        protocol = {
            "evaluator": self.name, "metric": p.metric, "group": p.group, "bins": p.bins,
            "relative_depth": "(i + 1) / L over the compared layers in network order",
            "distance": "|r_a - r_b|; bins of equal width over [0, 1)",
            "mean": "over defined (non-NaN) layer pairs of a bin; std: population",
            "tensor_layout": "by_distance/<a vs b>: [(mean, std, count), bin]", "notes": notes,
        }

        def plot():
            fig, axes = figure(1)
            ax = axes[0]
            for pair, c in curves.items():
                centres = (c["edges"][:-1] + c["edges"][1:]) / 2
                ax.plot(centres.numpy(), c["mean"].numpy(), marker="o", label=pair)
            ax.set_xlabel("layer distance |relative depth a − relative depth b|")
            ax.set_ylabel(f"mean {p.metric}")
            ax.set_title("similarity vs layer distance")
            ax.legend(fontsize=7)
            return fig

        return EvalResult(
            protocol=protocol,
            tables={"by_distance": table(["model_a", "model_b", "families", "distance_from",
                                          "distance_to", "mean", "std", "count"], bin_rows),
                    "matched_depth": table(["model_a", "model_b", "layer_a", "depth_a", "layer_b",
                                            "depth_b", "value"], matched_rows)},
            tensors=tensors,
            data={pair: {k: [json_float(x) for x in v.tolist()] for k, v in c.items()}
                  for pair, c in curves.items()},
            figures={"cka_vs_distance": plot},
        )
