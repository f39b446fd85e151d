"""Where the paper's data and checkpoints live, set in one place for every recipe.

A recipe writes ``${REPSIM_IMAGENET}``, ``${REPSIM_COCO}`` or ``${REPSIM_CHECKPOINTS}`` in any
string (``checkpoint = "${REPSIM_CHECKPOINTS}/vit-b-300ep.pth.tar"``). Each is taken from, in
order: the environment variable of that name; the user's paths file
(``$XDG_CONFIG_HOME/repsim/paths.toml``, by default ``~/.config/repsim/paths.toml``) with the keys
``imagenet``, ``coco``, ``checkpoints``; the default below (relative to the current directory).
Any other ``${NAME}`` must be set in the environment. Kept free of torch: recipes load in a blink.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from repsim.errors import RecipeError


@dataclass(frozen=True)
class Location:
    """One of the paper's locations: its variable, its key in the paths file, its default."""

    variable: str
    key: str
    default: str
    what: str


LOCATIONS = (
    Location("REPSIM_IMAGENET", "imagenet", "data/imagenet",
             "ImageNet-1k in class folders: <dir>/train/<wnid>/*.JPEG and <dir>/val/<wnid>/*.JPEG"),
    Location("REPSIM_COCO", "coco", "data/coco",
             "COCO 2017: <dir>/train2017/, <dir>/val2017/, "
             "<dir>/annotations/instances_{train,val}2017.json"),
    Location("REPSIM_CHECKPOINTS", "checkpoints", "checkpoints",
             "the official checkpoints as their authors publish them (docs/models.md)"),
)
_BY_VARIABLE = {loc.variable: loc for loc in LOCATIONS}
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _PathsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    imagenet: str | None = None
    coco: str | None = None
    checkpoints: str | None = None


def config_file() -> Path:
    """The user's paths file (it need not exist)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "repsim" / "paths.toml"


def _read_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        values = _PathsFile.model_validate(raw).model_dump(exclude_none=True)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"paths file {path}: malformed TOML: {exc}. Fix it or delete "
                          "it.") from None
    except ValidationError as exc:
        bad = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise RecipeError(
            f"paths file {path}: invalid entries ({bad}). It may hold only the strings "
            f"{', '.join(loc.key for loc in LOCATIONS)}, e.g. imagenet = "
            "\"/data/imagenet\".") from None
    # relative entries are relative to the file, not to wherever repsim happens to run (an
    # absolute one stays as it is: joining it to a folder gives itself)
    return {k: str(path.parent / Path(v).expanduser()) for k, v in values.items()}


@dataclass(frozen=True)
class Resolved:
    """A location's value and where it came from (for messages)."""

    location: Location
    value: str
    source: str

    def how_to_set(self) -> str:
        loc = self.location
        return (f"{loc.variable} = '{self.value}' ({self.source}); point it elsewhere with "
                f"`export {loc.variable}=/path` or `{loc.key} = \"/path\"` in {config_file()}")


def resolve(variable: str) -> Resolved:
    """The value of one of :data:`LOCATIONS` (environment, then the paths file, then default)."""
    loc = _BY_VARIABLE[variable]
    if os.environ.get(variable):
        return Resolved(loc, os.path.expanduser(os.environ[variable]),
                        "from the environment")
    cfg = config_file()
    configured = _read_config(cfg).get(loc.key)
    if configured is not None:
        return Resolved(loc, configured, f"from {cfg}")
    return Resolved(loc, loc.default, "the default, relative to the current directory")


def resolved_all() -> list[Resolved]:
    return [resolve(loc.variable) for loc in LOCATIONS]


def substitute(raw: Any, path: Path, where: str = "") -> Any:
    """``raw`` (a recipe's parsed TOML) with every ``${NAME}`` in its strings replaced.

    Raises a RecipeError naming the file, the field and the variable for an unset name or a
    malformed reference."""
    if isinstance(raw, dict):
        return {k: substitute(v, path, f"{where}.{k}" if where else str(k)) for k, v in raw.items()}
    if isinstance(raw, list):
        return [substitute(v, path, f"{where}[{i}]") for i, v in enumerate(raw)]
    if not isinstance(raw, str) or "$" not in raw:
        return raw

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in _BY_VARIABLE:
            return resolve(name).value
        if name in os.environ:
            return os.environ[name]
        raise RecipeError(
            f"{path}: {where} uses ${{{name}}}, which is not set. Set it before running repsim "
            f"(`export {name}=...`); the paper's locations "
            f"({', '.join(loc.variable for loc in LOCATIONS)}) also have defaults and may be set "
            f"in {config_file()}.")

    out = _REFERENCE.sub(value, raw)
    if "${" in _REFERENCE.sub("", raw):
        raise RecipeError(f"{path}: {where} = '{raw}' holds a malformed reference; write "
                          "${NAME} with NAME made of letters, digits and '_', e.g. "
                          "${REPSIM_IMAGENET}.")
    return out


def hint(file: str | Path) -> str | None:
    """How to point a missing ``file`` elsewhere, if it lies under one of the locations."""
    text = str(file)
    for r in resolved_all():
        base = r.value.rstrip("/")
        if text == base or text.startswith(base + "/"):
            return r.how_to_set()
    return None
