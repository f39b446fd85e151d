"""``KEY=VALUE`` command-line options (``repsim layers -p``, ``repsim convert -p``)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from typing import Any

from repsim.errors import RecipeError


def parse_key_values(items: Sequence[str], option: str = "--param") -> dict[str, Any]:
    """Read ``KEY=VALUE`` items into a dict.

    A VALUE is read as a TOML value (``2``, ``0.5``, ``true``, ``'text'``, ``[1, 2]``,
    ``{depth = 2}``), else as JSON (``{"depth": 2}``, ``null``), else kept as the bare string.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"{option} '{item}' must look like KEY=VALUE, e.g. branch=student")
        out[key] = _value(value)
    return out


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
