"""The Python API for users who do not write a recipe."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from repsim.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from repsim.metrics.base import Metric
    from repsim.metrics.engine import SimilarityResult
    from repsim.models.base import LoadedModel


def get_metric(metric: str | Metric, **params: Any) -> Metric:
    """A metric by registry name (parameters validated), or a metric object as given."""
    from repsim.metrics.base import Metric
    from repsim.plugins import registry

    if isinstance(metric, Metric):
        if params:
            raise RecipeError("pass parameters when building the metric object, not both")
        return metric
    part = registry("metric").get(metric)
    built = part.create(params)
    built.name = part.name
    return built


def similarity(
    feats_a: Mapping[str, torch.Tensor],
    feats_b: Mapping[str, torch.Tensor],
    metric: str | Metric = "minibatch_cka",
    batch_size: int = 32,
    keep_batches: bool = False,
    **params: Any,
) -> SimilarityResult:
    """Compare every layer of ``feats_a`` with every layer of ``feats_b``.

    Each mapping is layer name → ``[N, ...]`` tensor (flattened past dim 0), the same N examples
    in the same order; streaming metrics use consecutive minibatches of ``batch_size``. Returns a
    :class:`~repsim.metrics.engine.SimilarityResult` with ``.values`` (float64
    ``[len(feats_a), len(feats_b)]``), ``.rows``, ``.cols`` and ``.metric``.
    """
    from repsim.metrics.engine import similarity_matrix, warn_notes

    result = similarity_matrix(get_metric(metric, **params), feats_a, feats_b, batch_size,
                               keep_batches)
    warn_notes(result.notes)
    return result


def build_model(name: str, **params: Any) -> LoadedModel:
    """Build a registered model: ``build_model("timm", arch="vit_tiny_patch16_224")``.

    Returns a :class:`~repsim.models.LoadedModel` with ``.module`` and ``.preprocess``.
    """
    from repsim.plugins import registry

    part = registry("model").get(name)
    model = part.create(params)
    if not model.name:
        model.name = name
    return model


def _as_loaded(model: nn.Module | LoadedModel, name: str, num_prefix_tokens: int | None
               ) -> LoadedModel:
    from repsim.models.base import LoadedModel, Preprocess

    if isinstance(model, LoadedModel):
        return model
    npt = num_prefix_tokens if num_prefix_tokens is not None else \
        int(getattr(model, "num_prefix_tokens", 0))
    return LoadedModel(model, Preprocess(), name=name, num_prefix_tokens=npt)


def _select(model: LoadedModel, layers: str | Sequence[str] | None) -> list[str]:
    from repsim.layers import GlobParams, GlobSelector, module_names

    if layers is None:
        return [n for n in module_names(model.module) if "." not in n]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    return GlobSelector(GlobParams(patterns=patterns)).select(model)


def compare(
    model_a: nn.Module | LoadedModel,
    model_b: nn.Module | LoadedModel,
    data: Iterable[Any],
    layers_a: str | Sequence[str] | None = None,
    layers_b: str | Sequence[str] | None = None,
    metric: str | Metric = "minibatch_cka",
    reduce: str = "flatten",
    num_prefix_tokens: int | None = None,
) -> SimilarityResult:
    """Compare two networks layer by layer on an iterable of input batches.

    ``data`` yields tensors (or ``(inputs, labels)`` tuples) already preprocessed for both models.
    Layers are glob patterns on module paths (default: the top-level modules). For a streaming
    metric each batch is one minibatch; features are never all held in memory. For other metrics
    the reduced features are gathered in memory.
    """
    from repsim.layers import LayerTap, reduce_output
    from repsim.metrics.engine import warn_notes
    from repsim.metrics.accumulate import SimilarityAccumulator

    a = _as_loaded(model_a, "model_a", num_prefix_tokens)
    b = _as_loaded(model_b, "model_b", num_prefix_tokens)
    la, lb = _select(a, layers_a), _select(b, layers_b)
    m = get_metric(metric)
    acc = SimilarityAccumulator(m, {"a": la, "b": lb}, [("a", "b")])
    tap_a, tap_b = LayerTap(a, la), LayerTap(b, lb)
    with tap_a.attached(), tap_b.attached():
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            fa = {k: reduce_output(v, reduce, a.num_prefix_tokens, f"model_a layer '{k}'")
                  for k, v in tap_a.run(x).items()}
            fb = {k: reduce_output(v, reduce, b.num_prefix_tokens, f"model_b layer '{k}'")
                  for k, v in tap_b.run(x).items()}
            acc.update({"a": fa, "b": fb})
    result = acc.result("a", "b")
    warn_notes(result.notes)
    return result
