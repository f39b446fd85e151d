"""Shared fixtures: tiny recipes, registered test plugins, a click runner."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from repsim.plugins import get_host

TINY_VIT = (
    '{ arch = "vit_tiny_patch16_224", seed = SEED, kwargs = { img_size = 16, patch_size = 4, '
    "depth = 3, embed_dim = 32, num_heads = 2, num_classes = 4 }, "
    "preprocess = { mean = [0.5, 0.5, 0.5], std = [0.5, 0.5, 0.5] } }"
)


def tiny_vit(seed: int) -> str:
    return TINY_VIT.replace("SEED", str(seed))


def recipe_text(out: Path, extra: str = "", metrics: str = 'name = "minibatch_cka"',
                run: str = "", data: str = "", layers: str = "blocks = \"blocks.*\"") -> str:
    return textwrap.dedent(f"""\
        [run]
        name = "tiny"
        seed = 0
        batch_size = 8
        examples = 40
        output = "{out}"
        {run}

        [data]
        dataset = "synthetic"
        split = "val"
        params = {{ examples = 160, classes = 4, size = 16 }}
        {data}

        [models.a]
        model = "timm"
        params = {tiny_vit(0)}

        [models.b]
        model = "timm"
        params = {tiny_vit(1)}

        [layers]
        {layers}

        [[metrics]]
        {metrics}
        """) + extra


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny recipe (two 3-block ViTs on generated images) and return its path."""

    def write(text: str | None = None, name: str = "recipe.toml", **kwargs: str) -> Path:
        path = tmp_path / name
        path.write_text(text if text is not None else recipe_text(tmp_path / "run", **kwargs))
        return path

    return write


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run where torch sees a CUDA device and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def register_plugin() -> Iterator[Callable[[object, str], None]]:
    """Register plugin objects for one test; they are removed afterwards."""
    host = get_host()
    names: list[str] = []

    def register(plugin: object, name: str) -> None:
        host.register_plugin(plugin, name)
        names.append(name)

    yield register
    for name in names:
        host.unregister_plugin(name)
