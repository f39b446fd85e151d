"""The run plan: every part of a checked recipe built exactly once, and what each split needs.

Building a plan loads the dataset and the models (moved to the run's device once), builds each
metric, selector and evaluator once, resolves the layers of every model and of every streaming
evaluator, and decides which features the cache holds for which split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from repsim.errors import RepsimError
from repsim.run.cache import CachePlan

if TYPE_CHECKING:
    from repsim.data.base import ImageDataset
    from repsim.evaluators.base import Evaluator, StreamingEvaluator
    from repsim.metrics.base import Metric
    from repsim.models.base import LoadedModel
    from repsim.recipe import CheckedRecipe
    from repsim.run.device import DeviceSettings

EVAL = "eval"


@dataclass
class ModelPlan:
    """One model of the run: the built model, its layer groups and their reductions."""

    label: str
    registry_name: str
    loaded: LoadedModel
    groups: dict[str, list[str]]
    reduce: str
    layer_reduce: dict[str, str] = field(default_factory=dict)  # group overrides, per layer

    def reduce_for(self, layer: str) -> str:
        return self.layer_reduce.get(layer, self.reduce)

    @property
    def layers(self) -> list[str]:
        seen: dict[str, None] = {}
        for names in self.groups.values():
            seen.update(dict.fromkeys(names))
        return list(seen)

    def named_layers(self, names: Sequence[str]) -> list[str]:
        """Layers named directly or through their group; names it lacks select nothing."""
        out: dict[str, None] = {}
        for name in names:
            if name in self.groups:
                out.update(dict.fromkeys(self.groups[name]))
            elif name in self.layers:
                out[name] = None
        return list(out)


@dataclass
class RunPlan:
    """Everything a run needs, built once."""

    checked: CheckedRecipe
    settings: DeviceSettings
    dataset: ImageDataset
    models: dict[str, ModelPlan]
    metrics: dict[str, Metric]
    evaluators: dict[str, Evaluator]
    observed: dict[str, dict[str, list[str]]]  # streaming evaluator -> model -> raw layers
    cache: dict[str, CachePlan]
    notes: list[str] = field(default_factory=list)

    @property
    def recipe(self) -> Any:
        return self.checked.recipe

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.recipe.model_pairs()

    def streaming_metrics(self) -> dict[str, Metric]:
        return {k: m for k, m in self.metrics.items() if m.properties.streaming}

    def observers(self, split: str) -> dict[str, StreamingEvaluator]:
        from repsim.evaluators.base import StreamingEvaluator

        return {k: e for k, e in self.evaluators.items()
                if isinstance(e, StreamingEvaluator) and split in e.observes.splits}

    def splits(self) -> list[str]:
        """The splits to pass over: the recipe's (``eval``) first, then what evaluators need."""
        from repsim.evaluators.base import StreamingEvaluator

        extra = [*self.cache, *(s for e in self.evaluators.values()
                                if isinstance(e, StreamingEvaluator) for s in e.observes.splits)]
        return list(dict.fromkeys([EVAL, *extra]))

    def split_dataset(self, split: str) -> ImageDataset:
        return self.dataset if split == EVAL else self.dataset.with_split(split)

    def examples(self, split: str) -> int | None:
        run = self.recipe.run
        return run.examples if split == EVAL else run.train_examples

    @classmethod
    def build(cls, checked: CheckedRecipe, settings: DeviceSettings,
              say: Callable[[str], None]) -> RunPlan:
        dpart, dparams = checked.dataset
        dataset = dpart.build(dparams)
        models = {label: _model_plan(checked, label, settings, say) for label in checked.models}
        metrics = {}
        for key, (part, params) in checked.metrics.items():
            metric = part.build(params)
            metric.name = part.name
            metrics[key] = metric
        evaluators = {}
        for key, (part, params) in checked.evaluators.items():
            ev = part.build(params)
            ev.name = key
            evaluators[key] = ev
        plan = cls(checked, settings, dataset, models, metrics, evaluators, {}, {})
        plan.observed = plan._observed(say)
        plan.cache = plan._cache_plans()
        return plan

    def _observed(self, say: Callable[[str], None]) -> dict[str, dict[str, list[str]]]:
        """The layers each streaming evaluator watches in each model; models without them are
        noted and skipped."""
        from repsim.evaluators.base import StreamingEvaluator
        from repsim.plugins import build_part

        out: dict[str, dict[str, list[str]]] = {}
        for key, ev in self.evaluators.items():
            if not isinstance(ev, StreamingEvaluator):
                continue
            selector = build_part("layer_selector", ev.observes.selector,
                                  **dict(ev.observes.params))
            out[key] = {}
            for label, m in self.models.items():
                try:
                    out[key][label] = selector.select(m.loaded)
                except RepsimError as exc:
                    note = f"evaluator '{key}' skips model '{label}': {exc}"
                    self.notes.append(note)
                    say(f"note: {note}")
        return out

    def _cache_plans(self) -> dict[str, CachePlan]:
        cache: dict[str, CachePlan] = {}

        def add(split: str, m: ModelPlan, layers: Sequence[str],
                reductions: Sequence[str] | None) -> None:
            cp = cache.setdefault(split, CachePlan())
            for layer in layers:
                cp.own[(m.label, layer)] = m.reduce_for(layer)
                cp.keys.update((m.label, layer, r) for r in reductions or (m.reduce_for(layer),))

        if any(not m.properties.streaming for m in self.metrics.values()):
            for m in self.models.values():
                add(EVAL, m, m.layers, None)
        for ev in self.evaluators.values():
            for split in ev.needs.splits:
                for m in self.models.values():
                    layers = m.layers if ev.needs.layers is None else \
                        m.named_layers(ev.needs.layers)
                    add(split, m, layers, ev.needs.reductions)
                cache[split].outputs |= ev.needs.output
        return cache


def _model_plan(checked: CheckedRecipe, label: str, settings: DeviceSettings,
                say: Callable[[str], None]) -> ModelPlan:
    recipe = checked.recipe
    part, params = checked.models[label]
    say(f"building model '{label}' ({part.name})")
    loaded = part.build(params)
    if not loaded.name:
        loaded.name = label
    loaded.module.to(settings.device)
    groups, layer_reduce = checked.select_layers(label, loaded)
    return ModelPlan(label, part.name, loaded, groups, recipe.reduce_of(label), layer_reduce)
