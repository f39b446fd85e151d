"""Every parameter of the core's evaluators, metrics and datasets says what it does."""

from __future__ import annotations

import pytest

from repsim.cli import cli
from repsim.plugins import get_host

KINDS = ("evaluator", "metric", "dataset")


def _core_parts(kind: str) -> list:
    reg = get_host().registry(kind)
    # Only the core's own parts: plugins document theirs in their own packages.
    return [reg.get(n) for n in reg.names("*") if reg.get(n).provider.startswith("repsim.")]


@pytest.mark.parametrize("kind", KINDS)
def test_every_core_parameter_has_a_description(kind: str) -> None:
    parts = _core_parts(kind)
    assert parts, f"no core {kind}s found"
    missing = [f"{p.name}.{field}" for p in parts
               for field, info in p.params.model_fields.items() if not info.description]
    assert not missing, f"{kind} parameters without a description: {missing}"


def test_list_evaluator_shows_parameter_descriptions(runner) -> None:
    result = runner.invoke(cli, ["list", "evaluators", "knn"])
    assert result.exit_code == 0, result.output
    for needle in ("neighbours that vote", "T of the vote weight", "bound on one block"):
        assert needle in result.output, (needle, result.output)
    result = runner.invoke(cli, ["list", "datasets", "digits"])
    assert "fraction of the images in" in result.output, result.output
