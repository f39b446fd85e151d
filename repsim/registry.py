"""Typed registries of named parts (models, datasets, layer selectors, metrics, evaluators).

A :class:`Part` is a name, a builder and a pydantic model of the builder's parameters. Parameters
are validated before anything heavy is imported or loaded, so a recipe fails fast on a typo.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from repsim.errors import DuplicatePartError, RecipeError, UnknownPartError

KINDS = ("model", "dataset", "layer_selector", "metric", "evaluator")


class NoParams(BaseModel):
    """Parameters of a part that takes none."""

    model_config = ConfigDict(extra="forbid")


P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class Part(Generic[P]):
    """A registered, buildable part.

    ``build`` receives the validated parameter model and returns the part's object (a metric, a
    loaded model, a dataset, ...). ``info`` carries kind-specific facts shown by ``repsim list``
    (a metric's range and invariances, a model's expected checkpoint and preprocessing).
    ``structure`` (models only, optional) builds the same network without reading weights; it
    is called on the meta device (:meth:`skeleton`), so recipes are checked against the real
    module names in a fraction of a second.
    """

    kind: str
    name: str
    build: Callable[[P], Any]
    params: type[P] = NoParams  # type: ignore[assignment]
    summary: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)
    provider: str = "repsim"
    structure: Callable[[P], Any] | None = None

    def validate(self, raw: Mapping[str, Any] | BaseModel | None = None, where: str = "") -> P:
        """Validate raw parameters; errors name the part and each offending field."""
        if isinstance(raw, self.params):
            return raw
        try:
            return self.params.model_validate(dict(raw or {}))
        except ValidationError as exc:
            place = where or f"parameters of {self.kind} '{self.name}'"
            lines = [f"{place}: invalid parameters for {self.kind} '{self.name}' ({self.provider})"]
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
                lines.append(f"  {loc}: {err['msg']}")
            known = ", ".join(self.params.model_fields) or "none"
            lines.append(f"  accepted parameters: {known}")
            raise RecipeError("\n".join(lines)) from None

    def create(self, raw: Mapping[str, Any] | BaseModel | None = None, **overrides: Any) -> Any:
        """Validate parameters and build the part."""
        params = dict(raw or {}) if not isinstance(raw, BaseModel) else raw.model_dump()
        params.update(overrides)
        return self.build(self.validate(params))

    def skeleton(self, params: P) -> Any:
        """The part's ``structure`` built on the meta device: every module and shape, no weights
        (a ViT-L in a tenth of a second). None if the part declares no structure."""
        if self.structure is None:
            return None
        import torch

        with torch.device("meta"):
            return self.structure(params)


T = TypeVar("T")


class Registry:
    """Name → :class:`Part` for one kind; duplicate names and unknown names are user errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._parts: dict[str, Part] = {}

    def add(self, part: Part) -> None:
        if part.kind != self.kind:
            raise ValueError(f"a {part.kind} part cannot go in the {self.kind} registry")
        old = self._parts.get(part.name)
        if old is not None:
            raise DuplicatePartError(
                f"{self.kind} '{part.name}' is registered twice: by '{old.provider}' and by "
                f"'{part.provider}'. Uninstall one of the two plugins, or ask its author to rename "
                "the part."
            )
        self._parts[part.name] = part

    def get(self, name: str) -> Part:
        try:
            return self._parts[name]
        except KeyError:
            raise UnknownPartError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._parts, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"unknown {self.kind} '{name}'.{hint} `repsim list {self.kind}s` shows the "
            f"{len(self._parts)} available; a plugin may add more."
        )

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard (``'dino_*'``)."""
        return sorted(n for n in self._parts if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[Part]:
        return iter(self._parts[n] for n in sorted(self._parts))

    def __len__(self) -> int:
        return len(self._parts)
