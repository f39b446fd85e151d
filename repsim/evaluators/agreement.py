"""Do two models rank classes alike? Kendall's tau of top-k rankings and top-1 F1 (seeds 001
Fig. 4, 003 Fig. 13).

For example i and reference model R, let S_i be R's k highest-scoring classes (ties at the k-th
place go to the lower class index). τ_i is Kendall's tau-b between the two models' scores on S_i:
concordant minus discordant class pairs over the square root of the untied pairs of each model,
so ties within S_i count as neither (scipy's default variant). τ_i is undefined (NaN) when either
model gives every class of S_i the same score; undefined examples are left out of averages and
counted. ``reference="symmetric"`` averages the values with R = A and R = B.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from repsim.errors import FeatureError, RecipeError
from repsim.evaluators._common import (MISSING, expand_layer, figure, json_float, resolve_pairs,
                                       table)
from repsim.evaluators.base import (EvalContext, Evaluator, EvalResult, FeatureNeeds,
                                   first_of_ranks)
from repsim.evaluators.params import AgreementParams

if TYPE_CHECKING:
    import torch

SUBSETS = ("all", "both_correct", "both_incorrect")
PAIR_BUDGET = 2**22  # elements of one [rows, k, k] sign tensor


def _check_scores(scores_a: torch.Tensor, scores_b: torch.Tensor) -> None:
    if scores_a.ndim != 2 or scores_a.shape != scores_b.shape:
        raise FeatureError(f"class scores must be [N, C] of equal shape; got "
                           f"{tuple(scores_a.shape)} and {tuple(scores_b.shape)}.")


def _tau_b(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Kendall tau-b of ``[n, k]`` float64 tensors (NaN where a row is all tied).

    Vectorised over rows because scipy.stats.kendalltau takes one pair of vectors per call: a
    Python loop over 50 000 examples × 3 values of k × every model pair is minutes, this is
    seconds. Each unordered pair appears twice in the k × k sign matrices; the ratio is unchanged.
    """
    import torch

    sx = torch.sign(x[:, :, None] - x[:, None, :])
    sy = torch.sign(y[:, :, None] - y[:, None, :])
    num = (sx * sy).sum((1, 2))
    den = (sx.abs().sum((1, 2)) * sy.abs().sum((1, 2))).sqrt()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))


def _topk_classes(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row; equal scores keep ascending class order."""
    import torch

    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def kendall_tau_topk(scores_a: torch.Tensor, scores_b: torch.Tensor, k: int,
                     reference: Literal["a", "b", "symmetric"] = "symmetric") -> torch.Tensor:
    """Per-example Kendall tau-b ``[N]`` (float64, NaN where undefined) between two models'
    scores on the top-k classes of ``reference`` (``"symmetric"``: mean over both references of
    the defined values). ``k`` is capped at the number of classes. Average with ``nanmean``.
    """
    import torch

    _check_scores(scores_a, scores_b)
    if k < 2:
        raise FeatureError(f"Kendall's tau needs k >= 2 classes; got k = {k}.")
    k = min(k, scores_a.shape[1])
    a, b = scores_a.double(), scores_b.double().to(scores_a.device)
    if reference == "symmetric":
        both = torch.stack([kendall_tau_topk(a, b, k, "a"), kendall_tau_topk(a, b, k, "b")])
        defined = ~both.isnan()
        total = torch.where(defined, both, torch.zeros_like(both)).sum(0)
        n = defined.sum(0)
        return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("nan")))
    ref = a if reference == "a" else b
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    rows = max(1, PAIR_BUDGET // (k * k))
    for i in range(0, a.shape[0], rows):
        idx = _topk_classes(ref[i:i + rows], k)
        out[i:i + rows] = _tau_b(a[i:i + rows].gather(1, idx), b[i:i + rows].gather(1, idx))
    return out


def top1_f1(scores_a: torch.Tensor, scores_b: torch.Tensor,
            average: Literal["macro", "micro", "weighted"] = "macro") -> float:
    """F1 of model B's top-1 predictions against model A's top-1 taken as the target.

    Per class c, F1_c = 2·|A=c ∧ B=c| / (|A=c| + |B=c|), symmetric in A and B. ``macro``: the mean
    over classes predicted by either model (torchmetrics leaves out classes neither predicts);
    ``micro``: the top-1 agreement rate; ``weighted``: weighted by A's class counts (not
    symmetric). Ties in a row's scores go to the lower class index.
    """
    from torchmetrics.functional.classification import multiclass_f1_score

    _check_scores(scores_a, scores_b)
    pred_a, pred_b = scores_a.argmax(1), scores_b.argmax(1).to(scores_a.device)
    return float(multiclass_f1_score(pred_b, pred_a, num_classes=scores_a.shape[1],
                                     average=average))


def prediction_agreement(scores_a: torch.Tensor, scores_b: torch.Tensor, labels: torch.Tensor,
                         ks: tuple[int, ...] = (5, 10, 100),
                         reference: Literal["a", "b", "symmetric"] = "symmetric",
                         f1_average: Literal["macro", "micro", "weighted"] = "macro"
                         ) -> dict[str, Any]:
    """Mean Kendall's tau per k and subset (all, both correct, both incorrect by top-1 against
    ``labels``), the top-1 F1 and agreement rate, the subset sizes, and ``per_example`` taus."""
    import torch

    _check_scores(scores_a, scores_b)
    labels = labels.to(scores_a.device).long()
    if labels.shape != (scores_a.shape[0],):
        raise FeatureError(f"{scores_a.shape[0]} examples but labels of shape "
                           f"{tuple(labels.shape)}.")
    ok_a = scores_a.argmax(1) == labels
    ok_b = scores_b.argmax(1).to(labels.device) == labels
    masks = {"all": torch.ones_like(ok_a), "both_correct": ok_a & ok_b,
             "both_incorrect": ~ok_a & ~ok_b}
    n_cls = scores_a.shape[1]
    used = list(dict.fromkeys(min(k, n_cls) for k in ks))
    tau: dict[int, dict[str, float]] = {}
    undefined: dict[int, dict[str, int]] = {}
    per_example: dict[int, torch.Tensor] = {}
    for k in used:
        t = per_example[k] = kendall_tau_topk(scores_a, scores_b, k, reference)
        tau[k], undefined[k] = {}, {}
        for name, m in masks.items():
            vals = t[m]
            tau[k][name] = float(vals.nanmean()) if vals.numel() else float("nan")
            undefined[k][name] = int(vals.isnan().sum())
    return {
        "ks": used, "tau": tau, "undefined": undefined,
        "n": {name: int(m.sum()) for name, m in masks.items()},
        "f1": top1_f1(scores_a, scores_b, f1_average),
        "top1_agreement": float((scores_a.argmax(1) == scores_b.argmax(1)).double().mean()),
        "accuracy_a": float(ok_a.double().mean()), "accuracy_b": float(ok_b.double().mean()),
        "per_example": per_example,
    }


def gather_rows(rows: torch.Tensor, positions: torch.Tensor, n: int, group: Any, main: bool
                ) -> torch.Tensor | None:
    """On rank 0 (``main``): every rank's ``rows`` put at their ``positions`` of a split of
    ``n`` examples, ``[n, ...]`` in the split's order; None on the other ranks. Each example must
    come from exactly one rank (none dropped, none repeated)."""
    import torch
    import torch.distributed as dist

    # Shares differ in size (a rank may hold none), which tensor gathers do not allow.
    shares: list[Any] | None = [None] * dist.get_world_size(group) if main else None
    dist.gather_object((positions.long().cpu(), rows.cpu()), shares, dst=0, group=group)
    if shares is None:
        return None
    where = torch.cat([s[0] for s in shares])
    inside = bool(((where >= 0) & (where < n)).all())
    if where.numel() != n or not inside or torch.unique(where).numel() != n:
        raise RuntimeError(f"the ranks hold {where.numel()} rows at positions that are not the "
                           f"{n} examples of the split, each once")
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    out[where] = torch.cat([s[1] for s in shares])
    return out


class AgreementEvaluator(Evaluator):
    """Kendall's tau of top-k class rankings and top-1 F1 for every pair of models."""

    params: AgreementParams

    def __init__(self, params: AgreementParams | None = None,
                 name: str | None = "prediction_agreement") -> None:
        super().__init__(params or AgreementParams(), name)
        p = self.params
        if p.scores == "output":
            self.needs = FeatureNeeds(splits=(p.split,), output=True)
        else:
            self.needs = FeatureNeeds(splits=(p.train_split, p.split),
                                      reductions=(p.reduction,) if p.reduction else None,
                                      layers=(p.layer,) if p.layer else None)
        self._probe_info: dict[str, dict[str, Any]] = {}
        # Probes train under DDP over the ranks' shares of the features, as in `linear_probe`.
        # The models' own outputs are cached merged: rank 0 alone compares them, as before.
        self.distributed = p.scores == "linear_probe"

    def _probe_scores(self, ctx: EvalContext, model: str, sync_group: Any
                      ) -> torch.Tensor | None:
        """Eval-split scores of the best linear probe (by held-out selection) on ``layer``, in
        the split's order. In a distributed run every rank trains the probes over its share of
        the features (``sync_group``: the ranks' second group, for BatchNorm) and scores its
        share of the eval split; rank 0 gets the scores of every example, the others None."""
        from repsim.evaluators.probes import probe_grid, probe_logits, probe_shard

        p = self.params
        try:  # a model without the layer or its features: skip its pairs, not the run
            layers = expand_layer(ctx, model, p.layer, self.name) if p.layer else ctx.layers(model)
            layer = layers[-1]
            train_y, eval_y = ctx.labels(p.train_split), ctx.labels(p.split)
            tr = ctx.local_features(model, layer, p.train_split, p.reduction)
            ev = ctx.local_features(model, layer, p.split, p.reduction)
            missing = None
        except (RecipeError, *MISSING) as exc:
            missing = str(exc)
        # Every rank skips the model or none does, so that the probes' collectives stay in step.
        missing = first_of_ranks(missing, ctx.group)
        if missing is not None:
            raise FeatureError(missing)
        shard = probe_shard(ctx, p.train_split, train_y, sync_group)
        grid = {k: tuple(v) if isinstance(v, list) else v for k, v in p.probe.items()}
        res = probe_grid(tr, ctx.local_labels(p.train_split), ev, ctx.local_labels(p.split),
                         top=1, split_seed=ctx.seed, keep_best=True, shard=shard,
                         num_classes=int(max(int(train_y.max()), int(eval_y.max()))) + 1, **grid)
        assert res.model is not None
        self._probe_info[model] = {"layer": layer, "run": res.runs[res.best[0]],
                                   "protocol": res.protocol}
        logits = probe_logits(res.model, ev.float())
        if ctx.group is None:
            return logits
        return gather_rows(logits, ctx.local_index(p.split), eval_y.numel(), ctx.group,
                           ctx.rank == 0)

    def _scores(self, ctx: EvalContext, model: str, cache: dict[str, torch.Tensor | None],
                sync_group: Any) -> torch.Tensor | None:
        if model not in cache:
            p = self.params
            cache[model] = (ctx.output(model, p.split) if p.scores == "output"
                            else self._probe_scores(ctx, model, sync_group))
        return cache[model]

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        p = self.params
        labels = ctx.labels(p.split)
        tau_rows: list[list[Any]] = []
        f1_rows: list[list[Any]] = []
        notes: list[str] = []
        data: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        scores: dict[str, torch.Tensor | None] = {}
        self._probe_info = {}
        sync_group = None
        if ctx.group is not None:  # probe scores over ranks: BatchNorm's group (ProbeShard)
            import torch.distributed as dist

            sync_group = dist.new_group(backend="gloo")
        for a, b in resolve_pairs(ctx, p.models, p.pairs, self.name):
            try:
                sa, sb = (self._scores(ctx, a, scores, sync_group),
                          self._scores(ctx, b, scores, sync_group))
            except MISSING as exc:
                notes.append(f"{a} vs {b}: skipped ({exc})")
                continue
            if sa is None or sb is None:  # a rank other than 0: it trained its share; 0 compares
                continue
            r = prediction_agreement(sa, sb, labels, tuple(p.ks), p.reference, p.f1_average)
            pair = f"{a} vs {b}"
            capped = [k for k in p.ks if k > sa.shape[1]]
            if capped:
                notes.append(f"{pair}: k {capped} capped at the {sa.shape[1]} classes")
            for k in r["ks"]:
                for s in SUBSETS:
                    tau_rows.append([a, b, k, s, r["tau"][k][s], r["n"][s] - r["undefined"][k][s],
                                     r["undefined"][k][s]])
            f1_rows.append([a, b, r["f1"], r["top1_agreement"], r["accuracy_a"], r["accuracy_b"],
                            r["n"]["all"]])
            for k, t in r.pop("per_example").items():
                tensors[f"tau/{pair}/top{k}"] = t
            data[pair] = {**r, "tau": {str(k): {s: json_float(v) for s, v in d.items()}
                                       for k, d in r["tau"].items()},
                          "undefined": {str(k): d for k, d in r["undefined"].items()}}
        protocol = {
            "evaluator": self.name, "split": p.split, "n": int(labels.numel()),
            "ks_requested": list(p.ks), "reference": p.reference,
            "tau": "Kendall tau-b over the reference model's top-k classes (ties at the k-th "
                   "place: lower class index), averaged over examples where defined",
            "subsets": "by each model's top-1 against the labels",
            "f1": f"torchmetrics multiclass F1 ({p.f1_average}) of B's top-1 against A's top-1",
            "tensor_layout": "tau/<a vs b>/top<k>: [N] per-example tau (NaN: undefined)",
            "scores": p.scores, "notes": notes,
        }
        if p.scores == "linear_probe":
            protocol["probes"] = {m: {"layer": i["layer"], "best_run": i["run"],
                                      "grid": i["protocol"]["grid"],
                                      "selection": i["protocol"]["selection"]}
                                  for m, i in self._probe_info.items()}

        def plot():
            fig, axes = figure(len(SUBSETS), width=4.2)
            pairs = list(dict.fromkeys((r[0], r[1]) for r in tau_rows))
            ks = list(dict.fromkeys(r[2] for r in tau_rows))
            w = 0.8 / max(len(pairs), 1)
            for ax, subset in zip(axes, SUBSETS):
                if all(r[4] is None for r in tau_rows if r[3] == subset):
                    ax.text(0.5, 0.5, "no defined examples", transform=ax.transAxes,
                            ha="center")
                for i, pair in enumerate(pairs):
                    vals = {r[2]: r[4] for r in tau_rows if (r[0], r[1]) == pair and r[3] == subset}
                    xs = [x + (i - (len(pairs) - 1) / 2) * w for x in range(len(ks))]
                    ax.bar(xs, [vals.get(k) if vals.get(k) is not None else 0.0 for k in ks], w,
                           label=f"{pair[0]} vs {pair[1]}")
                ax.set_xticks(range(len(ks)))
                ax.set_xticklabels([f"top-{k}" for k in ks])
                ax.set_title(subset.replace("_", " "))
                ax.set_ylabel("mean Kendall's tau")
            axes[0].legend(fontsize=7)
            return fig

        return EvalResult(
            protocol=protocol,
            tables={"kendall_tau": table(["model_a", "model_b", "k", "subset", "tau", "n_defined",
                                          "n_undefined"], tau_rows),
                    "top1_f1": table(["model_a", "model_b", "f1", "top1_agreement", "accuracy_a",
                                      "accuracy_b", "n"], f1_rows)},
            tensors=tensors, data=data, figures={"tau": plot},
        )
