"""The evaluators' stage: their view of the run, and writing what they return."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.errors import RecipeError
from repsim.run.cache import POSITIONS, FeatureReader
from repsim.run.distributed import World
from repsim.run.plan import EVAL

if TYPE_CHECKING:
    import torch

    from repsim.evaluators.access import DataAccess, ModelAccess
    from repsim.evaluators.base import EvalResult, Evaluator, Progress
    from repsim.metrics.results import SimilarityResult
    from repsim.run.plan import RunPlan


class RankReader(FeatureReader):
    """One rank's shards of the feature cache (``RANK-BATCH.safetensors``), in position order.
    A rank that got no batch of a split reads empty tensors shaped like the other ranks'."""

    def __init__(self, merged: FeatureReader, rank: int) -> None:
        super().__init__(merged.cache_dir)
        self.merged, self.rank = merged, rank  # the keys, and the shapes of an empty share

    def _shards(self, split: str) -> list[Path]:
        return [p for p in self.merged._shards(split) if p.name.startswith(f"{self.rank:03d}-")]

    def keys(self, split: str) -> list[str]:
        return self.merged.keys(split)

    def _cat(self, split: str, key: str) -> torch.Tensor:
        if self._shards(split):
            return super()._cat(split, key)
        from safetensors import safe_open

        with safe_open(str(self.merged._shards(split)[0]), framework="pt") as fh:
            return fh.get_tensor(key)[:0]


class RunContext:
    """An :class:`~repsim.evaluators.base.EvalContext` over a run: the feature cache, the
    similarity results, and, for evaluators that declared them, models and data."""

    def __init__(self, plan: RunPlan, reader: FeatureReader,
                 results: Mapping[tuple[str, str, str], SimilarityResult],
                 evaluator: Evaluator, say: Callable[[str], None] = lambda _: None,
                 name: str | None = None, world: World = World(), group: Any = None) -> None:
        self.plan, self.reader, self.results = plan, reader, results
        self.evaluator = evaluator
        self.models = list(plan.models)
        self.seed = plan.recipe.run.seed
        self.say, self.name = say, name or evaluator.name
        self.rank, self.world_size, self.group = world.rank, world.size, group
        self.local = RankReader(reader, world.rank) if world.distributed else reader

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

    def local_features(self, model: str, layer: str, split: str = EVAL,
                       reduction: str | None = None) -> torch.Tensor:
        return self.local.features(model, layer,
                                   reduction or self._model(model).reduce_for(layer), split)

    def local_labels(self, split: str = EVAL) -> torch.Tensor:
        return self.local.labels(split)

    def local_index(self, split: str = EVAL) -> torch.Tensor:
        """Positions in the split's sampled order: the rows of the merged reader."""
        return self.local.read(split, POSITIONS, "positions")

    def progress(self, total: int, unit: str) -> Progress:
        from repsim.evaluators.base import Progress

        return Progress(self.say, self.name, total, unit)

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


def _shared(ev: Evaluator, world: World) -> bool:
    """Whether the evaluator runs on every rank (see ``Evaluator.distributed``)."""
    return world.distributed and ev.distributed and not ev.access.similarity


def run_evaluators(run_dir: Path, plan: RunPlan, reader: FeatureReader,
                   results: Mapping[tuple[str, str, str], SimilarityResult], *,
                   after_metrics: bool, fingerprints: Mapping[str, str],
                   say: Callable[[str], None], world: World = World(), group: Any = None,
                   timing: dict[str, float] | None = None) -> None:
    """Run the evaluators of one stage (before or after the metrics) on rank 0; one whose saved
    result has the same fingerprint (the same entry, reading the same passes) is kept.

    In a distributed run rank 0 tells the other ranks, which wait in :func:`follow_evaluators`,
    whether each distributed evaluator runs, and they run it with it. ``timing`` gets the
    seconds of every evaluator run.
    """
    import shutil
    import time

    for key, ev in plan.evaluators.items():
        if ev.access.similarity != after_metrics:
            continue
        out = run_dir / "evaluators" / key
        done = (out / "result.json").exists() and \
            store.read_json(out / "result.json").get("fingerprint") == fingerprints[key]
        shared = _shared(ev, world)
        if shared:
            _decide(key, not done, group)
        if done:
            say(f"evaluator '{key}': already done, kept")
            continue
        if out.exists():
            say(f"evaluator '{key}': its parameters or inputs changed; running it again")
            shutil.rmtree(out)
        ranks = f" on {world.size} processes" if shared else ""
        say(f"evaluator '{key}'{ranks}: {ev.describe()}")
        t = time.perf_counter()
        res = ev.evaluate(RunContext(plan, reader, results, ev, say, key,
                                     world if shared else World(), group if shared else None))
        _write(out, key, fingerprints[key], res)
        if timing is not None:
            timing[f"evaluator {key}"] = round(time.perf_counter() - t, 3)


def follow_evaluators(plan: RunPlan, reader: FeatureReader, world: World, group: Any) -> None:
    """A rank other than 0: run the distributed evaluators that rank 0 runs (those that read no
    similarity results), in its order, with it; rank 0 alone writes their results."""
    for key, ev in plan.evaluators.items():
        if not _shared(ev, world):
            continue
        if _decide(key, None, group):
            ev.evaluate(RunContext(plan, reader, {}, ev, lambda _: None, key, world, group))


def _decide(key: str, run: bool | None, group: Any) -> bool:
    """Rank 0's decision whether evaluator ``key`` runs, on every rank."""
    import torch.distributed as dist

    message = [(key, run)]
    dist.broadcast_object_list(message, src=0, group=group)
    got, decision = message[0]
    if got != key:  # the ranks' plans list other evaluators: never mix their collectives
        raise RuntimeError(f"rank 0 runs evaluator '{got}' where this rank has '{key}'")
    return bool(decision)


def _write(out: Path, key: str, fingerprint: str, res: EvalResult) -> None:
    """An evaluator's tables, tensors, figures and report; result.json last (it marks it done)."""
    from repsim.report import records_table

    for tname, (headers, rows) in res.tables.items():
        store.write_text(out / f"{tname}.md", records_table(headers, rows) + "\n")
    if res.tensors:
        store.write_tensors(out / "tensors.safetensors", res.tensors)
    for fname, make in res.figures.items():
        store.write_figure(out / f"{fname}.png", make)
    if "report_md" in res.data:
        store.write_text(out / "report.md", str(res.data["report_md"]))
    store.write_json(out / "result.json", {"evaluator": key, "fingerprint": fingerprint,
                                           "protocol": res.protocol, "data": res.data,
                                           "tables": {k: {"headers": h, "rows": r}
                                                      for k, (h, r) in res.tables.items()}})
