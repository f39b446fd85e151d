"""What each stage of a run depends on, so a rerun redoes only the stages whose inputs changed.

- The run directory's identity is the data and the seed: a directory holding another study's
  results (other data, another seed) is never written into.
- A pass over a split is one extraction per model, each fingerprinted on what it computes from:
  the run settings of the batch plan, the data, the model's entry and layers, the streaming
  metrics and observers, the cache plan, the content of its input files (checkpoints, dataset
  folders) and the versions of the parts' plugins; not the other models. A saved extraction
  whose fingerprint differs is recomputed, never resumed; adding a model extracts that model
  alone (``repsim.run.kernels``).
- An evaluator depends on its entry in the recipe, on the passes it reads, and on the similarity
  results if it reads them.

Files are hashed by content (sha256), cached by path, size and modification time in
``$REPSIM_CACHE/hashes.json``, so a 350 MB checkpoint is read once; folders by their listing
(relative paths and sizes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.recipe import path_params

if TYPE_CHECKING:
    from repsim.evaluators.base import Evaluator
    from repsim.recipe import CheckedRecipe
    from repsim.run.plan import RunPlan

# Settings of [run] that change where or how fast a run computes, or only what later stages do
# with the pass: not part of a pass's fingerprint.
_NOT_IN_PASS = ("output", "num_workers", "prefetch", "device", "threads", "checkpoint_every",
                "confidence", "name", "heatmaps")


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """``$REPSIM_CACHE`` (default ``$XDG_CACHE_HOME/repsim`` or ``~/.cache/repsim``)."""
    if "REPSIM_CACHE" in os.environ:
        return Path(os.environ["REPSIM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "repsim"



def file_digest(path: Path, known: dict[str, str]) -> str:
    """sha256 of a file's content; ``known`` caches it by path, size and mtime."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        known[key] = h.hexdigest()
    return known[key]


def folder_digest(path: Path) -> str:
    """sha256 of a folder's listing: every file's relative path and size."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            h.update(f"{full.relative_to(path)}\0{full.stat().st_size}\n".encode())
    return h.hexdigest()


def input_digests(checked: CheckedRecipe) -> dict[str, dict[str, str]]:
    """Every file or folder a part's parameters name, with its content hash."""
    cache_file = cache_root() / "hashes.json"
    known: dict[str, str] = store.read_json(cache_file) if cache_file.exists() else {}
    before = dict(known)
    found: dict[str, dict[str, str]] = {}
    entries = [("data", checked.dataset), *((f"models.{k}", v) for k, v in checked.models.items())]
    for where, (_, params) in entries:
        for field, path in path_params(params, f"{where}.params"):
            if path.is_file():
                found[field] = {"path": str(path), "sha256": file_digest(path, known)}
            elif path.is_dir():
                found[field] = {"path": str(path), "listing_sha256": folder_digest(path)}
    if known != before:
        try:
            store.write_json(cache_file, known)
        except OSError:  # a read-only cache only costs hashing again next time
            pass
    return found


def part_versions(checked: CheckedRecipe, model: str | None = None) -> dict[str, str]:
    """The plugin (and version) providing each part the recipe names (with ``model``: the
    parts that model's extraction uses)."""
    from repsim.plugins import get_host

    versions = {info.name: info.version for info in get_host().plugins.values()}
    labels = list(checked.models) if model is None else [model]
    parts = [checked.dataset, *(checked.models[m] for m in labels), *checked.metrics.values(),
             *checked.evaluators.values(), *(p for m in labels
                                             for p in checked.selectors[m].values())]
    return {part.provider: versions.get(part.provider, "?") for part, _ in parts}


def directory_identity(checked: CheckedRecipe) -> str:
    """What makes two recipes the same study: the data and the seed."""
    r = checked.recipe
    return _hash({"data": r.data.model_dump(mode="json"), "seed": r.run.seed})


def model_fingerprint(plan: RunPlan, split: str, label: str, inputs: dict[str, Any]) -> str:
    """What one model's extraction over a split computes from: the run settings of the batch
    plan, the data, the model's entry and resolved layers, the streaming metrics and observers,
    what the cache keeps of it, the content of its and the data's files, the parts' versions.
    Not the other models, nor the pairs compared: adding a model leaves the others' stages."""
    recipe = plan.recipe.model_dump(mode="json")
    run = {k: v for k, v in recipe["run"].items()
           if k not in (*_NOT_IN_PASS, "pairs", "bootstrap")}
    m = plan.models[label]
    streaming = [e for e, metric in zip(recipe["metrics"], plan.metrics.values())
                 if metric.properties.streaming]
    cache = plan.cache.get(split)
    observers = {key: [recipe["evaluators"][list(plan.evaluators).index(key)],
                       plan.observed.get(key, {}).get(label, [])]
                 for key in plan.observers(split)}
    own = {k: v for k, v in inputs.items() if k.startswith(("data.", f"models.{label}."))}
    return _hash({"split": split, "run": run, "data": recipe["data"],
                  "model": recipe["models"][label],
                  "layers": [m.groups, m.reduce, m.layer_reduce],
                  "metrics": streaming if split == "eval" else [], "observers": observers,
                  "cache": sorted(k for k in cache.keys if k[0] == label) if cache else [],
                  "outputs": bool(cache and cache.outputs), "inputs": own,
                  "versions": part_versions(plan.checked, label)})


def pass_fingerprint(models: dict[str, str]) -> str:
    """A split's pass: the fingerprints of its models' extractions."""
    return _hash(models)


def evaluator_fingerprint(plan: RunPlan, key: str, evaluator: Evaluator,
                          passes: dict[str, str]) -> str:
    recipe = plan.recipe.model_dump(mode="json")
    entry = recipe["evaluators"][list(plan.evaluators).index(key)]
    reads: dict[str, Any] = {"passes": passes}
    if evaluator.access.similarity:
        reads["metrics"] = recipe["metrics"]
        reads["bootstrap"] = [recipe["run"]["bootstrap"], recipe["run"]["confidence"]]
    return _hash({"evaluator": entry, "reads": reads})
