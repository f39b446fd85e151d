"""Registries and the plugin host: duplicates, unknown names, broken plugins, parameters."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
from pydantic import BaseModel, ConfigDict

from repsim import hookimpl
from repsim.errors import DuplicatePartError, RecipeError, UnknownPartError
from repsim.plugins import PluginHost, get_host, registry


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = 3


def _plugin(**hooks: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(**hooks)


def test_builtin_parts_are_registered() -> None:
    assert {"minibatch_cka", "linear_cka"} <= set(registry("metric").names())
    assert {"digits", "imagefolder", "synthetic"} <= set(registry("dataset").names())
    assert {"glob", "index", "blocks", "norm1", "attn_qkv", "mlp_fc1"} <= set(
        registry("layer_selector").names())
    assert {"timm", "callable"} <= set(registry("model").names())


def test_wildcard_listing() -> None:
    assert registry("metric").names("*_cka")[:2] == ["linear_cka", "minibatch_cka"]


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownPartError, match="Did you mean 'minibatch_cka'"):
        registry("metric").get("minibatch_ckaa")


def test_duplicate_name_names_both_providers(register_plugin) -> None:
    @hookimpl
    def register_metrics(register):
        register("minibatch_cka", lambda p: None)

    register_plugin(_plugin(register_metrics=register_metrics), "dup-plugin")
    with pytest.raises(DuplicatePartError) as info:
        get_host().registries  # noqa: B018
    assert "repsim.metrics.builtin" in str(info.value) and "dup-plugin" in str(info.value)


def test_plugin_part_is_registered_with_its_provider(register_plugin) -> None:
    @hookimpl
    def register_metrics(register):
        register("test_metric", lambda p: p.k, params=_Params, summary="a test")

    register_plugin(_plugin(register_metrics=register_metrics), "test-plugin")
    part = registry("metric").get("test_metric")
    assert part.provider == "test-plugin"
    assert part.create({"k": 5}) == 5


def test_failing_hook_is_reported_and_skipped(register_plugin) -> None:
    @hookimpl
    def register_metrics(register):
        raise RuntimeError("boom")

    register_plugin(_plugin(register_metrics=register_metrics), "broken-hook")
    assert "minibatch_cka" in registry("metric")  # the tool keeps working
    broken = {p.name: p.error for p in get_host().broken_plugins()}
    assert "boom" in broken["broken-hook"]


def test_entry_point_that_fails_to_import_is_skipped(monkeypatch) -> None:
    class FakeDist:
        name, version = "repsim-plugin-broken", "9.9"

    class FakeEntryPoint:
        name, value, dist = "broken", "does_not_exist_mod", FakeDist()

        def load(self):
            raise ImportError("No module named 'does_not_exist_mod'")

    import repsim.plugins as plugins_mod

    monkeypatch.setattr(plugins_mod.md, "entry_points", lambda group: [FakeEntryPoint()])
    host = PluginHost()
    info = host.plugins["broken"]
    assert info.name == "repsim-plugin-broken" and info.version == "9.9"
    assert "does_not_exist_mod" in info.error
    assert "minibatch_cka" in host.registry("metric")


def test_parameters_are_validated_with_field_names() -> None:
    part = registry("dataset").get("synthetic")
    with pytest.raises(RecipeError, match="examples") as info:
        part.validate({"examples": "many"})
    assert "synthetic" in str(info.value)
    with pytest.raises(RecipeError, match="colour"):
        part.validate({"colour": 3})


def test_help_and_list_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from repsim.cli import cli\n"
        "r = CliRunner()\n"
        "for args in (['--help'], ['list'], ['plugins'], ['validate', '--help']):\n"
        "    res = r.invoke(cli, args)\n"
        "    assert res.exit_code == 0, res.output\n"
        "heavy = [m for m in ('torch', 'timm', 'sklearn', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
