"""Helpers shared by the built-in evaluators (no torch at import)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import TYPE_CHECKING, Any

from repsim.errors import FeatureError, RecipeError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from repsim.evaluators.base import EvalContext

# What a context may raise for something the run did not produce (a reduction a CNN lacks, a
# similarity not computed): the evaluator skips it with a note instead of failing the whole run.
MISSING = (FeatureError, LookupError)


def resolve_models(ctx: EvalContext, names: Sequence[str] | None, evaluator: str) -> list[str]:
    """The requested models (recipe order when None), each checked against the run's."""
    if names is None:
        return list(ctx.models)
    unknown = [m for m in names if m not in ctx.models]
    if unknown:
        raise RecipeError(f"evaluator '{evaluator}': unknown model(s) {unknown}; the run has "
                          f"{list(ctx.models)}.")
    return list(names)


def resolve_pairs(ctx: EvalContext, models: Sequence[str] | None,
                  pairs: Sequence[tuple[str, str]] | None, evaluator: str) -> list[tuple[str, str]]:
    """Explicit pairs, or every unordered pair of the models in recipe order."""
    if pairs is not None:
        for a, b in pairs:
            resolve_models(ctx, [a, b], evaluator)
        return [tuple(p) for p in pairs]  # type: ignore[misc]
    return list(combinations(resolve_models(ctx, models, evaluator), 2))


def expand_layer(ctx: EvalContext, model: str, name: str, evaluator: str) -> list[str]:
    """A layer name, or a group name expanded to its layers."""
    groups = ctx.groups(model)
    if name in groups:
        return list(groups[name])
    layers = ctx.layers(model)
    if name in layers:
        return [name]
    raise RecipeError(f"evaluator '{evaluator}': model '{model}' has no layer or group '{name}'. "
                      f"Layers: {layers[:8]}{' ...' if len(layers) > 8 else ''}; "
                      f"groups: {list(groups)}.")


def resolve_layers(ctx: EvalContext, model: str, names: Sequence[str] | None,
                   evaluator: str, group: str | None = None) -> list[str]:
    """Explicit layer/group names; else the layers of ``group``; else every selected layer.

    A model without ``group`` gets no layers (the caller notes the skip): a run's selected layers
    are listed group after group, so falling back to all of them would mix layer types.
    """
    if names is not None:
        out: list[str] = []
        for name in names:
            out.extend(la for la in expand_layer(ctx, model, name, evaluator) if la not in out)
        return out
    if group is not None:
        return list(ctx.groups(model).get(group, []))
    return list(ctx.layers(model))


def cached_layers(names: Sequence[str | Sequence[str]] | None, group: str | None
                  ) -> tuple[str, ...] | None:
    """``FeatureNeeds.layers`` for explicit names (nested lists flattened), else ``group``;
    None (every selected layer) when neither is given."""
    if names is not None:
        flat = [n for item in names for n in ([item] if isinstance(item, str) else item)]
        return tuple(dict.fromkeys(flat))
    return None if group is None else (group,)


def json_float(x: float) -> float | None:
    """A float for JSON: NaN and ±Inf become None (null)."""
    x = float(x)
    return x if math.isfinite(x) else None


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.6
           ) -> tuple[Figure, list[Axes]]:
    """A pyplot-free figure (no global state, no GUI backend) with ``ncols`` panels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def layer_axis(ax: Axes, layers_of: Mapping[str, Sequence[str]]) -> None:
    """Ticks at layer positions 1..L, labelled with the layer names when every model shares them
    and they fit."""
    names = list(layers_of.values())
    longest = max((len(n) for n in names), default=0)
    ax.set_xticks(list(range(1, longest + 1)))
    if names and all(n == names[0] for n in names) and longest <= 16:
        ax.set_xticklabels(names[0], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("layer")
    else:
        ax.set_xlabel("layer position (network order)")


def table(headers: list[str], rows: list[list[Any]]) -> tuple[list[str], list[list[Any]]]:
    """A table with NaN cells as None, so it serialises as JSON."""
    clean = [[json_float(v) if isinstance(v, float) else v for v in row] for row in rows]
    return headers, clean
