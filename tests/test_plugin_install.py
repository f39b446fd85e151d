"""The in-tree example plugin, installed as a user would: listed, usable from a recipe, and its
install leaves the local core in place (the name `repsim` on the package index is another
project; plugins depend on `repsim-core`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import repsim

PLUGIN = Path(__file__).parents[1] / "plugins" / "repsim-plugin-example"


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    out = pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
              "--target", str(target), str(PLUGIN))
    assert out.returncode == 0, out.stderr
    return target


def repsim_cli(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "repsim.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_installed_plugin_is_listed_with_its_provider(installed: Path) -> None:
    out = repsim_cli(installed, "list", "metrics")
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("minibatch_dcor"))
    assert "repsim-plugin-example" in line
    plugins = repsim_cli(installed, "plugins").stdout
    assert "repsim-plugin-example" in plugins and "FAILED" not in plugins


def test_installed_plugin_metric_runs_from_a_recipe(installed: Path, write_recipe,
                                                    tmp_path: Path) -> None:
    path = write_recipe(metrics='name = "minibatch_dcor"')
    out = repsim_cli(installed, "run", str(path), "--quiet")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "run/similarity/minibatch_dcor/a__a.json").read_text())
    assert data["metric"] == "minibatch_dcor"
    assert [data["values"][i][i] for i in range(3)] == pytest.approx([1.0] * 3, abs=1e-9)


def test_plugin_install_resolves_the_core_locally(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    out = pip("install", "--dry-run", "--no-build-isolation", "--report", str(report),
              str(PLUGIN))
    assert out.returncode == 0, out.stderr
    to_install = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert to_install == ["repsim-plugin-example"], to_install
    assert Path(repsim.__file__).parent == Path(__file__).parents[1] / "repsim"
