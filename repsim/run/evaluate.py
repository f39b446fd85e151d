"""The evaluators' stage: their view of the run, and writing what they return."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.errors import RecipeError
from repsim.run.plan import EVAL

if TYPE_CHECKING:
    import torch

    from repsim.evaluators.access import DataAccess, ModelAccess
    from repsim.evaluators.base import Evaluator
    from repsim.metrics.results import SimilarityResult
    from repsim.run.cache import FeatureReader
    from repsim.run.plan import RunPlan


class RunContext:
    """An :class:`~repsim.evaluators.base.EvalContext` over a run: the feature cache, the
    similarity results, and, for evaluators that declared them, models and data."""

    def __init__(self, plan: RunPlan, reader: FeatureReader,
                 results: Mapping[tuple[str, str, str], SimilarityResult],
                 evaluator: Evaluator) -> None:
        self.plan, self.reader, self.results = plan, reader, results
        self.evaluator = evaluator
        self.models = list(plan.models)
        self.seed = plan.recipe.run.seed

    def layers(self, model: str) -> list[str]:
        return self._model(model).layers

    def groups(self, model: str) -> dict[str, list[str]]:
        return self._model(model).groups

    def _model(self, model: str) -> Any:
        if model not in self.plan.models:
            raise KeyError(f"no model '{model}' in this run; models: {self.models}")
        return self.plan.models[model]

    def features(self, model: str, layer: str, split: str = EVAL,
                 reduction: str | None = None) -> torch.Tensor:
        return self.reader.features(model, layer, reduction or self._model(model).reduce_for(layer),
                                    split)

    def labels(self, split: str = EVAL) -> torch.Tensor:
        return self.reader.labels(split)

    def output(self, model: str, split: str = EVAL) -> torch.Tensor:
        return self.reader.output(model, split)

    def similarity(self, metric: str, model_a: str, model_b: str) -> SimilarityResult:
        if (metric, model_a, model_b) in self.results:
            return self.results[(metric, model_a, model_b)]
        if (metric, model_b, model_a) in self.results:
            return self.results[(metric, model_b, model_a)].T
        raise KeyError(f"no '{metric}' result for models '{model_a}' and '{model_b}' in this "
                       "run; add the metric to the recipe's [[metrics]].")

    def model_info(self, model: str) -> dict[str, Any]:
        from repsim.run.features import observe_info

        p = self._model(model)
        return observe_info(p) | {"model": p.registry_name, "reduce": p.reduce,
                                  "provenance": p.loaded.provenance}

    def classes(self) -> list[str]:
        return list(self.plan.dataset.classes)

    def model(self, model: str) -> ModelAccess:
        from repsim.evaluators.access import ModelAccess

        if not self.evaluator.access.models:
            raise RecipeError(f"evaluator '{self.evaluator.name}' asked for model access without "
                              "declaring it (Access(models=True)).")
        return ModelAccess(model, self._model(model).loaded, self.plan.settings)

    def data(self, split: str = EVAL) -> DataAccess:
        from repsim.evaluators.access import DataAccess

        if split not in self.evaluator.access.data:
            raise RecipeError(f"evaluator '{self.evaluator.name}' asked for split '{split}' "
                              f"without declaring it (Access(data=(..., '{split}'))).")
        return DataAccess(self.plan.split_dataset(split))


def run_evaluators(run_dir: Path, plan: RunPlan, reader: FeatureReader,
                   results: Mapping[tuple[str, str, str], SimilarityResult], *,
                   after_metrics: bool, fingerprints: Mapping[str, str],
                   say: Callable[[str], None]) -> None:
    """Run the evaluators of one stage (before or after the metrics); one whose saved result has
    the same fingerprint (the same entry, reading the same passes) is kept."""
    import shutil

    from repsim.report import records_table

    for key, ev in plan.evaluators.items():
        if ev.access.similarity != after_metrics:
            continue
        out = run_dir / "evaluators" / key
        if (out / "result.json").exists():
            if store.read_json(out / "result.json").get("fingerprint") == fingerprints[key]:
                say(f"evaluator '{key}': already done, kept")
                continue
            say(f"evaluator '{key}': its parameters or inputs changed; running it again")
            shutil.rmtree(out)
        say(f"running evaluator '{key}'")
        res = ev.evaluate(RunContext(plan, reader, results, ev))
        for tname, (headers, rows) in res.tables.items():
            store.write_text(out / f"{tname}.md", records_table(headers, rows) + "\n")
        if res.tensors:
            store.write_tensors(out / "tensors.safetensors", res.tensors)
        for fname, make in res.figures.items():
            store.write_figure(out / f"{fname}.png", make)
        if "report_md" in res.data:
            store.write_text(out / "report.md", str(res.data["report_md"]))
        # result.json last: it marks the evaluator done
        store.write_json(out / "result.json", {"evaluator": key, "fingerprint": fingerprints[key],
                                               "protocol": res.protocol, "data": res.data,
                                               "tables": {k: {"headers": h, "rows": r}
                                                          for k, (h, r) in res.tables.items()}})
