"""The run: a checked recipe executed as a list of stages into a run directory.

plan → for each split: batch source → feature pass → sinks (checkpointed) → evaluators that read
features → similarity results → evaluators that read them → provenance and summary. Data flows
one way; every file is written atomically; a rerun of the same recipe into the same directory
resumes from the last saved state.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from repsim import store
from repsim.errors import RecipeError
from repsim.recipe import CheckedRecipe
from repsim.run import results as results_stage
from repsim.run.evaluate import run_evaluators
from repsim.run.plan import EVAL, RunPlan
from repsim.run.sinks import load_states, pass_done, save_states

if TYPE_CHECKING:
    from repsim.run.sinks import MetricSink, Sink

# Settings that change where and how fast a run computes, not what it computes: a run may be
# resumed with other values.
_NOT_FINGERPRINTED = ("output", "num_workers", "prefetch", "device", "threads")


def fingerprint(checked: CheckedRecipe) -> str:
    data = checked.recipe.model_dump(mode="json")
    for key in _NOT_FINGERPRINTED:
        data["run"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Run:
    """Executes a checked recipe into a run directory."""

    def __init__(self, checked: CheckedRecipe, out: Path | None = None,
                 progress: bool = True, quiet: bool = False) -> None:
        self.checked = checked
        self.recipe = checked.recipe
        self.dir = Path(out or self.recipe.run.output)
        self.progress = progress
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    def execute(self) -> Path:
        import torch

        from repsim.report import records_table
        from repsim.run.cache import FeatureReader
        from repsim.run.device import DeviceSettings, configured

        started = time.time()
        settings = DeviceSettings.from_run(self.recipe.run)
        with configured(settings):
            torch.manual_seed(self.recipe.run.seed)
            self._claim_directory()
            plan = RunPlan.build(self.checked, settings, self.say)
            streamed = {}
            for split in plan.splits():
                metric_sinks = self._pass(plan, split)
                streamed |= {key: sink.compute() for key, sink in metric_sinks.items()}
            reader = FeatureReader(self.dir / "cache")
            run_evaluators(self.dir, plan, reader, {}, after_metrics=False, say=self.say)
            results = results_stage.finalise(plan, streamed, reader)
            for (key, a, b), result in results.items():
                results_stage.write_similarity(self.dir, plan, key, a, b, result)
                for note in result.notes:
                    if note not in plan.notes:
                        plan.notes.append(note)
                        self.say(f"note ({key}, {a} vs {b}): {note}")
            run_evaluators(self.dir, plan, reader, results, after_metrics=True, say=self.say)
            headers, rows = results_stage.summary_rows(plan, results)
            summary = records_table(headers, rows) if rows else "(no similarity metrics)"
            store.write_json(self.dir / "provenance.json",
                             results_stage.provenance(plan, started))
            store.write_text(self.dir / "summary.md",
                             results_stage.summary_md(self.dir, self.recipe.run.name, summary))
        self.say(summary)
        return self.dir

    def _claim_directory(self) -> None:
        fp = fingerprint(self.checked)
        marker = self.dir / "fingerprint"
        if marker.exists() and marker.read_text().strip() != fp:
            raise RecipeError(
                f"run directory '{self.dir}' holds results of a different recipe. Nothing was "
                "overwritten: choose another directory with --out, or delete that one.")
        if marker.exists():
            self.say(f"resuming run in {self.dir}")
        store.write_text(marker, fp + "\n")
        store.write_text(self.dir / "recipe.toml", self.checked.path.read_text(encoding="utf-8"))
        store.write_json(self.dir / "resolved.json", self.recipe.model_dump(mode="json"))

    def _sinks(self, plan: RunPlan, split: str) -> tuple[dict[str, MetricSink], list[Sink]]:
        """The sinks of one split's pass: metric accumulators (eval only), the feature-cache
        writer, the streaming observers."""
        from repsim.run.cache import CacheWriter
        from repsim.run.sinks import MetricSink, ObserverSink

        metrics: dict[str, MetricSink] = {}
        if split == EVAL:
            layers = {label: m.layers for label, m in plan.models.items()}
            for key, metric in plan.streaming_metrics().items():
                metrics[key] = MetricSink(
                    f"metric_{key}", metric, layers, plan.pairs,  # type: ignore[arg-type]
                    metric.minibatch(self.recipe.run.batch_size),  # type: ignore[attr-defined]
                    keep_batches=self.recipe.run.bootstrap > 0,
                    device=plan.settings.engine_device)
        sinks: list[Sink] = list(metrics.values())
        cache = plan.cache.get(split)
        if cache:
            sinks.append(CacheWriter(self.dir / "cache" / split, cache,
                                     {k: m.loaded.num_prefix_tokens
                                      for k, m in plan.models.items()},
                                     plan.settings.cache_torch_dtype))
        for key, ev in plan.observers(split).items():
            sinks.append(ObserverSink(f"observer_{key}", ev, plan.observed.get(key, {})))
        return metrics, sinks

    def _pass(self, plan: RunPlan, split: str) -> dict[str, MetricSink]:
        """One pass over a split: models forward once per batch, every sink fed, state saved
        every ``checkpoint_every`` batches; a finished pass is only loaded."""
        from tqdm import tqdm

        from repsim.layers import OUTPUT
        from repsim.run.device import out_of_memory
        from repsim.run.features import FeaturePass
        from repsim.run.source import BatchSource, sample_indices

        metrics, sinks = self._sinks(plan, split)
        state_dir = self.dir / "cache" / split
        start = load_states(state_dir, sinks)
        if pass_done(state_dir):
            return metrics
        dataset = plan.split_dataset(split)
        limit = plan.examples(split)
        if limit is not None and limit > len(dataset):
            self.say(f"run.examples = {limit} but split '{dataset.split}' of '{dataset.name}' "
                     f"has {len(dataset)}; using all {len(dataset)}")
        run = self.recipe.run
        transforms = list(dict.fromkeys(m.loaded.preprocess for m in plan.models.values()))
        source = BatchSource(dataset, sample_indices(len(dataset), run.seed, limit), transforms,
                             run.batch_size, plan.settings.device, run.num_workers, run.prefetch)
        extra: dict[str, list[str]] = {}
        for label in plan.models:
            if plan.cache.get(split) and plan.cache[split].outputs:
                extra.setdefault(label, []).append(OUTPUT)
            for key in plan.observers(split):
                extra.setdefault(label, []).extend(plan.observed.get(key, {}).get(label, []))
        forward = FeaturePass(plan.models, transforms, extra, plan.settings)
        if start:
            self.say(f"{split}: resuming after {start} saved batches")
        bar = tqdm(total=len(source), initial=start, desc=f"{split} pass", unit="batch",
                   disable=not self.progress, file=sys.stderr)
        b = start
        with forward.attached():
            for host in source.batches(start):
                try:
                    batch = forward(split, host.index, host.inputs, host.labels, host.examples)
                except _oom_errors() as exc:
                    raise out_of_memory(plan.settings, run.batch_size,
                                        f"in the forwards of split '{split}'") from exc
                for sink in sinks:
                    sink.update(batch)
                b += 1
                bar.update(1)
                if b % run.checkpoint_every == 0:
                    save_states(state_dir, sinks, b, done=False)
        bar.close()
        save_states(state_dir, sinks, b, done=True)
        return metrics


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ()


def run_recipe(path: str | Path, out: Path | None = None, progress: bool = True,
               quiet: bool = False, overrides: dict[str, object] | None = None) -> Path:
    """Validate and execute a recipe; ``overrides`` replace ``[run]`` settings (the CLI flags).
    Returns the run directory."""
    from repsim.recipe import check_recipe

    return Run(check_recipe(path, run_overrides=overrides), out, progress, quiet).execute()
