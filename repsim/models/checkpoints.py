"""Reading weights safely: safetensors, or ``torch.load(weights_only=True)``; never plain unpickling.

Training checkpoints often pickle a few harmless objects next to the weights (DINO and MAE store
their ``argparse.Namespace``). Those are read through an explicit allow-list of classes
(:data:`SAFE_GLOBALS`); anything else is refused with a message, never executed.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

# Classes a checkpoint may contain besides tensors and plain containers. Constructing them runs no
# code of the file's choosing (a Namespace only receives attributes).
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


@dataclass
class Checkpoint:
    """What a checkpoint file holds: its top-level object and (safetensors only) its metadata."""

    path: Path
    data: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


def read_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint file without running code from it.

    ``.safetensors`` files are read as they are; pickles with ``torch.load(weights_only=True)``
    plus the :data:`SAFE_GLOBALS` allow-list, memory-mapped when the file is in torch's zip format
    (a 1 GB training checkpoint then costs no extra RAM for the parts that are dropped).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist. Check the path in the recipe.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            data = torch.load(str(path), map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - every failure here is a bad or unsafe file
        raise CheckpointError(_load_failure(path, exc)) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(data).__name__}, not a dict of weights. Save the "
            "network's state_dict() (or convert the file with `repsim convert`)."
        )
    return Checkpoint(path, data)


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
        raise CheckpointError(
            f"checkpoint '{path}' is not a readable safetensors file ({exc}). It may be "
            "truncated: download or convert it again."
        ) from None
    return Checkpoint(path, data, metadata)


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _load_failure(path: Path, exc: Exception) -> str:
    text = str(exc)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS)
        return (
            f"checkpoint '{path}' holds a pickled Python object repsim will not load "
            f"({unsafe.group(1)}): loading it could run code. repsim reads pickles with "
            f"torch.load(weights_only=True) and allows only tensors, plain containers and "
            f"{allowed}. If you trust the file, save its state_dict alone "
            "(torch.save(ckpt['model'], 'weights.pth')) in a separate Python session and point "
            "the recipe at that."
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if not ln.startswith(_BOILERPLATE)), type(exc).__name__)
    return (
        f"checkpoint '{path}' could not be read ({type(exc).__name__}: {detail}). The file is "
        "probably truncated or corrupt (an interrupted download): compare its size with the "
        "published one and download it again."
    )


def read_state_dict(path: Path) -> dict[str, Any]:
    """Load a checkpoint file into a dict of tensors (or nested dicts), without running code."""
    return read_checkpoint(path).data


def load_into(module: nn.Module, path: Path, strict: bool = True) -> dict[str, Any]:
    """Load a plain state dict into ``module``; report missing and unexpected keys."""
    state = read_state_dict(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint '{path}' does not fit the architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}) and {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
            "Check the architecture name and its kwargs (depth, width, patch size)."
        )
    return {"checkpoint": str(path), "missing_keys": missing, "unexpected_keys": unexpected}


def tensor_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keep only tensor entries (drops optimiser scalars and metadata)."""
    import torch

    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
