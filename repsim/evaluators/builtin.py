"""Built-in evaluators, registered through the same hook as a plugin's."""

from __future__ import annotations

from repsim.hookspecs import Register, hookimpl


@hookimpl
def register_evaluators(register: Register) -> None:
    """Filled in by the evaluator modules as they land."""
