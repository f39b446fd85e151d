"""The weight cache: safetensors files under ``$REPSIM_CACHE/minizoo``, written atomically.

An entry is ``<name>-<key>.safetensors`` (the weights; its presence means the entry is complete)
plus a ``.json`` sidecar (config, final losses, timings). Every file is written to a temporary
file in the same directory and moved into place with ``os.replace``, so an interrupted training or
write leaves either the old state or nothing under the final name, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def cache_root() -> Path:
    """``$REPSIM_CACHE`` (default ``$XDG_CACHE_HOME/repsim`` or ``~/.cache/repsim``)/minizoo."""
    base = os.environ.get("REPSIM_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = str(Path(xdg) / "repsim") if xdg else str(Path.home() / ".cache" / "repsim")
    return Path(base).expanduser() / "minizoo"


def entry_path(name: str, key: str) -> Path:
    """Weights file of one cache entry."""
    return cache_root() / f"{name}-{key}.safetensors"


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # on success it was already moved; on failure: no debris


def save_weights(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write a state dict (contiguous CPU copies) with JSON metadata inside the file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp),
                                             metadata={"minizoo": json.dumps(meta)}))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True)))


def load_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The entry's tensors, or None if it is missing or unreadable (then it is retrained)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return dict(load_file(str(path)))
    except Exception:  # noqa: BLE001 - any parse failure means a damaged file: treat as a miss
        return None


def is_complete(path: Path) -> bool:
    """Whether an entry's weights file is there and readable (its header), without loading it."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return bool(list(fh.keys()))
    except Exception:  # noqa: BLE001 - as load_weights: a damaged file is a miss
        return False


def read_meta(path: Path) -> dict[str, Any]:
    """The sidecar if present, else the metadata stored inside the weights file."""
    side = sidecar_path(path)
    if side.is_file():
        return json.loads(side.read_text())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("minizoo", "{}"))
