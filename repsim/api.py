"""The Python API for users who do not write a recipe."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from repsim.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from repsim.metrics.base import Metric
    from repsim.metrics.results import SimilarityResult
    from repsim.models.base import LoadedModel


def get_metric(metric: str | Metric, **params: Any) -> Metric:
    """A metric by registry name (parameters validated), or a metric object as given."""
    from repsim.metrics.base import Metric
    from repsim.plugins import build_part

    if isinstance(metric, Metric):
        if params:
            raise RecipeError("pass parameters when building the metric object, not both")
        return metric
    return build_part("metric", metric, **params)


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
    :class:`~repsim.metrics.results.SimilarityResult` with ``.values`` (float64
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
    from repsim.plugins import build_part

    return build_part("model", name, **params)


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
    reduce: str | tuple[str, str] = "cls",
    num_prefix_tokens: int | None = None,
    batch_size: int | None = None,
) -> SimilarityResult:
    """Compare two networks layer by layer on an iterable of input batches.

    ``data`` yields tensors (or ``(inputs, labels)`` tuples) already preprocessed for both models.
    Layers are glob patterns on module paths (default: the top-level modules). ``reduce`` is the
    token reduction of both models (``cls``, as in recipes) or one per model, e.g.
    ``("cls", "gap")`` for a ViT against a CNN. A streaming metric sees consecutive minibatches
    of ``batch_size`` examples (default: each input batch), so features are never all held in
    memory; other metrics gather the reduced features in memory.
    """
    import torch

    from repsim.layers import LayerTap, reduce_output
    from repsim.metrics.base import StreamingMetric
    from repsim.metrics.engine import similarity_matrix, warn_notes
    from repsim.run.sinks import MetricSink

    a = _as_loaded(model_a, "model_a", num_prefix_tokens)
    b = _as_loaded(model_b, "model_b", num_prefix_tokens)
    la, lb = _select(a, layers_a), _select(b, layers_b)
    ra, rb = (reduce, reduce) if isinstance(reduce, str) else reduce
    m = get_metric(metric)
    streaming = isinstance(m, StreamingMetric) and m.properties.streaming
    sink: MetricSink | None = None
    gathered: dict[str, dict[str, list[torch.Tensor]]] = {"a": {}, "b": {}}
    tap_a, tap_b = LayerTap(a, la), LayerTap(b, lb)
    with tap_a.attached(), tap_b.attached():
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            feats = {
                "a": {k: reduce_output(v, ra, a.num_prefix_tokens, f"model_a layer '{k}'")
                      for k, v in tap_a.run(x).items()},
                "b": {k: reduce_output(v, rb, b.num_prefix_tokens, f"model_b layer '{k}'")
                      for k, v in tap_b.run(x).items()}}
            if not streaming:
                for side, layers in feats.items():
                    for k, v in layers.items():
                        gathered[side].setdefault(k, []).append(v.detach().cpu())
                continue
            if sink is None:
                sink = MetricSink(m.name, m, {"a": la, "b": lb}, [("a", "b")],  # type: ignore
                                  batch_size or int(x.shape[0]), device=x.device)
            sink.update_features(feats)
    if streaming:
        if sink is None:
            raise RecipeError("compare() got no input batches: `data` yielded nothing.")
        result = sink.compute()[("a", "b")]
    else:
        result = similarity_matrix(
            m, {k: torch.cat(v) for k, v in gathered["a"].items()},
            {k: torch.cat(v) for k, v in gathered["b"].items()},
            row_names=[f"model_a layer '{k}'" for k in la],
            col_names=[f"model_b layer '{k}'" for k in lb])
    warn_notes(result.notes)
    return result
