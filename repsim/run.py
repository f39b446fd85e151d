"""The orchestrator: one pass over the data through every model, feeding every metric and caching
the features evaluators need; then the evaluators; then tables, tensors and figures.

The data flows one way (recipe → plan → batches → accumulators / feature cache → results). Parts
never call back into this module. Every file is written atomically; a rerun of the same recipe
into the same run directory resumes from the last saved state instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.errors import FeatureError, RecipeError, RepsimError
from repsim.layers import OUTPUT, LayerTap, reduce_output
from repsim.recipe import CheckedRecipe

if TYPE_CHECKING:
    import torch

    from repsim.data.base import ImageDataset
    from repsim.evaluators.base import Evaluator, StreamingEvaluator
    from repsim.metrics.accumulate import SimilarityAccumulator
    from repsim.metrics.engine import SimilarityResult
    from repsim.models.base import LoadedModel, Preprocess

EVAL = "eval"


@dataclass
class ModelPlan:
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


@dataclass
class CachePlan:
    """What to write to the feature cache for one split: (model, layer, reduction) keys."""

    keys: set[tuple[str, str, str]] = field(default_factory=set)
    outputs: bool = False

    def __bool__(self) -> bool:
        return bool(self.keys) or self.outputs


@dataclass
class Observer:
    """A streaming evaluator and the layers it watches in each model."""

    key: str
    evaluator: StreamingEvaluator
    layers: dict[str, list[str]]  # model label -> layers (raw outputs)


def fingerprint(checked: CheckedRecipe) -> str:
    data = checked.recipe.model_dump(mode="json")
    data["run"].pop("output", None)
    data["run"].pop("num_workers", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


class Run:
    """Executes a checked recipe into a run directory."""

    def __init__(self, checked: CheckedRecipe, out: Path | None = None,
                 progress: bool = True, quiet: bool = False) -> None:
        self.checked = checked
        self.recipe = checked.recipe
        self.dir = Path(out or self.recipe.run.output)
        self.progress = progress
        self.quiet = quiet
        self.results: dict[tuple[str, str, str], SimilarityResult] = {}
        self.notes: list[str] = []

    # ------------------------------------------------------------------ set-up

    def _claim_directory(self) -> None:
        fp = fingerprint(self.checked)
        marker = self.dir / "fingerprint"
        if marker.exists() and marker.read_text().strip() != fp:
            raise RecipeError(
                f"run directory '{self.dir}' holds results of a different recipe. Nothing was "
                "overwritten: choose another directory with --out, or delete that one."
            )
        if marker.exists():
            _say(f"resuming run in {self.dir}", self.quiet)
        store.write_text(marker, fp + "\n")
        store.write_text(self.dir / "recipe.toml", self.checked.path.read_text(encoding="utf-8"))
        store.write_json(self.dir / "resolved.json", self.recipe.model_dump(mode="json"))

    def _build_models(self) -> dict[str, ModelPlan]:
        plans = {}
        for label, (part, params) in self.checked.models.items():
            _say(f"building model '{label}' ({part.name})", self.quiet)
            loaded = part.build(params)
            if not loaded.name:
                loaded.name = label
            groups, layer_reduce = {}, {}
            specs = self.recipe.groups_of(label)
            for group, (sel_part, sel_params) in self.checked.selectors[label].items():
                selector = sel_part.build(sel_params)
                try:
                    chosen = selector.select(loaded)
                except RepsimError as exc:
                    raise type(exc)(f"models.{label}, layer group '{group}': {exc}") from None
                if chosen:  # an empty override (`norm1 = []`) leaves a group out for this model
                    groups[group] = chosen
                for layer in chosen if specs[group].reduce else []:
                    if layer_reduce.setdefault(layer, specs[group].reduce) != specs[group].reduce:
                        raise RecipeError(
                            f"models.{label}: layer '{layer}' is in two layer groups with "
                            f"different reductions ('{layer_reduce[layer]}' and "
                            f"'{specs[group].reduce}'); give both groups the same `reduce`.")
            if not groups:
                raise RecipeError(f"models.{label}: every layer group is empty for this model; "
                                  "select at least one layer.")
            plans[label] = ModelPlan(label, part.name, loaded, groups, self.recipe.reduce_of(label),
                                     layer_reduce)
        return plans

    def _observers(self, plans: dict[str, ModelPlan],
                   evaluators: dict[str, Evaluator]) -> list[Observer]:
        """Resolve the layers each streaming evaluator watches; models without them are noted."""
        from repsim.evaluators.base import StreamingEvaluator
        from repsim.plugins import registry

        out = []
        for key, ev in evaluators.items():
            if not isinstance(ev, StreamingEvaluator):
                continue
            spec = ev.observes
            part = registry("layer_selector").get(spec.selector)
            layers: dict[str, list[str]] = {}
            for label, plan in plans.items():
                try:
                    layers[label] = part.create(dict(spec.params)).select(plan.loaded)
                except RepsimError as exc:
                    note = f"evaluator '{key}' skips model '{label}': {exc}"
                    self.notes.append(note)
                    _say(f"note: {note}", self.quiet)
            out.append(Observer(key, ev, layers))
        return out

    def _cache_plans(self, plans: dict[str, ModelPlan],
                     evaluators: dict[str, Evaluator]) -> dict[str, CachePlan]:
        cache: dict[str, CachePlan] = {}
        full_metrics = [k for k, (p, prm) in self.checked.metrics.items()
                        if not p.build(prm).properties.streaming]
        if full_metrics:
            cp = cache.setdefault(EVAL, CachePlan())
            for m in plans.values():
                cp.keys.update((m.label, layer, m.reduce_for(layer)) for layer in m.layers)
        for ev in evaluators.values():
            for split in ev.needs.splits:
                cp = cache.setdefault(split, CachePlan())
                for m in plans.values():
                    layers = m.layers if ev.needs.layers is None else \
                        _named_layers(m, ev.needs.layers)
                    cp.keys.update((m.label, layer, r) for layer in layers
                                   for r in ev.needs.reductions or (m.reduce_for(layer),))
                cp.outputs |= ev.needs.output
        return cache

    # ------------------------------------------------------------------ the data pass

    def _indices(self, dataset: ImageDataset, limit: int | None) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.recipe.run.seed)
        order = torch.randperm(len(dataset), generator=g).tolist()
        if limit is not None and limit > len(order):
            _say(f"run.examples = {limit} but split '{dataset.split}' of '{dataset.name}' has "
                 f"{len(order)}; using all {len(order)}", self.quiet)
        return order[:limit] if limit is not None else order

    def _batches(self, dataset: ImageDataset, indices: Sequence[int],
                 transforms: Sequence[Preprocess]) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _Preprocessed(dataset, list(indices), list(transforms)),
            batch_size=self.recipe.run.batch_size, shuffle=False,
            num_workers=self.recipe.run.num_workers,
        )
        for *inputs, labels in loader:
            yield inputs, torch.as_tensor(labels)

    def _pass(self, split: str, dataset: ImageDataset, plans: dict[str, ModelPlan],
              cache: CachePlan | None, accumulators: dict[str, SimilarityAccumulator],
              observers: Sequence[Observer] = ()) -> None:
        """One pass over a split: models forward once per batch; metrics, cache and streaming
        evaluators fed."""
        from tqdm import tqdm

        state_dir = self.dir / "cache" / split
        progress_file = state_dir / "progress.json"
        progress = store.read_json(progress_file) if progress_file.exists() else {}
        if progress.get("done"):
            self._load_state(state_dir, accumulators, observers)
            return
        limit = self.recipe.run.examples if split == EVAL else self.recipe.run.train_examples
        indices = self._indices(dataset, limit)
        bs = self.recipe.run.batch_size
        start = int(progress.get("batches", 0))
        if start:
            self._load_state(state_dir, accumulators, observers)
            _say(f"{split}: resuming after {start} saved batches", self.quiet)
        transforms = list(dict.fromkeys(p.loaded.preprocess for p in plans.values()))
        taps = {}
        for label, plan in plans.items():
            layers = list(plan.layers)
            if cache is not None and cache.outputs:
                layers.append(OUTPUT)
            for obs in observers:
                layers += [x for x in obs.layers.get(label, []) if x not in layers]
            taps[label] = LayerTap(plan.loaded, layers)
        infos = {label: _observe_info(plan) for label, plan in plans.items()}
        n_batches = -(-len(indices) // bs)
        bar = tqdm(total=n_batches, initial=start, desc=f"{split} pass", unit="batch",
                   disable=not self.progress, file=sys.stderr)
        b = start
        for inputs, labels in self._batches(dataset, indices[start * bs:], transforms):
            feats: dict[str, dict[str, torch.Tensor]] = {}
            shard: dict[str, torch.Tensor] = {"labels": labels}
            for label, plan in plans.items():
                x = inputs[transforms.index(plan.loaded.preprocess)]
                with taps[label].attached():
                    raw = taps[label].run(x)
                feats[label] = {}
                for layer in plan.layers:
                    where = f"model '{label}', layer '{layer}'"
                    feats[label][layer] = reduce_output(raw[layer], plan.reduce_for(layer),
                                                        plan.loaded.num_prefix_tokens, where)
                if cache is not None:
                    self._fill_shard(shard, label, plan, raw, cache)
                for obs in observers:
                    for layer in obs.layers.get(label, []):
                        obs.evaluator.observe(split, label, layer, raw[layer], labels,
                                              infos[label])
            for acc in accumulators.values():
                acc.update(feats)
            if cache is not None:
                store.write_tensors(state_dir / f"{b:06d}.safetensors", shard)
            b += 1
            bar.update(1)
            if b % self.recipe.run.checkpoint_every == 0:
                self._save_state(state_dir, accumulators, b, done=False, observers=observers)
        bar.close()
        self._save_state(state_dir, accumulators, b, done=True, observers=observers)

    @staticmethod
    def _fill_shard(shard: dict[str, torch.Tensor], label: str, plan: ModelPlan,
                    raw: dict[str, torch.Tensor], cache: CachePlan) -> None:
        from repsim.metrics.engine import check_features

        for model, layer, reduction in cache.keys:
            if model != label:
                continue
            where = f"model '{label}', layer '{layer}'"
            try:
                t = reduce_output(raw[layer], reduction, plan.loaded.num_prefix_tokens, where)
            except FeatureError:
                if reduction == plan.reduce_for(layer):
                    raise
                continue  # an extra reduction an evaluator asked for that this layer lacks
            shard[f"{label}|{layer}|{reduction}"] = check_features(t, where).float()
        if cache.outputs:
            shard[f"{label}|{OUTPUT}|raw"] = raw[OUTPUT].reshape(raw[OUTPUT].shape[0], -1).float()

    def _save_state(self, state_dir: Path, accumulators: dict[str, SimilarityAccumulator],
                    batches: int, done: bool, observers: Sequence[Observer] = ()) -> None:
        import torch

        for obs in observers:
            state = obs.evaluator.state()
            if state:
                store.write_tensors(state_dir / f"observer_{obs.key}.safetensors", state)

        for key, acc in accumulators.items():
            tensors: dict[str, torch.Tensor] = {}
            for (a, b), t in acc.terms.items():
                p = f"{a}|{b}|"
                tensors[p + "cross"], tensors[p + "self_rows"] = t.cross, t.self_rows
                tensors[p + "self_cols"] = t.self_cols
                tensors[p + "counts"] = torch.tensor([t.n_batches, t.n_examples])
                if t.batch_cross:
                    tensors[p + "batch_cross"] = torch.cat(t.batch_cross)
                    tensors[p + "batch_self_rows"] = torch.cat(t.batch_self_rows)
                    tensors[p + "batch_self_cols"] = torch.cat(t.batch_self_cols)
            meta = {"batch_size": str(acc.batch_size or 0), "dropped": str(acc.dropped)}
            if tensors:
                store.write_tensors(state_dir / f"state_{key}.safetensors", tensors, meta)
        store.write_json(state_dir / "progress.json", {"batches": batches, "done": done})

    @staticmethod
    def _load_state(state_dir: Path, accumulators: dict[str, SimilarityAccumulator],
                    observers: Sequence[Observer] = ()) -> None:
        from safetensors import safe_open

        from repsim.metrics.base import PairTerms

        for obs in observers:
            path = state_dir / f"observer_{obs.key}.safetensors"
            if path.exists():
                obs.evaluator.load_state(store.read_tensors(path))

        for key, acc in accumulators.items():
            path = state_dir / f"state_{key}.safetensors"
            if not path.exists():
                continue
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            acc.batch_size = int(meta.get("batch_size", 0)) or None
            acc.dropped = int(meta.get("dropped", 0))
            for a, b in acc.pairs:
                p = f"{a}|{b}|"
                if p + "cross" not in t:
                    continue
                nb, ne = t[p + "counts"].tolist()
                keep = p + "batch_cross" in t
                acc.terms[(a, b)] = PairTerms(
                    t[p + "cross"], t[p + "self_rows"], t[p + "self_cols"], nb, ne,
                    [t[p + "batch_cross"]] if keep else [],
                    [t[p + "batch_self_rows"]] if keep else [],
                    [t[p + "batch_self_cols"]] if keep else [])

    # ------------------------------------------------------------------ results

    def _similarity_results(self, plans: dict[str, ModelPlan],
                            accumulators: dict[str, SimilarityAccumulator],
                            ctx: DiskContext) -> None:
        from repsim.metrics.engine import SimilarityResult, undefined_notes

        pairs = self.recipe.model_pairs()
        for key, (part, params) in self.checked.metrics.items():
            metric = part.build(params)
            metric.name = part.name
            for a, b in pairs:
                if key in accumulators:
                    result = accumulators[key].result(a, b)
                else:
                    rows, cols = plans[a].layers, plans[b].layers
                    xs = [ctx.features(a, r, EVAL) for r in rows]
                    ys = [ctx.features(b, c, EVAL) for c in cols]
                    values = metric.matrix(xs, ys, None,
                                           [f"model '{a}', layer '{r}'" for r in rows],
                                           [f"model '{b}', layer '{c}'" for c in cols])
                    desc = metric.describe() | {"examples": int(xs[0].shape[0])}
                    result = SimilarityResult(values, rows, cols, part.name, desc,
                                              undefined_notes(values, rows, cols, None))
                result.description["metric_label"] = key
                result.description["reduce"] = {
                    m: {"model": plans[m].reduce, "layers": plans[m].layer_reduce}
                    for m in (a, b)}
                self._bootstrap(metric, result)
                self.results[(key, a, b)] = result
                self._write_similarity(key, a, b, result, plans)
                for note in result.notes:
                    if note not in self.notes:
                        self.notes.append(note)
                        _say(f"note ({key}, {a} vs {b}): {note}", self.quiet)

    def _bootstrap(self, metric: Any, result: SimilarityResult) -> None:
        """Percentile intervals by resampling minibatches (metrics of the CKA form only)."""
        from repsim.metrics.base import StreamingMetric
        from repsim.metrics.inference import bootstrap_cka

        n = self.recipe.run.bootstrap
        if not n or result.terms is None or not result.terms.batch_cross:
            return
        if type(metric).finalize is not StreamingMetric.finalize:
            result.notes.append(f"no bootstrap interval: '{metric.name}' is not of the CKA form.")
            return
        if result.terms.n_batches < 2:
            result.notes.append("no bootstrap interval: it needs at least 2 minibatches.")
            return
        conf = self.recipe.run.confidence
        low, high = bootstrap_cka(result, n_resamples=n, confidence=conf,
                                  seed=self.recipe.run.seed)
        result.description["bootstrap"] = {"resamples": n, "confidence": conf,
                                           "unit": "minibatch", "interval": "percentile"}
        result.intervals = (low, high)

    def _write_similarity(self, key: str, a: str, b: str, result: SimilarityResult,
                          plans: dict[str, ModelPlan]) -> None:
        from repsim.report import heatmap, matrix_table

        base = self.dir / "similarity" / key
        name = f"{a}__{b}"
        tensors = {"values": result.values}
        if result.terms is not None:
            tensors |= {"cross": result.terms.cross, "self_rows": result.terms.self_rows,
                        "self_cols": result.terms.self_cols}
        if result.intervals is not None:
            tensors |= {"ci_low": result.intervals[0], "ci_high": result.intervals[1]}
        store.write_tensors(base / f"{name}.safetensors", tensors,
                            {"rows": json.dumps(result.rows), "cols": json.dumps(result.cols)})
        data = result.to_json() | {"model_a": a, "model_b": b,
                                   "groups_a": plans[a].groups, "groups_b": plans[b].groups}
        store.write_json(base / f"{name}.json", data)
        lo = min(0.0, float(result.values.nan_to_num(0).min()))
        vrange = (lo, 1.0) if result.description.get("kind") == "similarity" else \
            (lo, float(result.values.nan_to_num(0).max()) or 1.0)
        for group in plans[a].groups:
            if group not in plans[b].groups:
                continue
            ri = [result.rows.index(x) for x in plans[a].groups[group]]
            ci = [result.cols.index(x) for x in plans[b].groups[group]]
            sub = result.values[ri][:, ci]
            rows, cols = plans[a].groups[group], plans[b].groups[group]
            text = (f"# {key}: {a} (rows) vs {b} (columns), layers '{group}'\n\n"
                    + matrix_table(sub, rows, cols) + "\n")
            if result.intervals is not None:
                conf = result.description["bootstrap"]["confidence"]
                lo, hi = (t[ri][:, ci] for t in result.intervals)
                text += (f"\n## {conf:.0%} bootstrap intervals (resampled minibatches)\n\n"
                         + matrix_table(sub, rows, cols, intervals=(lo, hi)) + "\n")
            store.write_text(self.dir / "tables" / key / f"{name}__{group}.md", text)
            store.write_figure(
                self.dir / "figures" / key / f"{name}__{group}.png",
                lambda sub=sub, rows=rows, cols=cols, group=group: heatmap(
                    sub, rows, cols, f"{key} — {group}", f"{b} layer", f"{a} layer", vrange))

    def _run_evaluators(self, evaluators: dict[str, Evaluator], ctx: DiskContext) -> None:
        from repsim.report import records_table

        for key, ev in evaluators.items():
            out = self.dir / "evaluators" / key
            if (out / "result.json").exists():
                _say(f"evaluator '{key}': already done, kept", self.quiet)
                continue
            _say(f"running evaluator '{key}'", self.quiet)
            res = ev.evaluate(ctx)
            for tname, (headers, rows) in res.tables.items():
                store.write_text(out / f"{tname}.md", records_table(headers, rows) + "\n")
            if res.tensors:
                store.write_tensors(out / "tensors.safetensors", res.tensors)
            for fname, make in res.figures.items():
                store.write_figure(out / f"{fname}.png", make)
            if "report_md" in res.data:
                store.write_text(out / "report.md", str(res.data["report_md"]))
            store.write_json(out / "result.json", {"evaluator": key, "protocol": res.protocol,
                                                   "data": res.data,
                                                   "tables": {k: {"headers": h, "rows": r}
                                                              for k, (h, r) in res.tables.items()}})

    def _provenance(self, plans: dict[str, ModelPlan], started: float) -> dict[str, Any]:
        import importlib.metadata as md

        from repsim.plugins import get_host

        def version(dist: str) -> str:
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                return "not installed"

        return {
            "repsim": version("repsim-core"),
            "versions": {d: version(d) for d in ("torch", "torchvision", "timm", "numpy")},
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "git_commit": _git_commit(),
            "seed": self.recipe.run.seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 2),
            "plugins": [{"name": p.name, "version": p.version, "builtin": p.builtin,
                         "error": p.error} for p in get_host().plugins.values()],
            "models": {label: {"model": p.registry_name, "reduce": p.reduce,
                               "layer_reduce": p.layer_reduce,
                               "num_prefix_tokens": p.loaded.num_prefix_tokens,
                               "family": p.loaded.family,
                               "preprocess": p.loaded.preprocess.describe(),
                               "groups": p.groups, "provenance": p.loaded.provenance}
                       for label, p in plans.items()},
        }

    def summary_rows(self, plans: dict[str, ModelPlan]) -> tuple[list[str], list[list[Any]]]:
        """Mean of the same-layer values (diagonal) per model pair and layer group."""
        groups = list(self.recipe.layers)
        headers = ["metric", "model A", "model B", *[f"{g} (diag mean)" for g in groups]]
        rows = []
        for (key, a, b), res in self.results.items():
            row: list[Any] = [key, a, b]
            for g in groups:
                ra, rb = plans[a].groups.get(g), plans[b].groups.get(g)
                if not ra or not rb or len(ra) != len(rb):
                    row.append("-")
                    continue
                vals = [float(res.values[res.rows.index(x), res.cols.index(y)])
                        for x, y in zip(ra, rb)]
                defined = [v for v in vals if v == v]
                if not defined:
                    row.append(float("nan"))
                elif len(defined) < len(vals):  # say that undefined layers were left out
                    row.append(f"{sum(defined) / len(defined):.3f} ({len(vals) - len(defined)} "
                               "undefined)")
                else:
                    row.append(sum(defined) / len(defined))
            rows.append(row)
        return headers, rows

    # ------------------------------------------------------------------ entry point

    def execute(self) -> Path:
        import torch

        from repsim.metrics.accumulate import SimilarityAccumulator
        from repsim.report import records_table

        started = time.time()
        torch.manual_seed(self.recipe.run.seed)
        self._claim_directory()
        dpart, dparams = self.checked.dataset
        dataset = dpart.build(dparams)
        plans = self._build_models()
        evaluators = {}
        for key, (part, params) in self.checked.evaluators.items():
            ev = part.build(params)
            ev.name = key
            evaluators[key] = ev
        cache = self._cache_plans(plans, evaluators)
        pairs = self.recipe.model_pairs()
        keep = self.recipe.run.bootstrap > 0
        accumulators = {}
        for key, (part, params) in self.checked.metrics.items():
            metric = part.build(params)
            metric.name = part.name
            if metric.properties.streaming:
                accumulators[key] = SimilarityAccumulator(
                    metric, {k: p.layers for k, p in plans.items()}, pairs, keep_batches=keep)
        observers = self._observers(plans, evaluators)

        def watching(split: str) -> list[Observer]:
            return [o for o in observers if split in o.evaluator.observes.splits]

        self._pass(EVAL, dataset, plans, cache.get(EVAL), accumulators, watching(EVAL))
        splits = {EVAL: dataset}
        extra = list(cache) + [s for o in observers for s in o.evaluator.observes.splits]
        for split in dict.fromkeys(extra):
            if split != EVAL:
                splits[split] = dataset.with_split(split)
                self._pass(split, splits[split], plans, cache.get(split), {}, watching(split))
        ctx = DiskContext(self.dir / "cache", plans, splits, self.results, self.recipe.run.seed)
        self._similarity_results(plans, accumulators, ctx)
        self._run_evaluators({k: e for k, e in evaluators.items()}, ctx)
        headers, rows = self.summary_rows(plans)
        summary = records_table(headers, rows) if rows else "(no similarity metrics)"
        store.write_json(self.dir / "provenance.json", self._provenance(plans, started))
        store.write_text(self.dir / "summary.md", _summary_md(self, summary))
        _say(summary, self.quiet)
        return self.dir


class _Preprocessed:
    """A dataset view returning each distinct model transform of an image, then its label."""

    def __init__(self, dataset: ImageDataset, indices: list[int],
                 transforms: list[Preprocess]) -> None:
        self.dataset, self.indices, self.transforms = dataset, indices, transforms

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image, label = self.dataset[self.indices[i]]
        return (*(t(image) for t in self.transforms), label)


class DiskContext:
    """The evaluators' view of a finished pass, reading the on-disk feature cache."""

    def __init__(self, cache_dir: Path, plans: dict[str, ModelPlan],
                 splits: dict[str, ImageDataset], results: dict[tuple[str, str, str], Any],
                 seed: int) -> None:
        self.cache_dir, self.plans, self.splits = cache_dir, plans, splits
        self.results, self.seed = results, seed
        self.models = list(plans)

    def _shards(self, split: str) -> list[Path]:
        shards = sorted((self.cache_dir / split).glob("[0-9]*.safetensors"))
        if not shards:
            raise KeyError(f"no cached features for split '{split}'; cached splits: "
                           f"{sorted(p.name for p in self.cache_dir.iterdir() if p.is_dir())}")
        return shards

    def _read(self, split: str, key: str, what: str) -> torch.Tensor:
        import torch
        from safetensors import safe_open

        parts = []
        for shard in self._shards(split):
            with safe_open(str(shard), framework="pt") as fh:
                if key not in fh.keys():  # noqa: SIM118
                    raise KeyError(f"{what} was not cached for split '{split}': an evaluator "
                                   "must ask for it in its FeatureNeeds.")
                parts.append(fh.get_tensor(key))
        return torch.cat(parts)

    def _cached_keys(self, split: str) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(self._shards(split)[0]), framework="pt") as fh:
            return list(fh.keys())  # noqa: SIM118

    def layers(self, model: str) -> list[str]:
        return self.plans[model].layers

    def groups(self, model: str) -> dict[str, list[str]]:
        return self.plans[model].groups

    def features(self, model: str, layer: str, split: str = EVAL,
                 reduction: str | None = None) -> torch.Tensor:
        if model not in self.plans:
            raise KeyError(f"no model '{model}' in this run; models: {self.models}")
        r = reduction or self.plans[model].reduce_for(layer)
        what = f"features of model '{model}', layer '{layer}', reduction '{r}'"
        key = f"{model}|{layer}|{r}"
        if key not in self._cached_keys(split) and any(
                k.startswith(f"{model}|{layer}|") for k in self._cached_keys(split)):
            raise FeatureError(f"{what}: this layer's output has no '{r}' reduction.")
        return self._read(split, key, what)

    def labels(self, split: str = EVAL) -> torch.Tensor:
        return self._read(split, "labels", "labels")

    def output(self, model: str, split: str = EVAL) -> torch.Tensor:
        return self._read(split, f"{model}|{OUTPUT}|raw", f"outputs of model '{model}'")

    def similarity(self, metric: str, model_a: str, model_b: str) -> SimilarityResult:
        from repsim.metrics.engine import SimilarityResult

        if (metric, model_a, model_b) in self.results:
            return self.results[(metric, model_a, model_b)]
        if (metric, model_b, model_a) in self.results:
            r = self.results[(metric, model_b, model_a)]
            return SimilarityResult(r.values.T, r.cols, r.rows, r.metric, r.description, r.notes)
        raise KeyError(f"no '{metric}' result for models '{model_a}' and '{model_b}' in this "
                       "run; add the metric to the recipe's [[metrics]].")

    def model_info(self, model: str) -> dict[str, Any]:
        p = self.plans[model]
        return {"model": p.registry_name, "family": p.loaded.family, "reduce": p.reduce,
                "num_prefix_tokens": p.loaded.num_prefix_tokens,
                "provenance": p.loaded.provenance, "loaded": p.loaded}

    def classes(self) -> list[str]:
        return list(self.splits[EVAL].classes)


def _observe_info(plan: ModelPlan) -> dict[str, Any]:
    embed = getattr(plan.loaded.module, "patch_embed", None)
    grid, patch = getattr(embed, "grid_size", None), getattr(embed, "patch_size", None)
    return {"num_prefix_tokens": plan.loaded.num_prefix_tokens, "family": plan.loaded.family,
            "grid_size": tuple(grid) if grid is not None else None,
            "patch_size": tuple(patch) if patch is not None else None}


def _named_layers(plan: ModelPlan, names: Sequence[str]) -> list[str]:
    """Layers of a plan named directly or through their group; names it lacks select nothing."""
    out: dict[str, None] = {}
    for name in names:
        if name in plan.groups:
            out.update(dict.fromkeys(plan.groups[name]))
        elif name in plan.layers:
            out[name] = None
    return list(out)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _summary_md(run: Run, summary: str) -> str:
    lines = [f"# {run.recipe.run.name}", "", "Mean same-layer similarity per layer group:", "",
             summary, ""]
    figs = sorted((run.dir / "figures").rglob("*.png")) if (run.dir / "figures").exists() else []
    if figs:
        lines += ["## Figures", ""] + [f"- [{f.relative_to(run.dir)}]({f.relative_to(run.dir)})"
                                       for f in figs] + [""]
    evs = sorted((run.dir / "evaluators").glob("*")) if (run.dir / "evaluators").exists() else []
    if evs:
        lines += ["## Evaluators", ""] + [f"- {e.name}: `{e.relative_to(run.dir)}/`" for e in evs]
    return "\n".join(lines) + "\n"


def run_recipe(path: str | Path, out: Path | None = None, progress: bool = True,
               quiet: bool = False) -> Path:
    """Validate and execute a recipe; returns the run directory."""
    from repsim.recipe import check_recipe

    return Run(check_recipe(path), out, progress, quiet).execute()
