"""Recipes: TOML files validated with pydantic, resolved against the registries.

A recipe names the data, the models (with their parameters), the layer groups, the token
reduction, the metrics and the evaluators. ``load_recipe`` checks the file's syntax and shape;
``check_recipe`` resolves every name and validates every part's parameters without loading any
weights, so a typo fails in a second, not after an hour of extraction.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from repsim.errors import MissingFileError, RecipeError, RepsimError

Reduction = Literal["cls", "gap", "gap_no_cls", "flatten"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSection(_Strict):
    """How the data pass runs."""

    name: str = "run"
    seed: int = 0
    batch_size: int = Field(32, ge=1, description="forward batch size; also the estimator "
                            "minibatch of metrics that do not set their own `batch_size`")
    examples: int | None = Field(None, ge=1, description="examples drawn from the split; all if unset")
    train_examples: int | None = Field(
        None, ge=1, description="examples of other splits evaluators read (k-NN train set); all if unset"
    )
    output: Path = Field(Path("runs/run"), description="run directory")
    reduce: Reduction = "cls"
    pairs: Literal["all", "cross"] | list[tuple[str, str]] = Field(
        "all", description="'all': every model pair incl. a model with itself; 'cross': distinct"
    )
    bootstrap: int = Field(0, ge=0, description="bootstrap resamples for CKA intervals (0: none)")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the bootstrap intervals")
    num_workers: int = Field(0, ge=0, description="data-loading worker processes")
    prefetch: int = Field(2, ge=1, description="batches each data-loading worker prepares ahead")
    checkpoint_every: int = Field(20, ge=1, description="batches between resumable state saves")
    heatmaps: bool = Field(True, description="a heatmap per model pair and layer group in "
                           "figures/ (the report's figure grids are written either way)")
    device: str = Field("auto", description="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N "
                        "or mps")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the forwards; metrics always get float32")
    tf32: bool = Field(False, description="allow TF32 matrix products on CUDA (engine included)")
    cache_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of the cached features evaluators read")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: the "
                                "cores this process may use")


class DataSection(_Strict):
    dataset: str
    split: str = "val"
    params: dict[str, Any] = Field(default_factory=dict)


class LayerGroup(BaseModel):
    """A selector and its parameters; a string or list of strings in TOML means glob patterns."""

    model_config = ConfigDict(extra="allow")
    selector: str = "glob"
    reduce: Reduction | None = None  # this group's token reduction (default: the model's)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _layer_group(value: Any) -> Any:
    if isinstance(value, str):
        return {"selector": "glob", "patterns": [value]}
    if isinstance(value, list):
        return {"selector": "glob", "patterns": value}
    return value


class ModelSection(_Strict):
    model: str = Field(description="registry name, see `repsim list models`")
    params: dict[str, Any] = Field(default_factory=dict)
    reduce: Reduction | None = None
    layers: dict[str, LayerGroup] = Field(default_factory=dict, description="per-model overrides")

    @field_validator("layers", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> Any:
        return {k: _layer_group(v) for k, v in (value or {}).items()}


class PartSection(_Strict):
    name: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or self.name


class Recipe(_Strict):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection
    models: dict[str, ModelSection] = Field(min_length=1)
    layers: dict[str, LayerGroup] = Field(min_length=1)
    metrics: list[PartSection] = Field(default_factory=list)
    evaluators: list[PartSection] = Field(default_factory=list)

    @field_validator("layers", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> Any:
        return {k: _layer_group(v) for k, v in (value or {}).items()}

    def model_pairs(self) -> list[tuple[str, str]]:
        names = list(self.models)
        if isinstance(self.run.pairs, list):
            return [tuple(p) for p in self.run.pairs]  # type: ignore[misc]
        same = self.run.pairs == "all"
        return [(a, b) for i, a in enumerate(names) for b in names[i if same else i + 1:]]

    def groups_of(self, model: str) -> dict[str, LayerGroup]:
        return {**self.layers, **self.models[model].layers}

    def reduce_of(self, model: str) -> str:
        return self.models[model].reduce or self.run.reduce


def _toml_error(path: Path, exc: tomllib.TOMLDecodeError) -> RecipeError:
    msg = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    where = f"{path}:{m.group(1)}:{m.group(2)}" if m else str(path)
    text = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
    return RecipeError(f"{where}: malformed TOML: {text}. Fix the syntax at that line.")


def _validation_error(path: Path, exc: ValidationError) -> RecipeError:
    lines = [f"{path}: the recipe does not validate:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown field (remove it or check its spelling)")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required field is missing")
        else:
            lines.append(f"  {loc}: {err['msg']}")
    lines.append("See recipes/mini.toml for a complete example.")
    return RecipeError("\n".join(lines))


def parse_recipe(text: str, path: Path = Path("<recipe>")) -> Recipe:
    """Validate a recipe's text; ``include`` entries are read relative to ``path``'s folder."""
    raw = _with_includes(read_toml(text, path), path, (path.resolve(),))
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(path, exc) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (or the name of an embedded recipe such as ``mini``)."""
    path = resolve_recipe_path(path)
    return parse_recipe(path.read_text(encoding="utf-8"), path)


def read_toml(text: str, path: Path) -> dict[str, Any]:
    """A recipe file's TOML with its ``${NAME}`` locations filled in (:mod:`repsim.paths`);
    each file on its own, so an unset variable's error names the file that uses it."""
    from repsim.paths import substitute

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, exc) from None
    return substitute(raw, path)


def _with_includes(raw: dict[str, Any], path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A recipe with the recipes it ``include``s merged in (recursively, in order).

    The including recipe's own ``[run]`` and ``[data]`` keys win over the included ones';
    ``[models]`` and ``[layers]`` are united (one name defined two ways is an error naming both
    files); ``[[metrics]]`` and ``[[evaluators]]`` are concatenated, an entry included twice
    counted once. So one figure's recipe runs alone, and a composite of several extracts their
    shared models and data once.
    """
    includes = raw.pop("include", [])
    if not includes:
        return raw
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise RecipeError(f"{path}: `include` must be a list of recipe files, e.g. "
                          'include = ["paper/fig1.toml"].')
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, str], Path] = {}  # (table, name) -> the file that defined it
    for name in includes:
        child = (path.parent / name).resolve()
        if child in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(child):], child))
            raise RecipeError(f"{path}: include cycle {cycle}. Remove one of these includes.")
        if not child.is_file():
            raise RecipeError(f"{path}: included recipe '{name}' does not exist (looked for "
                              f"{child}). Paths in `include` are relative to the including file.")
        sub = _with_includes(read_toml(child.read_text(encoding="utf-8"), child), child,
                             (*chain, child))
        _merge(merged, sub, child, origin)
    _merge(merged, raw, path, origin, own=True)
    return merged


def _merge(into: dict[str, Any], raw: dict[str, Any], path: Path,
           origin: dict[tuple[str, str], Path], own: bool = False) -> None:
    for table, value in raw.items():
        if table in ("run", "data") and isinstance(value, dict):
            into.setdefault(table, {})
            for key, v in value.items():  # later files fill in; the including file wins
                if own or key not in into[table]:
                    into[table][key] = v
        elif table in ("models", "layers") and isinstance(value, dict):
            into.setdefault(table, {})
            for name, v in value.items():
                if name in into[table] and into[table][name] != v and not own:
                    raise RecipeError(
                        f"{path}: {table}.{name} is defined differently in "
                        f"{origin[(table, name)]}. Define it once (in a shared included "
                        "recipe), or identically in both.")
                into[table][name] = v
                origin.setdefault((table, name), path)
        elif table in ("metrics", "evaluators") and isinstance(value, list):
            into.setdefault(table, [])
            into[table].extend(v for v in value if v not in into[table])
        else:
            into[table] = value


def embedded_recipes() -> dict[str, Path]:
    folder = Path(__file__).parent / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def resolve_recipe_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    embedded = embedded_recipes()
    if str(path) in embedded:
        return embedded[str(path)]
    if p.exists():
        raise RecipeError(f"recipe '{p}' is not a file.")
    raise RecipeError(
        f"recipe file '{p}' does not exist. Give a path to a .toml file or the name of an embedded "
        f"recipe ({', '.join(embedded) or 'none'})."
    )


@dataclass(frozen=True)
class MissingFile:
    """A file or folder a recipe names that does not exist: where, which, and what to do."""

    where: str
    path: str
    note: str = ""  # where it is published, or how it is made
    problem: str = "does not exist"

    def line(self) -> str:
        if self.path in self.note:  # the part's own message, naming where and what
            return self.note
        return f"{self.where}: '{self.path}' {self.problem}" + (f" ({self.note})" if self.note
                                                               else "")


def path_params(value: Any, where: str) -> Iterator[tuple[str, Path]]:
    """Parameters typed as paths in validated parameters, with where they are
    (``models.x.params.checkpoint``, ``...files[0]``)."""
    if isinstance(value, Path):
        yield where, value
    elif isinstance(value, BaseModel):
        for k in type(value).model_fields:
            yield from path_params(getattr(value, k), f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from path_params(v, f"{where}[{i}]")


def _missing_paths(value: Any, where: str) -> list[tuple[str, Path]]:
    """Parameters typed as paths that point nowhere (checked before any weights load)."""
    return [(w, p) for w, p in path_params(value, where) if not p.exists()]


class CheckedRecipe:
    """A recipe whose parts are resolved and whose parameters are validated.

    Models whose part declares a ``structure`` are built on the meta device (modules, no
    weights) and their layer groups selected on it, so a pattern that matches nothing fails
    here. ``groups`` holds what was selected, per model; ``notes`` what could not be checked;
    ``skeletons`` the meta-device models (for the preflight's FLOP counts).

    With ``missing_ok`` the files that do not exist are listed in ``missing`` instead of raised
    (the preflight reports them with everything else it finds); every other problem raises.
    """

    def __init__(self, recipe: Recipe, path: Path, missing_ok: bool = False) -> None:
        from repsim.data.base import split_conflict
        from repsim.plugins import registry

        self.recipe, self.path = recipe, path
        self.notes: list[str] = []
        self.groups: dict[str, dict[str, list[str]]] = {}
        self.skeletons: dict[str, Any] = {}
        self.missing: list[MissingFile] = []  # files the parameters name that do not exist
        problems: list[str] = []

        def resolve(kind: str, name: str, params: dict[str, Any], where: str) -> Any:
            reg = registry(kind)
            if name not in reg:
                problems.append(f"{where}: {reg.unknown_message(name)}")
                return None
            part = reg.get(name)
            try:
                validated = part.validate(params, where=where)
            except RecipeError as exc:
                if not self._absent_file(exc, where):
                    problems.append(str(exc))
                return None
            source = part.info.get("source")  # where the authors publish the file
            self.missing.extend(
                MissingFile(w, str(p), f"published at {source}; see docs/models.md" if source
                            else "") for w, p in _missing_paths(validated, where + ".params"))
            return part, validated

        d = recipe.data
        dparams = dict(d.params)
        reg = registry("dataset")
        if "split" in d.model_fields_set and (clash := split_conflict(d.split, d.params)):
            problems.append(clash)
        if d.dataset in reg and "split" in reg.get(d.dataset).params.model_fields:
            dparams.setdefault("split", d.split)
        self.dataset = resolve("dataset", d.dataset, dparams, "data")
        self.models = {label: resolve("model", m.model, m.params, f"models.{label}")
                       for label, m in recipe.models.items()}
        self.selectors: dict[str, dict[str, Any]] = {}
        for label in recipe.models:
            self.selectors[label] = {}
            for group, spec in recipe.groups_of(label).items():
                where = (f"models.{label}.layers.{group}" if group in recipe.models[label].layers
                         else f"layers.{group}")
                self.selectors[label][group] = resolve("layer_selector", spec.selector,
                                                       spec.params, where)
        self.metrics = {}
        for i, m in enumerate(recipe.metrics):
            self.metrics[m.key] = resolve("metric", m.name, m.params, f"metrics[{i}] ({m.name})")
        self.evaluators = {}
        for i, e in enumerate(recipe.evaluators):
            self.evaluators[e.key] = resolve("evaluator", e.name, e.params,
                                             f"evaluators[{i}] ({e.name})")
        for kind, keys in (("metric", [m.key for m in recipe.metrics]),
                           ("evaluator", [e.key for e in recipe.evaluators])):
            dup = {k for k in keys if keys.count(k) > 1}
            if dup:
                problems.append(f"{kind}s: {sorted(dup)} appear twice; give each a distinct `label`.")
        if not recipe.metrics and not recipe.evaluators:
            problems.append("the recipe has no [[metrics]] and no [[evaluators]]: nothing to do.")
        for a, b in recipe.model_pairs():
            for m in (a, b):
                if m not in recipe.models:
                    problems.append(f"run.pairs: model '{m}' is not in [models] "
                                    f"({', '.join(recipe.models)}).")
        problems.extend(self._check_structures())
        problems.extend(self._check_evaluator_names())
        if not problems:
            problems.extend(self._check_metrics())
        if problems or not missing_ok:  # every problem at once, absent files included
            problems.extend(m.line() for m in self.missing)
        if problems:
            raise RecipeError(f"{path}: {len(problems)} problem(s):\n" +
                              "\n".join(f"- {p}" for p in problems))

    def _absent_file(self, exc: Exception, where: str) -> bool:
        """Whether ``exc`` is a part saying a file it needs is absent (a fine-tuning run
        folder): then it is listed in ``missing`` with the part's message."""
        if not isinstance(exc, MissingFileError):
            return False
        text = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
        self.missing.append(MissingFile(where + ".params", exc.path, text))
        return True

    def select_layers(self, label: str, loaded: Any) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Model ``label``'s layer groups selected on ``loaded`` (groups left empty by an
        override are left out) and the reduction of each layer whose group sets one."""
        specs = self.recipe.groups_of(label)
        groups: dict[str, list[str]] = {}
        layer_reduce: dict[str, str] = {}
        for group, (sel_part, sel_params) in self.selectors[label].items():
            try:
                chosen = sel_part.build(sel_params).select(loaded)
            except RepsimError as exc:
                raise type(exc)(f"models.{label}, layer group '{group}': {exc}") from None
            if chosen:  # an empty override (`norm1 = []`) leaves a group out for this model
                groups[group] = chosen
            for layer in chosen if specs[group].reduce else []:
                if layer_reduce.setdefault(layer, specs[group].reduce) != specs[group].reduce:
                    raise RecipeError(
                        f"models.{label}: layer '{layer}' is in two layer groups with different "
                        f"reductions ('{layer_reduce[layer]}' and '{specs[group].reduce}'); give "
                        "both groups the same `reduce`.")
        if not groups:
            raise RecipeError(f"models.{label}: every layer group is empty for this model; "
                              "select at least one layer.")
        return groups, layer_reduce

    def _check_structures(self) -> list[str]:
        """Select every model's layers on its structure, where its part can build one."""
        problems = []
        for label, resolved in self.models.items():
            if resolved is None or resolved[0].structure is None or \
                    None in self.selectors[label].values():
                continue
            part, params = resolved
            try:
                skeleton = part.skeleton(params)
            except RepsimError as exc:
                if not self._absent_file(exc, f"models.{label}"):
                    problems.append(f"models.{label}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a user's network that reads its data
                self.notes.append(
                    f"models.{label}: layers not checked before the run: building its structure "
                    f"on the meta device (no weights) failed ({type(exc).__name__}: {exc}).")
                continue
            skeleton.name = skeleton.name or label
            self.skeletons[label] = skeleton
            try:
                self.groups[label] = self.select_layers(label, skeleton)[0]
            except RepsimError as exc:
                problems.append(str(exc))
        return problems

    def _check_evaluator_names(self) -> list[str]:
        """Models, layer groups and layers named in evaluator parameters.

        The built-in evaluators name models in ``models`` and ``pairs``, a layer group in
        ``group``, layers or groups in ``layer`` and ``layers`` (a string ``layers`` is a mode
        such as 'last'); plugins' evaluators that use the same names are checked alike.
        """
        recipe = self.recipe
        models = list(recipe.models)
        groups = sorted({g for label in models for g in recipe.groups_of(label)})
        problems = []
        for i, e in enumerate(recipe.evaluators):
            if self.evaluators[e.key] is None:
                continue
            params = self.evaluators[e.key][1]
            where = f"evaluators[{i}] ({e.name}).params"
            value = {f: getattr(params, f) for f in ("models", "pairs", "group", "layer", "layers")
                     if f in type(params).model_fields}
            paired = [m for pair in value.get("pairs") or [] for m in pair]
            for field, named in (("models", value.get("models") or []), ("pairs", paired)):
                problems += [f"{where}.{field}: '{m}' is not a model of the recipe "
                             f"({', '.join(models)})." for m in dict.fromkeys(named)
                             if m not in recipe.models]
            group = value.get("group")
            if group is not None and group not in groups:
                problems.append(f"{where}.group: '{group}' is not a layer group of the recipe "
                                f"({', '.join(groups)}).")
            scope = [m for m in value.get("models") or models if m in self.groups]
            for field in ("layer", "layers"):
                for name in _layer_names(value.get(field), field):
                    lacking = [m for m in scope if name not in self.groups[m]
                               and not any(name in ls for ls in self.groups[m].values())]
                    if lacking:
                        problems.append(f"{where}.{field}: {self._not_a_layer(name, lacking)}")
        return problems

    def _not_a_layer(self, name: str, models: list[str]) -> str:
        groups = self.groups[models[0]]
        layers = list(dict.fromkeys(la for ls in groups.values() for la in ls))
        return (f"'{name}' is neither a layer group nor a selected layer of model(s) "
                f"{', '.join(models)}. Model '{models[0]}' has the groups {', '.join(groups)} and "
                f"the layers {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}.")

    def _check_metrics(self) -> list[str]:
        out = []
        from repsim.metrics.base import StreamingMetric

        for key, (part, params) in self.metrics.items():
            metric = part.build(params)
            if not (isinstance(metric, StreamingMetric) and metric.properties.streaming):
                continue
            bs, need = metric.minibatch(self.recipe.run.batch_size), metric.min_batch_size
            if bs < need:
                out.append(
                    f"run.batch_size = {bs} is below the {need} examples per minibatch that metric "
                    f"'{key}' needs (HSIC_1 divides by n(n-3)). Set run.batch_size >= {need}, or "
                    f"the metric's own `batch_size` (the estimator minibatch); the seeds use 32."
                )
        return out


def _layer_names(value: Any, field: str) -> list[str]:
    """The layer or group names of an evaluator's ``layer``/``layers`` value (lists nest)."""
    if value is None or (field == "layers" and isinstance(value, str)):
        return []
    if isinstance(value, str):
        return [value]
    return [n for item in value for n in _layer_names(item, "layer")]


def with_run_settings(recipe: Recipe, overrides: dict[str, Any], path: Path) -> Recipe:
    """The recipe with ``[run]`` settings replaced (command-line flags), validated as in a file."""
    try:
        run = RunSection.model_validate(recipe.run.model_dump() | overrides)
    except ValidationError as exc:
        lines = [f"{path}: a command-line setting does not validate:"]
        lines += [f"  run.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise RecipeError("\n".join(lines)) from None
    return recipe.model_copy(update={"run": run})


def check_recipe(path: str | Path, run_overrides: dict[str, Any] | None = None,
                 missing_ok: bool = False) -> CheckedRecipe:
    """Load a recipe (``[run]`` settings replaced by ``run_overrides``) and resolve all its
    parts; raises RecipeError listing every problem (absent files too, unless ``missing_ok``:
    then they are in the result's ``missing``)."""
    p = resolve_recipe_path(path)
    recipe = load_recipe(p)
    if run_overrides:
        recipe = with_run_settings(recipe, run_overrides, p)
    return CheckedRecipe(recipe, p, missing_ok=missing_ok)
