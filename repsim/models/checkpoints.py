"""Reading weights safely: safetensors, or ``torch.load(weights_only=True)``; never plain unpickling."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn


def read_state_dict(path: Path) -> dict[str, Any]:
    """Load a checkpoint file into a dict of tensors (or nested dicts), without running code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist. Check the path in the recipe.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
            raise CheckpointError(
                f"checkpoint '{path}' is not a readable safetensors file ({exc}). It may be "
                "truncated: download or convert it again."
            ) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint '{path}' could not be read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). repsim loads pickles with "
            "weights_only=True only; the file may be truncated, or hold objects other than "
            "tensors: convert it with `repsim convert`."
        ) from None


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
