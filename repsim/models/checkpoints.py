"""Reading weights safely: safetensors, or ``torch.load(weights_only=True)``; never plain unpickling.

Training checkpoints often pickle a few harmless objects next to the weights (DINO and MAE store
their ``argparse.Namespace``). Those are read through an explicit allow-list of classes
(:data:`SAFE_GLOBALS`); anything else is refused with a message, never executed.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("repsim.models")

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
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            # torch warns of a pickle protocol it may not read; a failure says so below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
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
# torch.save's legacy (non-zip) format starts with this number, pickled as a LONG1.
_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# The highest pickle protocol torch.load(weights_only=True) reads: protocol 4 frames the stream
# (the FRAME opcode, 149), which its restricted unpickler rejects as "Unsupported operand 149".
_SAFE_PROTOCOL = 3


def _pickle_header(path: Path) -> bytes:
    """The first bytes of the pickle stream: the file's own, or its ``data.pkl`` in torch's zip
    format."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return z.open(name).read(32) if name else b""
    with open(path, "rb") as f:
        return f.read(32)


def _load_failure(path: Path, exc: Exception) -> str:
    header = _pickle_header(path)
    protocol = header[1] if header[:1] == b"\x80" and len(header) > 1 else None
    is_torch = zipfile.is_zipfile(path) or _TORCH_MAGIC in header
    if protocol is not None and not is_torch:
        return (
            f"checkpoint '{path}' is a plain Python pickle (pickle.dump), not torch.save output. "
            "repsim never unpickles such files (loading one could run code). If you trust it, "
            "load it in a separate Python session and save its tensors with "
            "torch.save(state_dict, 'weights.pth') or safetensors.torch.save_file, then point "
            "the recipe at that file."
        )
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
    if protocol is not None and protocol > _SAFE_PROTOCOL:
        return (
            f"checkpoint '{path}' was saved with pickle protocol {protocol} "
            f"(torch.save(..., pickle_protocol={protocol})), which torch's safe loader "
            f"(torch.load(weights_only=True)) cannot read; the file itself looks intact. If you "
            "trust its source, load it once in a separate Python session with the full "
            "unpickler and save its state dict again with the default protocol (torch.save) or "
            "as safetensors, then point the recipe at the new file; repsim itself never "
            "unpickles it."
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if not ln.startswith(_BOILERPLATE)), type(exc).__name__)
    return (
        f"checkpoint '{path}' could not be read ({type(exc).__name__}: {detail}). The file is "
        "probably truncated or corrupt (an interrupted download): compare its size with the "
        "published one and download it again."
    )


def log_reading(model: str, path: Path) -> None:
    """Say which file a model reads and how large it is (a large one takes a while)."""
    size = path.stat().st_size if path.is_file() else 0
    log.info("%s: reading %s (%.1f MiB)", model, path, size / 2**20)


def read_state_dict(path: Path) -> dict[str, Any]:
    """Load a checkpoint file into a dict of tensors (or nested dicts), without running code."""
    return read_checkpoint(path).data


def load_into(module: nn.Module, path: Path, model: str, strict: bool = True) -> dict[str, Any]:
    """Load a plain state dict into ``module`` (``model`` names it in messages); report missing
    and unexpected keys. Tensors of other shapes are always an error, named with both shapes."""
    log_reading(model, path)
    state = read_state_dict(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and hasattr(state[k], "shape")
                  and state[k].shape != expected[k].shape]  # in network order, as printed
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"checkpoint '{path}' does not fit model '{model}':"]
        for k in mismatched[:3]:
            lines.append(f"  '{k}': {list(state[k].shape)} in the file, "
                         f"{list(expected[k].shape)} in the network")
        if len(mismatched) > 3:
            lines.append(f"  ... {len(mismatched)} tensors of other shapes in all")
        if strict and missing:
            lines.append(f"  {len(missing)} network tensors are not in the file (e.g. "
                         f"{missing[:3]})")
        if strict and unexpected:
            lines.append(f"  {len(unexpected)} file tensors have no place in the network (e.g. "
                         f"{unexpected[:3]})")
        cause = misfit_cause(module, state, mismatched)
        lines.append(f"{cause + ' ' if cause else ''}Check the architecture name and its kwargs "
                     "(img_size, patch_size, embed_dim, depth, num_heads, num_classes).")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=False)
    log.info("%s: loaded %d tensors", model, len(state))
    return {"checkpoint": str(path), "missing_keys": missing, "unexpected_keys": unexpected}


def misfit_cause(module: nn.Module, state: dict[str, Any], mismatched: list[str]) -> str:
    """The likely cause of tensors of other shapes, in the terms of timm's ViT arguments."""
    if "pos_embed" in mismatched and "patch_embed.proj.weight" not in mismatched:
        embed = getattr(module, "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        prefix = int(getattr(module, "num_prefix_tokens", 0))
        grid = math.isqrt(max(state["pos_embed"].shape[1] - prefix, 0))
        if patch and grid * grid == state["pos_embed"].shape[1] - prefix:
            size = grid * patch[0]
            return (f"The file's position embedding has {grid}x{grid} patch positions: it was "
                    f"trained on {size} px inputs, the network is built for "
                    f"{tuple(embed.img_size)[0]} px; build it with img_size = {size}.")
        return "The file's position embedding has another number of tokens: img_size, " \
               "patch_size or the prefix tokens (class_token, reg_tokens) differ."
    if "patch_embed.proj.weight" in mismatched:
        shape = list(state["patch_embed.proj.weight"].shape)
        return (f"The file's patch embedding is {shape} (embed_dim {shape[0]}, patch_size "
                f"{shape[-1]}): set embed_dim and patch_size to match.")
    for key, axis in (("cls_token", -1), ("norm.weight", 0)):
        if key in mismatched:
            return (f"The file's width (embed_dim) is {state[key].shape[axis]}, the network's "
                    f"{module.state_dict()[key].shape[axis]}.")
    if mismatched and all(k.startswith("head.") for k in mismatched):
        return (f"The file's classifier has {state[mismatched[0]].shape[0]} classes: set "
                "num_classes to that (or 0 to drop the classifier).")
    return ""


def tensor_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keep only tensor entries (drops optimiser scalars and metadata)."""
    import torch

    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
