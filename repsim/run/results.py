"""Results: finalising the metrics, bootstrap intervals, tables, heatmaps, summary, provenance."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.run.plan import EVAL

if TYPE_CHECKING:
    from repsim.metrics.base import Metric
    from repsim.metrics.results import SimilarityResult
    from repsim.run.cache import FeatureReader
    from repsim.run.plan import RunPlan

Results = dict[tuple[str, str, str], "SimilarityResult"]


def finalise(plan: RunPlan, streamed: Mapping[str, Mapping[tuple[str, str], SimilarityResult]],
             reader: FeatureReader | None) -> Results:
    """Every metric's result for every model pair: streaming metrics from their sinks, the
    others from the cached features (all examples at once), with bootstrap intervals."""
    from repsim.metrics.engine import similarity_matrix

    out: Results = {}
    for key, metric in plan.metrics.items():
        for a, b in plan.pairs:
            if key in streamed:
                result = streamed[key][(a, b)]
            else:
                assert reader is not None  # the plan caches eval features for full-batch metrics
                ma, mb = plan.models[a], plan.models[b]
                result = similarity_matrix(
                    metric,
                    {r: reader.features(a, r, ma.reduce_for(r), EVAL) for r in ma.layers},
                    {c: reader.features(b, c, mb.reduce_for(c), EVAL) for c in mb.layers},
                    row_names=[f"model '{a}', layer '{r}'" for r in ma.layers],
                    col_names=[f"model '{b}', layer '{c}'" for c in mb.layers])
            result.description["metric_label"] = key
            result.description["reduce"] = {
                m: {"model": plan.models[m].reduce, "layers": plan.models[m].layer_reduce}
                for m in (a, b)}
            bootstrap(plan, metric, result)
            out[(key, a, b)] = result
    return out


def bootstrap(plan: RunPlan, metric: Metric, result: SimilarityResult) -> None:
    """Percentile intervals by resampling minibatches (metrics of the CKA form only)."""
    from repsim.metrics.base import StreamingMetric
    from repsim.metrics.inference import bootstrap_interval

    run = plan.recipe.run
    if not run.bootstrap or result.terms is None or not result.terms.batch_cross:
        return
    if type(metric).finalize is not StreamingMetric.finalize:
        result.notes.append(f"no bootstrap interval: '{metric.name}' is not of the CKA form.")
        return
    if result.terms.n_batches < 2:
        result.notes.append("no bootstrap interval: it needs at least 2 minibatches.")
        return
    result.intervals = bootstrap_interval(result.terms, n_resamples=run.bootstrap,
                                          confidence=run.confidence, seed=run.seed)
    result.description["bootstrap"] = {"resamples": run.bootstrap, "confidence": run.confidence,
                                       "unit": "minibatch", "interval": "percentile"}


def write_similarity(run_dir: Path, plan: RunPlan, key: str, a: str, b: str,
                     result: SimilarityResult) -> None:
    """Tensors and JSON of one result; a table and a heatmap per layer group both models have."""
    from repsim.report import heatmap, matrix_table

    base = run_dir / "similarity" / key
    name = f"{a}__{b}"
    tensors = {"values": result.values}
    if result.terms is not None:
        tensors |= {"cross": result.terms.cross, "self_rows": result.terms.self_rows,
                    "self_cols": result.terms.self_cols}
    if result.intervals is not None:
        tensors |= {"ci_low": result.intervals[0], "ci_high": result.intervals[1]}
    store.write_tensors(base / f"{name}.safetensors", tensors,
                        {"layers": json.dumps({"rows": result.rows, "cols": result.cols})})
    ga, gb = plan.models[a].groups, plan.models[b].groups
    store.write_json(base / f"{name}.json", result.to_json() | {
        "model_a": a, "model_b": b, "groups_a": ga, "groups_b": gb})
    lo = min(0.0, float(result.values.nan_to_num(0).min()))
    vrange = (lo, 1.0) if result.description.get("kind") == "similarity" else \
        (lo, float(result.values.nan_to_num(0).max()) or 1.0)
    for group in (g for g in ga if g in gb):
        sub = result.block(ga[group], gb[group])
        text = (f"# {key}: {a} (rows) vs {b} (columns), layers '{group}'\n\n"
                + matrix_table(sub.values, sub.rows, sub.cols) + "\n")
        if sub.intervals is not None:
            conf = result.description["bootstrap"]["confidence"]
            text += (f"\n## {conf:.0%} bootstrap intervals (resampled minibatches)\n\n"
                     + matrix_table(sub.values, sub.rows, sub.cols, intervals=sub.intervals)
                     + "\n")
        store.write_text(run_dir / "tables" / key / f"{name}__{group}.md", text)
        if not plan.recipe.run.heatmaps:
            continue
        store.write_figure(
            run_dir / "figures" / key / f"{name}__{group}.png",
            lambda sub=sub, group=group: heatmap(sub.values, sub.rows, sub.cols,
                                                 f"{key} — {group}", f"{b} layer", f"{a} layer",
                                                 vrange))


def summary_rows(plan: RunPlan, results: Results) -> tuple[list[str], list[list[Any]]]:
    """Mean of the same-layer values (diagonal) per model pair and layer group, with the number
    of examples each value comes from (N); a cell without a diagonal is ``-`` and says why."""
    groups = list(plan.recipe.layers)
    headers = ["metric", "model A", "model B", "N", *[f"{g} (diag mean)" for g in groups]]
    rows = []
    for (key, a, b), res in results.items():
        row: list[Any] = [key, a, b, res.description.get("examples", "?")]
        for g in groups:
            ra, rb = plan.models[a].groups.get(g), plan.models[b].groups.get(g)
            if not ra or not rb:
                lacking = ", ".join(dict.fromkeys(m for m, r in ((a, ra), (b, rb)) if not r))
                row.append(f"- ({lacking}: no layers)")
                continue
            if len(ra) != len(rb):
                row.append(f"- ({len(ra)} vs {len(rb)} layers)")
                continue
            sub = res.block(ra, rb)
            undefined = int(sub.diagonal().isnan().sum())
            if undefined and undefined < len(ra):  # say that undefined layers were left out
                row.append(f"{sub.diag_mean():.3f} ({undefined} undefined)")
            else:
                row.append(sub.diag_mean())
        rows.append(row)
    return headers, rows


def summary_md(run_dir: Path, name: str, summary: str) -> str:
    """summary.md: the data and reductions (from the run's ``resolved.json``), the table of
    :func:`summary_rows`, what a ``-`` cell means, and links to figures and evaluators."""
    from repsim.recipe import Recipe

    recipe = Recipe.model_validate(store.read_json(run_dir / "resolved.json"))
    run, data = recipe.run, recipe.data
    drawn = "every example" if run.examples is None else f"run.examples = {run.examples}"
    by_reduction: dict[str, list[str]] = {}
    for label in recipe.models:
        by_reduction.setdefault(recipe.reduce_of(label), []).append(label)
    reductions = ", ".join(
        f"'{r}' ({'every model' if len(by_reduction) == 1 else ', '.join(labels)})"
        for r, labels in by_reduction.items())
    own: dict[str, set[str]] = {}
    for label in recipe.models:
        for group, spec in recipe.groups_of(label).items():
            if spec.reduce:
                own.setdefault(group, set()).add(spec.reduce)
    own_text = "; ".join(f"{g}: {', '.join(sorted(map(repr, rs)))}" for g, rs in own.items())
    lines = [
        f"# {name}", "",
        f"- Data: split '{data.split}' of dataset '{data.dataset}', {drawn} drawn with seed "
        f"{run.seed}; column N gives the examples each value is computed from.",
        f"- Token reduction {reductions}" + (f"; layer groups with their own: {own_text}."
                                             if own_text else "."), "",
        "Mean same-layer similarity (the diagonal of each layer x layer matrix) per layer "
        "group:", "", summary, "",
        "A cell `-` has no same-layer diagonal: one of the two models selects no layers in that "
        "group (an empty override), or they select different numbers of layers; the cell says "
        "which, and tables/ and figures/ hold the full matrices.", "",
    ]
    figs = sorted((run_dir / "figures").rglob("*.png")) if (run_dir / "figures").exists() else []
    if figs:
        lines += ["## Figures", ""] + [f"- [{f.relative_to(run_dir)}]({f.relative_to(run_dir)})"
                                       for f in figs] + [""]
    evs = sorted((run_dir / "evaluators").glob("*")) if (run_dir / "evaluators").exists() else []
    if evs:
        lines += ["## Evaluators", ""] + [f"- {e.name}: `{e.relative_to(run_dir)}/`" for e in evs]
    return "\n".join(lines) + "\n"


def provenance(plan: RunPlan, started: float) -> dict[str, Any]:
    """Versions, seed, git commit, plugins, device, and each model's layers and checkpoint."""
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
        "seed": plan.recipe.run.seed,
        "device": plan.settings.describe(),
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
                   for label, p in plan.models.items()},
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None

