"""Every test gets its own empty ``REPSIM_CACHE`` (training checkpoints go there) and one thread:
the tiny detectors gain nothing from more, and a shared machine makes oversubscribed threads
crawl. Helpers build tiny ViTs, detector settings and COCO folders on disk."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from repsim.plugins import build_part, registry

TINY_VIT = {"arch": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 64, "depth": 4, "embed_dim": 48, "num_heads": 2,
                       "num_classes": 0}}
# A detector small enough to train in seconds on one thread, at 64 px.
TINY_DETECTOR = {"image_size": 64, "channels": 32, "box_fc": 64, "mask_convs": 1,
                 "batch_size": 4, "micro_batch_size": 4, "progress": False, "eval_images": 8,
                 "proposals_train": (100, 50), "proposals_test": (100, 50), "roi_batch_size": 32}


def pytest_configure(config: pytest.Config) -> None:
    # pycocotools 2.0 decodes masks with numpy's pre-2.0 copy protocol: harmless, and noisy.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:pycocotools.*")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run where torch sees a CUDA device and are skipped elsewhere (the
    core's tests/conftest.py does the same for its own tests only)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    cache = tmp_path / "cache"
    monkeypatch.setenv("REPSIM_CACHE", str(cache))
    monkeypatch.setenv("REPSIM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield cache
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_vit() -> Callable[..., torch.nn.Module]:
    """A random 4-block, 48-wide timm ViT with 16-px patches (``kwargs`` override its own)."""

    def make(**kwargs: Any) -> torch.nn.Module:
        spec = TINY_VIT | {"kwargs": TINY_VIT["kwargs"] | kwargs}
        return build_part("model", "timm", **spec).module

    return make


@pytest.fixture
def vitdet_params() -> Callable[..., Any]:
    """Validated ``vitdet`` parameters: the smoke preset shrunk to :data:`TINY_DETECTOR`."""

    def make(**overrides: Any) -> Any:
        return registry("evaluator").get("vitdet").validate(
            {"preset": "smoke"} | TINY_DETECTOR | overrides)

    return make


@pytest.fixture
def write_coco() -> Callable[..., Path]:
    """``write(root, split, n, size, edit)``: see :func:`_write_coco`."""
    return _write_coco


def _write_coco(root: Path, split: str, n: int = 4, size: int = 64, edit: Any = None) -> Path:
    """``root/<split>/*.png`` and ``root/<split>.json``: ``n`` coco_shapes images as files.
    ``edit(data)`` may change the annotation dict before it is written."""
    from torchvision.utils import save_image

    shapes = build_part("dataset", "coco_shapes", split=split, train_images=n, val_images=n,
                        size=size)
    (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(len(shapes)):
        info = shapes.coco.imgs[shapes.image_ids[i]]
        save_image(shapes.image(i), root / split / info["file_name"])
    data = json.loads(json.dumps(shapes.coco.dataset))
    if edit is not None:
        edit(data)
    (root / f"{split}.json").write_text(json.dumps(data))
    return root
