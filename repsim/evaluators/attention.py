"""Attention distance and attention collapse of ViTs (Park et al., ICLR 2023), streamed.

Both read each block's post-softmax attention ``[B, heads, T, T]`` batch by batch during the data
pass (layer selector ``attn_maps``) and keep only per-head sums, so memory is one batch of maps
whatever the number of examples. Prefix tokens (CLS, registers) are dropped as queries and keys,
and each query's attention over the remaining Q = h·w patch tokens is renormalised to sum to 1.
``docs/evaluators.md`` gives the definitions; Park et al.'s notebook
(``self_attention_analysis.ipynb``) is the reference they are tested against.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from repsim.errors import FeatureError
from repsim.evaluators._common import figure, json_float, table
from repsim.evaluators.base import (EvalContext, EvalResult, FeatureNeeds, ObserveSpec,
                                    StreamingEvaluator)
from repsim.evaluators.params import (AttentionCollapseParams, AttentionDistanceParams,
                                      AttentionParams)
from repsim.layers import INPUT_SUFFIX, natural_key

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes


# ---------------------------------------------------------------------------- plain functions

def patch_grid(n_tokens: int, num_prefix_tokens: int = 0,
               grid_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(h, w)`` patch grid of ``n_tokens`` tokens (prefix tokens first, then the patches in
    row-major order); without ``grid_size`` the patches must form a square."""
    n = n_tokens - num_prefix_tokens
    if grid_size is None:
        side = math.isqrt(max(n, 0))
        if n <= 0 or side * side != n:
            raise FeatureError(f"{n_tokens} tokens minus {num_prefix_tokens} prefix tokens = {n} "
                               "patches do not form a square grid; give grid_size.")
        return side, side
    h, w = (int(s) for s in grid_size)
    if h * w != n:
        raise FeatureError(f"{n_tokens} tokens minus {num_prefix_tokens} prefix tokens = {n} "
                           f"patches, but the patch grid is {h}x{w} = {h * w}.")
    return h, w


def _patch_block(attn: torch.Tensor, num_prefix_tokens: int,
                 grid_size: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """The patch-to-patch block of ``[B, H, T, T]`` maps (a view, at least float32) and the grid."""
    import torch

    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise FeatureError(f"attention maps must be [B, heads, T, T]; got {tuple(attn.shape)}.")
    grid = patch_grid(attn.shape[-1], num_prefix_tokens, grid_size)
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    return a.to(torch.promote_types(a.dtype, torch.float32)), grid


def spatial_attention(attn: torch.Tensor, num_prefix_tokens: int = 0,
                      grid_size: tuple[int, int] | None = None, eps: float = 0.0) -> torch.Tensor:
    """Attention among patch tokens only: ``[B, H, Q, Q]`` with rows summing to 1.

    Prefix-token rows and columns are dropped, ``eps`` is added to every weight, and each row is
    renormalised; a row with no mass left (all of it on prefix tokens) becomes uniform, as Park
    et al.'s ``+ 1e-32`` makes it.
    """
    import torch

    a, (h, w) = _patch_block(attn, num_prefix_tokens, grid_size)
    if eps:
        a = a + eps
    mass = a.sum(-1, keepdim=True)
    a = a / mass.clamp_min(torch.finfo(a.dtype).tiny)
    return a.masked_fill_(mass == 0, 1.0 / (h * w))


@functools.lru_cache(maxsize=8)
def _grid_distances(h: int, w: int) -> torch.Tensor:
    """``[h·w, h·w]`` Euclidean distances (in patches) between row-major grid positions (cached
    per grid: every batch of every block asks for the same one; never modified)."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double()
    return (pos[:, None] - pos[None]).pow(2).sum(-1).sqrt()


def attention_distance(attn: torch.Tensor, num_prefix_tokens: int = 0,
                       grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Mean attention distance in patches, ``[B, H]``: Σ_k a_qk ‖pos_q − pos_k‖ averaged over
    the queries of each example and head (``.mean(0)`` averages over examples; multiply by the
    patch size for pixels). ``a`` is :func:`spatial_attention`, formed row by row here without
    a renormalised copy of the maps."""
    import torch

    a, (h, w) = _patch_block(attn, num_prefix_tokens, grid_size)
    d = _grid_distances(h, w).to(a.device, a.dtype)
    mass = a.sum(-1)
    per_query = torch.einsum("bhqk,qk->bhq", a, d) / mass.clamp_min(torch.finfo(a.dtype).tiny)
    # A row without mass on the patches is uniform (spatial_attention): its mean distance.
    per_query = torch.where(mass > 0, per_query, d.mean(-1))
    return per_query.mean(-1)


def _mean_pairwise_cosine(v: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the n(n−1) ordered pairs of distinct rows of ``v[..., n, d]``
    (NaN when n = 1): (‖Σ_i v_i / ‖v_i‖‖² − n) / (n(n − 1)), without an n×n matrix or a
    normalised copy of ``v`` (rows must be non-zero)."""
    import torch

    n = v.shape[-2]
    if n < 2:
        return torch.full(v.shape[:-2], float("nan"), dtype=v.dtype, device=v.device)
    s = torch.einsum("...nd,...n->...d", v, 1 / torch.linalg.vector_norm(v, dim=-1))
    return (s.pow(2).sum(-1) - n) / (n * (n - 1))


def attention_collapse(attn: torch.Tensor, num_prefix_tokens: int = 0,
                       grid_size: tuple[int, int] | None = None, eps: float = 0.0
                       ) -> dict[str, torch.Tensor]:
    """How homogeneous attention is, per example: ``nmi`` ``[B, H]`` (normalised mutual
    information between query and key positions; 0 = every query attends alike, 1 = queries
    attend one-to-one to distinct keys), ``query_similarity`` ``[B, H]`` (mean cosine similarity
    of the attention rows of different queries; 1 = collapsed) and ``head_similarity`` ``[B]``
    (mean cosine similarity of different heads' whole maps). ``eps`` is added to the attention
    weights before renormalising (:func:`spatial_attention`); Park et al. use 1e-8."""
    import torch

    a = spatial_attention(attn, num_prefix_tokens, grid_size, eps)
    q = a.shape[-1]
    p_k = a.mean(-2)  # key marginal under uniform queries, p(q) = 1/Q
    h_k = -torch.xlogy(p_k, p_k).sum(-1)
    h_k_given_q = -torch.xlogy(a, a).sum(-1).mean(-1)
    mi = (h_k - h_k_given_q).clamp_min(0)  # I(Q; K) = H(K) − H(K | Q) ≥ 0 up to rounding
    denom = (math.log(q) * h_k).sqrt()
    # H(K) = 0: every query attends to one same key, complete collapse, and I(Q; K) = 0 too.
    nmi = torch.where(denom > 0, mi / denom.clamp_min(torch.finfo(a.dtype).tiny),
                      torch.zeros_like(mi))
    return {"nmi": nmi, "query_similarity": _mean_pairwise_cosine(a),
            "head_similarity": _mean_pairwise_cosine(a.flatten(-2))}


def attention_nmi(attn: torch.Tensor, num_prefix_tokens: int = 0,
                  grid_size: tuple[int, int] | None = None, eps: float = 0.0) -> torch.Tensor:
    """Park et al.'s normalised mutual information ``[B, H]`` (see :func:`attention_collapse`)."""
    return attention_collapse(attn, num_prefix_tokens, grid_size, eps)["nmi"]


# ---------------------------------------------------------------------------- streaming base

def layer_depth(layer: str, position: int) -> int:
    """Depth of a ViT layer: block N (``blocks.N...``) is at N + 1, the tokens entering block N
    (``blocks.N:in``) at N, so the embedding is depth 0; other names keep ``position``."""
    m = re.match(r"blocks\.(\d+)(.*)", layer)
    if m is None:
        return position
    return int(m.group(1)) + (0 if m.group(2) == INPUT_SUFFIX else 1)


class LayerSumsEvaluator(StreamingEvaluator):
    """A streaming evaluator whose state is float64 sums per (model, layer, statistic).

    Keys are ``model|layer|statistic``; every layer has a ``count`` of examples. Additive, so the
    run saves it with its resumable state and a resumed pass continues the sums. Parameters must
    have a ``split``: the one split observed.
    """

    needs = FeatureNeeds(splits=())
    watches = "outputs"  # what the notes call the observed outputs

    def __init__(self, params: Any, name: str | None) -> None:
        super().__init__(params, name)
        self.sums: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []

    def _add(self, model: str, layer: str, stats: Mapping[str, torch.Tensor]) -> None:
        import torch

        for stat, value in stats.items():
            key = f"{model}|{layer}|{stat}"
            v = value.detach().to("cpu", torch.float64)
            prev = self.sums.get(key)
            self.sums[key] = v if prev is None else prev + v

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.sums)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        self.sums = {k: v.to(torch.float64) for k, v in state.items()}

    def observed(self, ctx: EvalContext) -> dict[str, list[str]]:
        """Observed layers per model (the run's model order, then any others), in network order:
        a block's input before its output."""
        found: dict[str, list[str]] = {}
        for key in self.sums:
            model, layer, _ = key.rsplit("|", 2)
            if layer not in found.setdefault(model, []):
                found[model].append(layer)
        order = [m for m in ctx.models if m in found] + [m for m in found if m not in ctx.models]

        def key(layer: str) -> tuple[list[object], bool]:
            return natural_key(layer.removesuffix(INPUT_SUFFIX)), not layer.endswith(INPUT_SUFFIX)

        return {m: sorted(found[m], key=key) for m in order}

    def mean(self, model: str, layer: str, stat: str) -> torch.Tensor:
        """The per-example mean of a statistic."""
        return self.sums[f"{model}|{layer}|{stat}"] / self.sums[f"{model}|{layer}|count"]

    def count(self, model: str, layer: str) -> int:
        return int(self.sums[f"{model}|{layer}|count"].sum())

    def run_notes(self, ctx: EvalContext, observed: Mapping[str, list[str]]) -> list[str]:
        """This session's notes, plus one for every model of the run nothing was observed of."""
        notes = list(self.notes)
        for model in ctx.models:
            if model not in observed:
                family = ctx.model_info(model).get("family", "?")
                notes.append(f"{model}: skipped, no {self.watches} observed (family '{family}'; "
                             "needs a timm ViT)")
        return notes

    def protocol_base(self, observed: Mapping[str, list[str]]) -> dict[str, Any]:
        return {"evaluator": self.name, "split": self.params.split,
                "examples": {m: self.count(m, layers[0]) for m, layers in observed.items()},
                "layers": dict(observed)}


class _AttentionEvaluator(LayerSumsEvaluator):
    watches = "attention maps"

    def __init__(self, params: AttentionParams, name: str | None) -> None:
        super().__init__(params, name)
        self.observes = ObserveSpec("attn_maps", {"indices": params.indices}, (params.split,))


def depth_axis(ax: Axes, label: str = "depth (block)") -> None:
    """An x axis of whole depths."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _per_head_plot(ax: Axes, values: Mapping[str, torch.Tensor],
                   depths: Mapping[str, list[int]], label: str) -> None:
    """Each head as a dot and the mean over heads as a line, against depth, one colour a model."""
    for i, (model, v) in enumerate(values.items()):
        colour = f"C{i % 10}"
        x = depths[model]
        for head in range(v.shape[1]):
            ax.scatter(x, v[:, head].numpy(), s=10, color=colour, alpha=0.45)
        ax.plot(x, v.mean(1).numpy(), marker="o", color=colour, label=model)
    depth_axis(ax)
    ax.set_ylabel(label)
    ax.legend(fontsize=7)


class AttentionDistanceEvaluator(_AttentionEvaluator):
    """Mean attention distance per block and head (Park et al. 2023 Fig. 'attention distance')."""

    params: AttentionDistanceParams

    def __init__(self, params: AttentionDistanceParams | None = None,
                 name: str | None = "attention_distance") -> None:
        super().__init__(params or AttentionDistanceParams(), name)

    def observe(self, split: str, model: str, layer: str, raw: torch.Tensor,
                labels: torch.Tensor, info: Mapping[str, Any]) -> None:
        import torch

        if split != self.params.split:
            return
        try:
            d = attention_distance(raw, int(info.get("num_prefix_tokens", 0)),
                                   info.get("grid_size"))
        except FeatureError as exc:  # not a ViT's attention maps
            self._note(f"{model} {layer}: skipped ({exc})")
            return
        self._add(model, layer, {"distance": d.sum(0), "count": torch.tensor([d.shape[0]])})

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        observed = self.observed(ctx)
        notes = self.run_notes(ctx, observed)
        tensors: dict[str, torch.Tensor] = {}
        depths: dict[str, list[int]] = {}
        units: dict[str, str] = {}
        head_rows: list[list[Any]] = []
        block_rows: list[list[Any]] = []
        for model, layers in observed.items():
            scale, units[model] = 1.0, "patches"
            if self.params.unit == "pixels":
                size = _patch_size(ctx.model_info(model))
                if size is None:
                    notes.append(f"{model}: distances in patches, its (square) patch size is "
                                 "unknown")
                else:
                    scale, units[model] = float(size), "pixels"
            dist = torch.stack([self.mean(model, la, "distance") for la in layers]) * scale
            tensors[f"distance/{model}"] = dist
            depths[model] = [layer_depth(la, i + 1) for i, la in enumerate(layers)]
            for i, layer in enumerate(layers):
                row = dist[i]
                block_rows.append([model, layer, depths[model][i], float(row.mean()),
                                   float(row.min()), float(row.max()), units[model]])
                head_rows += [[model, layer, depths[model][i], h, float(row[h]), units[model]]
                              for h in range(row.numel())]
        protocol = {
            **self.protocol_base(observed),
            "protocol": "mean attention distance (Park et al. 2023; Dosovitskiy et al. 2021)",
            "definition": "per example and head: mean over query patches q of "
                          "sum_k a_qk * ||pos_q - pos_k||_2 (patch grid positions), with prefix "
                          "tokens dropped as queries and keys and rows renormalised; then the "
                          "mean over examples",
            "unit": units, "tensor_layout": "distance/<model>: [block, head]", "notes": notes,
        }

        def plot():
            fig, axes = figure(1)
            _per_head_plot(axes[0], {m: tensors[f"distance/{m}"] for m in observed}, depths,
                           "attention distance (" + "/".join(sorted(set(units.values())) or
                                                              ["patches"]) + ")")
            axes[0].set_title("attention distance (dots: heads, line: mean)")
            return fig

        return EvalResult(
            protocol=protocol,
            tables={"per_block": table(["model", "layer", "depth", "mean", "min", "max", "unit"],
                                       block_rows),
                    "per_head": table(["model", "layer", "depth", "head", "distance", "unit"],
                                      head_rows)},
            tensors=tensors,
            data={"distance": {m: [[json_float(x) for x in r] for r in tensors[f"distance/{m}"]
                                   .tolist()] for m in observed},
                  "depth": depths, "unit": units},
            figures={"attention_distance": plot},
        )


def _patch_size(info: Mapping[str, Any]) -> int | None:
    """A model's square patch size, from ``info["patch_size"]`` (None if not square)."""
    size = info.get("patch_size")
    if isinstance(size, (tuple, list)):
        size = size[0] if len(set(size)) == 1 else None
    return int(size) if size is not None else None


class AttentionCollapseEvaluator(_AttentionEvaluator):
    """Attention collapse per block and head: NMI between query and key positions (Park et al.'s
    measure), query-to-query and head-to-head cosine similarity of the maps."""

    params: AttentionCollapseParams
    _STATS = ("nmi", "query_similarity")

    def __init__(self, params: AttentionCollapseParams | None = None,
                 name: str | None = "attention_collapse") -> None:
        super().__init__(params or AttentionCollapseParams(), name)

    def observe(self, split: str, model: str, layer: str, raw: torch.Tensor,
                labels: torch.Tensor, info: Mapping[str, Any]) -> None:
        import torch

        if split != self.params.split:
            return
        try:
            c = attention_collapse(raw, int(info.get("num_prefix_tokens", 0)),
                                   info.get("grid_size"), self.params.eps)
        except FeatureError as exc:  # not a ViT's attention maps
            self._note(f"{model} {layer}: skipped ({exc})")
            return
        self._add(model, layer, {"nmi": c["nmi"].sum(0),
                                 "query_similarity": c["query_similarity"].sum(0),
                                 "head_similarity": c["head_similarity"].sum(0, keepdim=True),
                                 "count": torch.tensor([raw.shape[0]])})

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        observed = self.observed(ctx)
        notes = self.run_notes(ctx, observed)
        tensors: dict[str, torch.Tensor] = {}
        depths: dict[str, list[int]] = {}
        head_rows: list[list[Any]] = []
        block_rows: list[list[Any]] = []
        for model, layers in observed.items():
            depths[model] = [layer_depth(la, i + 1) for i, la in enumerate(layers)]
            for stat in self._STATS:
                tensors[f"{stat}/{model}"] = torch.stack([self.mean(model, la, stat)
                                                          for la in layers])
            heads = torch.cat([self.mean(model, la, "head_similarity") for la in layers])
            tensors[f"head_similarity/{model}"] = heads
            nmi, qsim = tensors[f"nmi/{model}"], tensors[f"query_similarity/{model}"]
            for i, layer in enumerate(layers):
                block_rows.append([model, layer, depths[model][i], float(nmi[i].mean()),
                                   float(qsim[i].mean()), float(heads[i])])
                head_rows += [[model, layer, depths[model][i], h, float(nmi[i, h]),
                               float(qsim[i, h])] for h in range(nmi.shape[1])]
        protocol = {
            **self.protocol_base(observed),
            "protocol": "attention collapse (Park et al. 2023): NMI between query and key "
                        "positions; cosine similarity of attention across queries and heads",
            "nmi": "per example and head, with p(q) = 1/Q and p(k|q) = a_qk (patch tokens only, "
                   "rows renormalised): I(Q;K) / sqrt(H(Q) H(K)), I(Q;K) = H(K) - H(K|Q), "
                   "H(Q) = log Q, natural log, 0 log 0 = 0; 0 when H(K) = 0; then the mean over "
                   "examples",
            "eps": self.params.eps,
            "query_similarity": "mean cosine similarity of the attention rows of the Q(Q-1) "
                                "ordered pairs of distinct queries, per example and head",
            "head_similarity": "mean cosine similarity of the flattened [Q, Q] maps of distinct "
                               "heads, per example (NaN with one head)",
            "tensor_layout": "nmi/<model>, query_similarity/<model>: [block, head]; "
                             "head_similarity/<model>: [block]",
            "notes": notes,
        }

        def plot():
            fig, axes = figure(3)
            _per_head_plot(axes[0], {m: tensors[f"nmi/{m}"] for m in observed}, depths,
                           "normalised mutual information")
            axes[0].set_title("NMI (low: collapsed)")
            _per_head_plot(axes[1], {m: tensors[f"query_similarity/{m}"] for m in observed},
                           depths, "cosine similarity between queries")
            axes[1].set_title("query similarity (high: collapsed)")
            for model in observed:
                axes[2].plot(depths[model], tensors[f"head_similarity/{model}"].numpy(),
                             marker="o", label=model)
            depth_axis(axes[2])
            axes[2].set_ylabel("cosine similarity between heads")
            axes[2].set_title("head similarity (high: collapsed)")
            axes[2].legend(fontsize=7)
            return fig

        def listed(t: torch.Tensor) -> list[Any]:
            return [json_float(x) if not isinstance(x, list) else [json_float(y) for y in x]
                    for x in t.tolist()]

        return EvalResult(
            protocol=protocol,
            tables={"per_block": table(["model", "layer", "depth", "nmi", "query_similarity",
                                        "head_similarity"], block_rows),
                    "per_head": table(["model", "layer", "depth", "head", "nmi",
                                       "query_similarity"], head_rows)},
            tensors=tensors,
            data={"depth": depths} | {stat: {m: listed(tensors[f"{stat}/{m}"]) for m in observed}
                                      for stat in (*self._STATS, "head_similarity")},
            figures={"attention_collapse": plot},
        )
