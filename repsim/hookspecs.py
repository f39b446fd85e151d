"""The hooks a repsim plugin implements.

Each ``register_*`` hook receives a ``register`` callable; call it once per part::

    from repsim import hookimpl

    @hookimpl
    def register_metrics(register):
        register("my_metric", build_my_metric, params=MyParams, summary="...", kind="similarity")

``build`` receives the validated ``params`` model. Import heavy libraries (torch, timm) inside
``build``, never at module level: ``repsim --help`` and ``repsim list`` load every plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pluggy
from pydantic import BaseModel

hookspec = pluggy.HookspecMarker("repsim")
hookimpl = pluggy.HookimplMarker("repsim")


class Register(Protocol):
    """The callable passed to every ``register_*`` hook."""

    def __call__(
        self,
        name: str,
        build: Callable[[Any], Any],
        *,
        params: type[BaseModel] | None = None,
        summary: str = "",
        **info: Any,
    ) -> None: ...


@hookspec
def register_models(register: Register) -> None:
    """Register model builders; ``build(params)`` returns a :class:`repsim.models.LoadedModel`."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets; ``build(params)`` returns a :class:`repsim.data.ImageDataset`."""


@hookspec
def register_layer_selectors(register: Register) -> None:
    """Register layer selectors; ``build(params)`` returns a :class:`repsim.layers.LayerSelector`."""


@hookspec
def register_metrics(register: Register) -> None:
    """Register similarity metrics; ``build(params)`` returns a :class:`repsim.metrics.Metric`."""


@hookspec
def register_evaluators(register: Register) -> None:
    """Register evaluators; ``build(params)`` returns a :class:`repsim.evaluators.Evaluator`."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``repsim`` command group."""
