"""The plugin manager: built-in parts and installed plugins, registered through the same hooks.

Installed plugins are found through the ``repsim`` entry-point group. Each one is loaded and each of
its hooks is called on its own; a plugin that fails is reported (name, version, error) and skipped,
so one broken plugin never takes the tool down.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from repsim import hookspecs
from repsim.errors import DuplicatePartError
from repsim.registry import KINDS, NoParams, Part, Registry

ENTRY_POINT_GROUP = "repsim"

# Built-in parts are ordinary plugins living inside the core package.
BUILTIN_PLUGINS = (
    "repsim.metrics.builtin",
    "repsim.models.builtin",
    "repsim.models.zoo",
    "repsim.models.selectors",
    "repsim.data.builtin",
    "repsim.layers",
    "repsim.evaluators.builtin",
    "repsim.finetune.plugin",
)

_HOOK_OF_KIND = {
    "model": "register_models",
    "dataset": "register_datasets",
    "layer_selector": "register_layer_selectors",
    "metric": "register_metrics",
    "evaluator": "register_evaluators",
}


@dataclass
class PluginInfo:
    """What ``repsim plugins`` shows for one plugin."""

    name: str
    version: str
    module: str
    builtin: bool
    error: str | None = None
    parts: dict[str, list[str]] = field(default_factory=dict)


class PluginHost:
    """Owns the pluggy manager and the five registries.

    Two plugins registering one name is a clash: :meth:`name_clashes` lists them (what
    ``repsim plugins`` shows), and :attr:`registries` refuses to serve until it is resolved.
    """

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("repsim")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] | None = None
        self._clashes: list[str] = []
        for module_name in BUILTIN_PLUGINS:
            self.pm.register(importlib.import_module(module_name), name=module_name)
            self.plugins[module_name] = PluginInfo(
                module_name, _version("repsim-core"), module_name, builtin=True
            )
        if load_entry_points and not os.environ.get("REPSIM_DISABLE_PLUGINS"):
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "?"
            if self.pm.has_plugin(ep.name) or ep.name in self.plugins:
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - any failure in a plugin is reported, not fatal
                self.plugins[ep.name] = PluginInfo(
                    dist, version, ep.value, builtin=False, error=f"{type(exc).__name__}: {exc}"
                )
                continue
            self.plugins[ep.name] = PluginInfo(dist, version, ep.value, builtin=False)

    def register_plugin(self, plugin: object, name: str) -> None:
        """Register a plugin object at run time (tests, notebooks)."""
        self.pm.register(plugin, name=name)
        self.plugins[name] = PluginInfo(name, "local", repr(plugin), builtin=False)
        self._registries = None

    def unregister_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)
        self._registries = None

    @property
    def registries(self) -> dict[str, Registry]:
        """Every kind's registry; a DuplicatePartError while two plugins share a part name."""
        registries = self._collected()
        if self._clashes:
            raise DuplicatePartError("\n".join(self._clashes))
        return registries

    def _collected(self) -> dict[str, Registry]:
        if self._registries is None:
            self._registries = self._collect()
        return self._registries

    def name_clashes(self) -> list[str]:
        """One message per part name that two plugins register (each naming both)."""
        self._collected()
        return list(self._clashes)

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    def _collect(self) -> dict[str, Registry]:
        registries = {kind: Registry(kind) for kind in KINDS}
        self._clashes = []
        for info in self.plugins.values():
            info.parts = {}
        for kind, hook_name in _HOOK_OF_KIND.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):  # pluggy lists last-registered first
                key = impl.plugin_name
                info = self.plugins.get(key)
                if info is not None and info.error:
                    continue
                provider = info.name if info is not None else key
                added: list[Part] = []
                register = _make_register(kind, provider, added)
                try:
                    impl.function(register=register)
                except Exception as exc:  # noqa: BLE001 - a broken plugin is reported and skipped
                    if info is not None and info.builtin:
                        raise
                    if info is not None:
                        info.error = f"{hook_name} failed: {type(exc).__name__}: {exc}"
                    continue
                for part in added:
                    try:
                        registries[kind].add(part)
                    except DuplicatePartError as exc:  # the first provider keeps the name
                        self._clashes.append(str(exc))
                if info is not None:
                    info.parts.setdefault(kind, []).extend(p.name for p in added)
        return registries

    def broken_plugins(self) -> list[PluginInfo]:
        self._collected()  # collecting may discover failing hooks
        return [p for p in self.plugins.values() if p.error]

    def add_commands(self, cli: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli=cli)
            except Exception as exc:  # noqa: BLE001
                info = self.plugins.get(impl.plugin_name)
                if info is not None:
                    info.error = f"register_commands failed: {type(exc).__name__}: {exc}"


def _make_register(kind: str, provider: str, sink: list[Part]) -> Callable[..., None]:
    def register(
        name: str,
        build: Callable[[Any], Any],
        *,
        params: type | None = None,
        summary: str = "",
        structure: Callable[[Any], Any] | None = None,
        **info: Any,
    ) -> None:
        sink.append(
            Part(
                kind=kind,
                name=name,
                build=build,
                params=params or NoParams,
                summary=summary,
                info=info,
                provider=provider,
                structure=structure,
            )
        )

    return register


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "unknown"


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, created on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def registry(kind: str) -> Registry:
    """The registry of one kind: ``registry("metric").get("linear_cka")``."""
    return get_host().registry(kind)


def build_part(kind: str, name: str, /, **params: Any) -> Any:
    """Validate ``params`` and build the registered part ``name`` of ``kind``.

    The one way parts are built from a name (API, recipes, the zoo): a built object with a
    ``name`` attribute (metrics, evaluators, models) gets the registry name where it has none
    of its own.
    """
    part = registry(kind).get(name)
    built = part.create(params)
    if hasattr(built, "name") and (kind != "model" or not built.name):
        built.name = part.name
    return built
