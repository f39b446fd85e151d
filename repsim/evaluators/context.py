"""An :class:`~repsim.evaluators.base.EvalContext` over tensors in memory.

Lets every evaluator run from Python without a recipe (and lets the tests drive them)::

    ctx = InMemoryContext(
        features={"dino": {"train": {"blocks.11": tok_train}, "eval": {"blocks.11": tok_eval}}},
        labels={"train": y_train, "eval": y_eval},
        num_prefix_tokens={"dino": 1},
    )
    result = repsim.evaluators.evaluate("knn", ctx, k=20)

A layer's entry is ``[N, D]`` features, ``[N, T, D]`` tokens or ``[N, C, H, W]`` maps (reduced on
request with the run's own :func:`repsim.layers.reduce_output`), or a mapping reduction →
``[N, D]`` for features already reduced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from repsim.errors import FeatureError

if TYPE_CHECKING:
    import torch

    from repsim.evaluators.access import DataAccess, ModelAccess
    from repsim.evaluators.base import Progress
    from repsim.metrics.results import SimilarityResult


class InMemoryContext:
    """Read-only view of features, labels, outputs and similarity results held in memory.

    ``features[model][split][layer]``: see the module docstring. ``labels[split]``: ``[N]``.
    ``outputs[model][split]``: ``[N, C]`` class scores. ``similarities[(metric, model_a,
    model_b)]``: a :class:`~repsim.metrics.results.SimilarityResult` (asked the other way round, it
    is returned transposed). ``default_reduction``: the reduction used when an evaluator asks for
    none (one for all models or per model); ``num_prefix_tokens`` per model (CLS = 1).
    ``model_access`` / ``data_access``: what :meth:`model` and :meth:`data` return, per model
    label and per split. Anything absent raises ``KeyError`` naming what exists. It is one
    process: the ``local_*`` views are the whole splits, and progress is silent.
    """

    rank, world_size, group = 0, 1, None

    def __init__(
        self,
        features: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
        labels: Mapping[str, torch.Tensor] | None = None,
        outputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        similarities: Mapping[tuple[str, str, str], SimilarityResult] | None = None,
        *,
        models: list[str] | None = None,
        groups: Mapping[str, Mapping[str, list[str]]] | None = None,
        model_info: Mapping[str, Mapping[str, Any]] | None = None,
        classes: list[str] | None = None,
        num_prefix_tokens: Mapping[str, int] | None = None,
        default_reduction: str | Mapping[str, str] | None = None,
        seed: int = 0,
        model_access: Mapping[str, ModelAccess] | None = None,
        data_access: Mapping[str, DataAccess] | None = None,
    ) -> None:
        self._features = {m: {s: dict(ls) for s, ls in sp.items()} for m, sp in
                          (features or {}).items()}
        self._labels = dict(labels or {})
        self._outputs = {m: dict(sp) for m, sp in (outputs or {}).items()}
        self._similarities = dict(similarities or {})
        self._groups = {m: {g: list(ls) for g, ls in gs.items()} for m, gs in
                        (groups or {}).items()}
        self._info = {m: dict(i) for m, i in (model_info or {}).items()}
        self._classes = classes
        self._prefix = dict(num_prefix_tokens or {})
        self._default = default_reduction
        self._reduced: dict[tuple[str, str, str, str | None], torch.Tensor] = {}
        seen = [*self._features, *self._outputs,
                *(m for _, a, b in self._similarities for m in (a, b))]
        self.models: list[str] = list(models) if models is not None else list(dict.fromkeys(seen))
        self.seed = seed
        self._model_access = dict(model_access or {})
        self._data_access = dict(data_access or {})

    def layers(self, model: str) -> list[str]:
        """Layers in the order the first split's mapping lists them (give them in network order)."""
        splits = self._get(self._features, model, "model with features")
        return list(next(iter(splits.values()), {}))

    def groups(self, model: str) -> dict[str, list[str]]:
        return dict(self._groups.get(model, {}))

    def features(self, model: str, layer: str, split: str = "eval",
                 reduction: str | None = None) -> torch.Tensor:
        key = (model, layer, split, reduction)
        if key not in self._reduced:
            splits = self._get(self._features, model, "model with features")
            stored = self._get(self._get(splits, split, f"split of model '{model}'"), layer,
                               f"layer of model '{model}', split '{split}'")
            self._reduced[key] = self._reduce(model, layer, stored, reduction)
        return self._reduced[key]

    def _reduce(self, model: str, layer: str, stored: Any, reduction: str | None
                ) -> torch.Tensor:
        from repsim.layers import reduce_output

        where = f"model '{model}' layer '{layer}'"
        if isinstance(stored, Mapping):
            if reduction is None and len(stored) == 1:
                return next(iter(stored.values())).float()
            if reduction is None:
                reduction = self._default_for(model)
            return self._get(stored, reduction, f"reduction of {where}").float()
        if reduction is None:
            if stored.ndim == 2:
                return stored.float()
            reduction = self._default_for(model)
            if reduction is None:
                raise FeatureError(f"{where} holds {stored.ndim}-d outputs and no reduction was "
                                   "asked for: pass default_reduction to InMemoryContext.")
        if stored.ndim == 2:
            raise FeatureError(f"{where} holds reduced [N, D] features; it cannot give the "
                               f"'{reduction}' reduction. Store tokens, or a mapping reduction "
                               "-> features.")
        return reduce_output(stored, reduction, self._prefix.get(model, 0), where).float()

    def _default_for(self, model: str) -> str | None:
        if isinstance(self._default, Mapping):
            return self._default.get(model)
        return self._default

    def labels(self, split: str = "eval") -> torch.Tensor:
        return self._get(self._labels, split, "split with labels")

    def local_features(self, model: str, layer: str, split: str = "eval",
                       reduction: str | None = None) -> torch.Tensor:
        return self.features(model, layer, split, reduction)

    def local_labels(self, split: str = "eval") -> torch.Tensor:
        return self.labels(split)

    def local_index(self, split: str = "eval") -> torch.Tensor:
        import torch

        return torch.arange(self.labels(split).shape[0])

    def progress(self, total: int, unit: str) -> Progress:
        from repsim.evaluators.base import Progress

        return Progress(lambda _: None, "in memory", total, unit)

    def output(self, model: str, split: str = "eval") -> torch.Tensor:
        splits = self._get(self._outputs, model, "model with outputs")
        return self._get(splits, split, f"split with outputs of model '{model}'")

    def similarity(self, metric: str, model_a: str, model_b: str) -> SimilarityResult:
        if (metric, model_a, model_b) in self._similarities:
            return self._similarities[(metric, model_a, model_b)]
        return self._get(self._similarities, (metric, model_b, model_a), "similarity result").T

    def model(self, model: str) -> ModelAccess:
        return self._get(self._model_access, model, "model access (pass model_access)")

    def data(self, split: str = "eval") -> DataAccess:
        return self._get(self._data_access, split, "split with data access (pass data_access)")

    def model_info(self, model: str) -> dict[str, Any]:
        return dict(self._info.get(model, {"name": model}))

    def classes(self) -> list[str]:
        if self._classes is not None:
            return list(self._classes)
        labels = next(iter(self._labels.values()), None)
        n = int(labels.max()) + 1 if labels is not None and labels.numel() else 0
        return [str(i) for i in range(n)]

    @staticmethod
    def _get(mapping: Mapping[Any, Any], key: Any, what: str) -> Any:
        try:
            return mapping[key]
        except KeyError:
            raise KeyError(f"no {what} {key!r}; available: {list(mapping)}") from None
