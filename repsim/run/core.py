"""The run: a checked recipe executed as a list of stages into a run directory.

plan → for each split: batch source → feature pass of the models not extracted yet → sinks
(checkpointed per model) → evaluators that read features → similarity results (every pair from
the models' stored minibatch kernels) → evaluators that read them → provenance and summary. Data
flows one way; every file is written atomically; a rerun of the same recipe into the same
directory resumes from the last saved state, and a model added to it is extracted alone.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.errors import RecipeError
from repsim.recipe import CheckedRecipe
from repsim.run import results as results_stage
from repsim.run.evaluate import run_evaluators
from repsim.run.distributed import World
from repsim.run.plan import EVAL, RunPlan
from repsim.run.sinks import load_states, pass_done, save_states, saved_batches

if TYPE_CHECKING:
    from repsim.run.cache import CacheWriter
    from repsim.run.kernels import KernelSink
    from repsim.run.sinks import Sink

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
                 progress: bool = True, quiet: bool = False, force: bool = False) -> None:
        self.checked = checked
        self.force = force
        self.recipe = checked.recipe
        self.dir = Path(out or self.recipe.run.output)
        self.progress = progress
        self.quiet = quiet
        self.world = World()
        self.group: Any = None
        self.timing: dict[str, float] = {}  # seconds per stage, for provenance
        self.passes: dict[str, str] = {}  # split -> fingerprint of its pass
        self.batch_plans: dict[str, tuple[int, int]] = {}  # split -> (examples, unit)

    def say(self, msg: str) -> None:
        if not self.quiet and self.world.is_main:
            print(msg, file=sys.stderr)

    def execute(self) -> Path:
        import torch

        from repsim.run.device import DeviceSettings, configured
        from repsim.run.distributed import check_same, process_group, world_from_env

        started = time.time()
        self.world = world = world_from_env()
        settings = DeviceSettings.from_run(self.recipe.run, world.local_rank, world.local_size)
        with configured(settings), process_group(world, settings.device) as group:
            self.group = group
            if world.distributed:
                check_same(fingerprint(self.checked), "recipes", group, world)
            torch.manual_seed(self.recipe.run.seed)
            with self._claim_directory():
                self._barrier()
                summary = self._stages(settings, started)
        if world.is_main:
            self.say(summary)
        return self.dir

    def _stages(self, settings: Any, started: float) -> str:
        from repsim.run import stages

        world = self.world
        plan = RunPlan.build(self.checked, settings, self.say)
        self.inputs = stages.input_digests(self.checked)
        self.versions = stages.part_versions(self.checked)
        for split in plan.splits():
            t = time.perf_counter()
            self._pass(plan, split)
            self.timing[f"pass {split}"] = round(time.perf_counter() - t, 3)
        self._barrier()  # every rank's feature cache is written
        if not world.is_main:  # the other ranks take part in the distributed evaluators
            from repsim.run.cache import FeatureReader
            from repsim.run.evaluate import follow_evaluators

            follow_evaluators(plan, FeatureReader(self.dir / "cache"), world, self.group)
            return ""
        return self._results(plan, self._similarities(plan), started)

    def _results(self, plan: RunPlan, streamed: dict[str, Any], started: float) -> str:
        """Evaluators, similarity results, provenance and summary (rank 0 alone)."""
        from repsim.report import records_table
        from repsim.run.cache import FeatureReader

        from repsim.run.stages import evaluator_fingerprint

        reader = FeatureReader(self.dir / "cache")
        evals = {key: evaluator_fingerprint(plan, key, ev, self.passes)
                 for key, ev in plan.evaluators.items()}
        self._drop_stale_outputs(plan)
        run_evaluators(self.dir, plan, reader, {}, after_metrics=False, fingerprints=evals,
                       say=self.say, world=self.world, group=self.group, timing=self.timing)
        results = results_stage.finalise(plan, streamed, reader)
        for (key, a, b), result in results.items():
            results_stage.write_similarity(self.dir, plan, key, a, b, result)
            for note in result.notes:
                if note not in plan.notes:
                    plan.notes.append(note)
                    self.say(f"note ({key}, {a} vs {b}): {note}")
        run_evaluators(self.dir, plan, reader, results, after_metrics=True, fingerprints=evals,
                       say=self.say, timing=self.timing)
        headers, rows = results_stage.summary_rows(plan, results)
        summary = records_table(headers, rows) if rows else "(no similarity metrics)"
        store.write_json(self.dir / "provenance.json",
                         results_stage.provenance(plan, started) | {
                             "inputs": self.inputs, "part_versions": self.versions,
                             "world_size": self.world.size, "timing": self.timing})
        store.write_text(self.dir / "summary.md",
                         results_stage.summary_md(self.dir, self.recipe.run.name, summary))
        from repsim.pages import build_report

        self.say(f"report: {build_report(self.dir)}")
        return summary

    def _barrier(self) -> None:
        if self.world.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    @contextmanager
    def _claim_directory(self) -> Iterator[None]:
        """Hold the run directory for this run (rank 0): refuse one that is in use by another
        run, that holds another study's results, or that is a folder of other files."""
        from repsim.run.stages import directory_identity

        if not self.world.is_main:
            yield
            return
        identity = directory_identity(self.checked)
        marker = self.dir / "fingerprint"
        if self.dir.is_file():
            raise RecipeError(f"run directory '{self.dir}' is a file; give --out a directory.")
        if self.dir.is_dir() and any(self.dir.iterdir()) and not marker.exists() \
                and not self.force:
            shown = ", ".join(sorted(p.name for p in self.dir.iterdir())[:5])
            raise RecipeError(
                f"'{self.dir}' is a folder of other files ({shown}, ...), not a repsim run "
                "directory. Choose a new or empty directory with --out, or pass --force to write "
                "the run into it.")
        with _locked(self.dir):
            if marker.exists() and marker.read_text().strip() != identity:
                raise RecipeError(
                    f"run directory '{self.dir}' holds results of a different recipe (other data "
                    "or another seed). Nothing was overwritten: choose another directory with "
                    "--out, or delete that one.")
            if marker.exists():
                self.say(f"resuming run in {self.dir}: stages whose inputs are unchanged are kept")
            store.write_text(marker, identity + "\n")
            store.write_text(self.dir / "recipe.toml",
                             self.checked.path.read_text(encoding="utf-8"))
            store.write_json(self.dir / "resolved.json", self.recipe.model_dump(mode="json"))
            yield

    def _drop_stale_outputs(self, plan: RunPlan) -> None:
        """Results are rewritten from the sinks every run; evaluators no longer in the recipe
        are removed, so the directory holds this recipe's outputs only."""
        import shutil

        for name in ("similarity", "tables", "figures"):
            shutil.rmtree(self.dir / name, ignore_errors=True)
        folder = self.dir / "evaluators"
        for old in sorted(folder.iterdir()) if folder.exists() else []:
            if old.name not in plan.evaluators:
                self.say(f"evaluator '{old.name}' is no longer in the recipe: its results removed")
                shutil.rmtree(old)

    def _sinks(self, plan: RunPlan, split: str, todo: list[str]
               ) -> tuple[dict[str, KernelSink], dict[str, list[Sink]], CacheWriter | None]:
        """The sinks of one split's pass: per streaming metric, one kernel writer for the models
        to extract (eval only); per model, what its stage saves (its share of the kernel writers,
        its observers); the feature-cache writer."""
        from repsim.run.cache import CacheWriter
        from repsim.run.kernels import KernelSink, kernel_dir
        from repsim.run.sinks import ObserverSink

        split_dir = self.dir / "cache" / split
        kernels: dict[str, KernelSink] = {}
        per_model: dict[str, list[Sink]] = {label: [] for label in plan.models}
        if split == EVAL and todo:
            for key, metric in plan.streaming_metrics().items():
                kernels[key] = sink = KernelSink(
                    f"kernels_{key}", metric,  # type: ignore[arg-type]
                    {label: plan.models[label].layers for label in todo},
                    metric.minibatch(self.recipe.run.batch_size),  # type: ignore[attr-defined]
                    {label: kernel_dir(split_dir, key, label) for label in todo},
                    self.world.rank, plan.settings.engine_device)
                for label in todo:
                    per_model[label].append(sink.share(label))
        for key, ev in plan.observers(split).items():
            for label, layers in plan.observed.get(key, {}).items():
                per_model[label].append(ObserverSink(f"observer_{key}", ev, {label: layers}))
        cache = plan.cache.get(split)
        writer = CacheWriter(split_dir, cache, {k: m.loaded.num_prefix_tokens
                                                for k, m in plan.models.items()},
                             plan.settings.cache_torch_dtype, self.world.rank) if cache else None
        return kernels, per_model, writer

    def _pass(self, plan: RunPlan, split: str) -> None:
        """One pass over this rank's share of a split, forwarding only the models whose
        extraction is not saved yet (each model's stage has its own fingerprint and state): every
        sink fed, state saved every ``checkpoint_every`` batches. With several ranks, rank 0's
        observers end as the merge of all of them."""
        from tqdm import tqdm

        from repsim.layers import OUTPUT
        from repsim.run.device import out_of_memory
        from repsim.run.distributed import batch_unit, rank_positions
        from repsim.run.features import FeaturePass
        from repsim.run.sinks import ObserverSink, saved_fingerprint
        from repsim.run.source import BatchSource, sample_indices
        from repsim.run.stages import model_fingerprint, pass_fingerprint

        rank, world_size = self.world.rank, self.world.size
        split_dir = self.dir / "cache" / split
        pass_dir = split_dir / f"rank{rank}"
        fps = {label: model_fingerprint(plan, split, label, self.inputs) for label in plan.models}
        self.passes[split] = fp = pass_fingerprint(fps)
        _remove_models(split_dir, rank, [p.name for p in (pass_dir / "models").glob("*")
                                         if p.name not in plan.models])
        for old in pass_dir.glob("sink_*.safetensors"):  # a run of the single-stage layout
            old.unlink()
        states = {label: pass_dir / "models" / label for label in plan.models}
        for label, state_dir in states.items():
            saved = saved_fingerprint(state_dir)
            if saved is not None and saved != fps[label]:
                self.say(f"{split}: model '{label}' or what its extraction reads (files, layers, "
                         "data, metrics, batch plan) changed since it was saved; extracting it "
                         "again")
                _remove_models(split_dir, rank, [label])
        todo = [label for label in plan.models if not pass_done(states[label])]
        starts = {label: saved_batches(states[label]) for label in todo}
        if len(set(starts.values())) > 1:  # the recipe changed while its pass was interrupted
            self.say(f"{split}: models {todo} were saved at different batches; extracting them "
                     "again together")
            _remove_models(split_dir, rank, todo)
            starts = dict.fromkeys(todo, 0)
        if len(todo) == len(plan.models) and not any(starts.values()):
            for shard in split_dir.glob(f"{rank:03d}-*.safetensors"):  # another batch plan's
                shard.unlink()
        kernels, per_model, writer = self._sinks(plan, split, todo)
        for label in plan.models:
            load_states(states[label], per_model[label], world_size)
        dataset = plan.split_dataset(split)
        limit = plan.examples(split)
        run = self.recipe.run
        indices = sample_indices(len(dataset), run.seed, limit)
        unit = batch_unit([m.minibatch(run.batch_size)  # type: ignore[attr-defined]
                           for m in plan.streaming_metrics().values()], run.batch_size)
        self.batch_plans[split] = (len(indices), unit)
        start = next(iter(starts.values()), 0)
        b = start
        if todo:
            kept = [label for label in plan.models if label not in todo]
            if kept:
                self.say(f"{split}: {', '.join(kept)} extracted before, kept; extracting "
                         f"{', '.join(todo)}")
            if limit is not None and limit > len(dataset):
                self.say(f"run.examples = {limit} but split '{dataset.split}' of "
                         f"'{dataset.name}' has {len(dataset)}; using all {len(dataset)}")
            positions = rank_positions(len(indices), unit, self.world)
            models = {label: plan.models[label] for label in todo}
            transforms = list(dict.fromkeys(m.loaded.preprocess for m in models.values()))
            source = BatchSource(dataset, [indices[p] for p in positions], transforms,
                                 run.batch_size, plan.settings.device, run.num_workers,
                                 run.prefetch, positions)
            extra: dict[str, list[str]] = {}
            for label in todo:
                if plan.cache.get(split) and plan.cache[split].outputs:
                    extra.setdefault(label, []).append(OUTPUT)
                for key in plan.observers(split):
                    extra.setdefault(label, []).extend(plan.observed.get(key, {}).get(label, []))
            forward = FeaturePass(models, transforms, extra, plan.settings)
            fed: list[Sink] = [*kernels.values(), *(s for label in todo for s in per_model[label]
                                                    if isinstance(s, ObserverSink))]
            fed += [writer] if writer else []

            def save(done: bool) -> None:
                save_states(pass_dir, [], b, done, world_size, fp,
                            {states[label]: (per_model[label], fps[label]) for label in todo})

            if start:
                self.say(f"{split}: resuming after {start} saved batches")
            self.say(f"{split} pass: {len(positions)} examples of '{dataset.name}' "
                     f"({dataset.split}) through {len(todo)} model(s), {len(source)} batches")
            began = time.perf_counter()
            bar = tqdm(total=len(source), initial=start, desc=f"{split} pass", unit="batch",
                       disable=not (self.progress and self.world.is_main), file=sys.stderr)
            with forward.attached():
                for host in source.batches(start):
                    try:
                        batch = forward(split, host.index, host.inputs, host.labels,
                                        host.examples, host.positions)
                    except _oom_errors() as exc:
                        raise out_of_memory(plan.settings, run.batch_size,
                                            f"in the forwards of split '{split}'") from exc
                    for sink in fed:
                        sink.update(batch)
                    b += 1
                    bar.update(1)
                    if b % run.checkpoint_every == 0:
                        save(False)
            bar.close()
            for sink in kernels.values():
                sink.close()
            _check_observer_keys(plan, split)
            save(True)
            self.say(f"{split} pass done in {time.perf_counter() - began:.1f} s")
        else:
            self.say(f"{split} pass: every model extracted before, kept")
        observers = [s for label in plan.models for s in per_model[label]
                     if isinstance(s, ObserverSink)]
        if self.world.distributed:
            from repsim.run.distributed import gather_to_main, merge_ranks

            t = time.perf_counter()
            gathered = gather_to_main(observers, self.group, self.world)
            if gathered is not None:
                merge_ranks(observers, gathered, len(indices), unit)
            self.timing[f"merge {split}"] = round(time.perf_counter() - t, 4)

    def _similarities(self, plan: RunPlan) -> dict[str, Any]:
        """Every streaming metric's results for every pair, from the models' stored kernels."""
        from repsim.run.kernels import pair_results

        t = time.perf_counter()
        examples, unit = self.batch_plans[EVAL]
        run = self.recipe.run
        out = {key: pair_results(
            metric, key, self.dir / "cache" / EVAL,  # type: ignore[arg-type]
            {label: m.layers for label, m in plan.models.items()}, plan.pairs,
            metric.minibatch(run.batch_size),  # type: ignore[attr-defined]
            examples, unit, self.world.size, run.bootstrap > 0, plan.settings.engine_device)
            for key, metric in plan.streaming_metrics().items()}
        self.timing["similarity from kernels"] = round(time.perf_counter() - t, 3)
        return out


def _remove_models(split_dir: Path, rank: int, labels: list[str]) -> None:
    """This rank's saved extraction state and stored kernels of models of one split (their
    features in the cache shards are overwritten when they are extracted again)."""
    import shutil

    from repsim.run.kernels import KERNELS

    for label in labels:
        shutil.rmtree(split_dir / f"rank{rank}" / "models" / label, ignore_errors=True)
        for d in (split_dir / KERNELS).glob(f"*/{label}"):
            for shard in d.glob(f"{rank:03d}-*.safetensors"):
                shard.unlink()
            if not any(d.iterdir()):  # another rank's files may still be there
                d.rmdir()


def _check_observer_keys(plan: RunPlan, split: str) -> None:
    """Each model's stage saves the observer state keyed by its label: a streaming evaluator
    whose state keys do not start with 'MODEL|' cannot be saved per model."""
    for key, ev in plan.observers(split).items():
        bad = [k for k in ev.state() if k.split("|", 1)[0] not in plan.models]
        if bad:
            raise RuntimeError(f"streaming evaluator '{key}': state keys {bad[:3]} do not start "
                               "with 'MODEL|' (a model label of the run); each model's stage "
                               "saves its own share of the state.")


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run directory for the run's duration (released on exit, also
    when the process is killed)."""
    import fcntl
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise RecipeError(
                f"run directory '{run_dir}' is in use by another repsim run (process {holder}). "
                "Wait for it to finish (rerun then resumes), or choose another --out.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)  # no process holds it now (and identical runs leave identical files)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ()


def run_recipe(path: str | Path, out: Path | None = None, progress: bool = True,
               quiet: bool = False, overrides: dict[str, object] | None = None,
               force: bool = False) -> Path:
    """Validate and execute a recipe; ``overrides`` replace ``[run]`` settings (the CLI flags);
    ``force`` writes into a folder of other files. Returns the run directory."""
    from repsim.recipe import check_recipe

    return Run(check_recipe(path, run_overrides=overrides), out, progress, quiet,
               force).execute()
