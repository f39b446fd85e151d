"""Snapshots and step-level path lengths of a fine-tuning run (seeds 003, Sec. 2.3, Fig. 14).

Snapshots are state dicts in safetensors (``snapshots/epoch_003.safetensors`` or
``step_0001200``), the files the ``path_efficiency`` evaluator reads. The path length over every
optimiser step, Σ_t ‖θ_t − θ_{t−1}‖, cannot be recovered from snapshots (they hold every epoch,
not every step), so :class:`PathMeter` accumulates it during training, in float64, for every
parameter tensor and for the evaluator's groups (all, each layer type, each block, each block ×
type, from :func:`repsim.evaluators.path.parameter_groups`); ``path_length.safetensors`` holds
it with the displacement ‖θ_T − θ_0‖ of each.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repsim.evaluators.path import (DEFAULT_BLOCK, DEFAULT_EXCLUDE, DEFAULT_LAYER_TYPES,
                                    parameter_groups)
from repsim.store import write_tensors

DEFINITION = ("efficiency = ||theta_T - theta_0|| / sum_t ||theta_t - theta_(t-1)||, t over "
              "optimiser steps, L2 over all entries of a tensor or group")


def snapshot_name(unit: str, index: int) -> str:
    """``epoch_003.safetensors`` or ``step_0001200.safetensors``: natural order is run order."""
    return f"epoch_{index:03d}.safetensors" if unit == "epoch" else \
        f"step_{index:07d}.safetensors"


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict (parameters and buffers), as the snapshots store it."""
    return {k: v.detach() for k, v in module.state_dict().items()}


def write_snapshot(path: Path, module: nn.Module, **where: int) -> None:
    """One snapshot, atomically; ``where`` (epoch, step) goes into its metadata."""
    write_tensors(path, state_of(module), metadata={"repsim": json.dumps(where)})


class PathMeter:
    """Σ_t ‖θ_t − θ_{t−1}‖ over optimiser steps, per trainable tensor and per group, in float64.

    Holds one copy of the trainable parameters (θ_{t−1}). Groups are those of the
    ``path_efficiency`` evaluator with its default exclusions (the new head, BatchNorm
    buffers), so its keys (``"attention"``, ``"blocks.3"``, ``"blocks.3/attention"``) mean the
    same here. On the device, without a synchronisation per step (on MPS, which has no float64,
    the sums are kept on the host).
    """

    def __init__(self, module: nn.Module) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        device = self.params[0].device
        self._acc = torch.device("cpu") if device.type == "mps" else device
        grouped = [i for i, n in enumerate(self.names)
                   if not any(fnmatch.fnmatchcase(n, pat) for pat in DEFAULT_EXCLUDE)]
        groups, _, _ = parameter_groups([self.names[i] for i in grouped])
        self.groups = list(groups)
        # membership[g, i] = 1 if tensor i is in group g: the groups' squared step norms are one
        # matrix-vector product of the tensors' per step.
        self.membership = torch.zeros(len(groups), len(self.names), dtype=torch.float64,
                                      device=self._acc)
        for g, members in enumerate(groups.values()):
            self.membership[g, [grouped[i] for i in members]] = 1.0
        self.tensor_path = torch.zeros(len(self.names), dtype=torch.float64, device=self._acc)
        self.group_path = torch.zeros(len(groups), dtype=torch.float64, device=self._acc)
        self.steps = 0
        self.prev: list[torch.Tensor] = []
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """θ_{t−1} := the parameters now (at the start, and after a checkpoint restored them)."""
        self.prev = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        """Add the step from θ_{t−1} to the parameters now."""
        dtype = torch.float32 if self.params[0].device.type == "mps" else torch.float64
        sq = torch.stack([(p - q).to(dtype).square().sum() for p, q in zip(self.params, self.prev)])
        sq = sq.to(self._acc, torch.float64)
        self.tensor_path += sq.sqrt()
        self.group_path += (self.membership @ sq).sqrt()
        for p, q in zip(self.params, self.prev):
            q.copy_(p)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "groups": self.groups, "steps": self.steps,
                "tensor_path": self.tensor_path.cpu(), "group_path": self.group_path.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sums; the parameters must already be the checkpoint's (``train`` restores
        them first), since θ_{t−1} is taken from them."""
        if state["names"] != self.names or state["groups"] != self.groups:
            raise ValueError("the checkpoint's path lengths are of other parameters")
        self.tensor_path.copy_(state["tensor_path"])
        self.group_path.copy_(state["group_path"])
        self.steps = int(state["steps"])
        self.sync()

    @torch.no_grad()
    def write(self, path: Path, start: Path) -> PathLengths:
        """Write ``path_length.safetensors``: path lengths so far and displacements from the
        snapshot ``start`` (θ_0), per tensor and group. Returns what it wrote."""
        from safetensors import safe_open

        with safe_open(str(start), framework="pt", device="cpu") as f:
            sq = torch.stack([(p.detach().cpu().double() - f.get_tensor(n).double()).square().sum()
                              for n, p in zip(self.names, self.params)])
        disp_t, disp_g = sq.sqrt(), (self.membership.cpu() @ sq).sqrt()
        lengths = PathLengths(
            {n: (float(d), float(s)) for n, d, s in zip(self.names, disp_t, self.tensor_path)},
            {g: (float(d), float(s)) for g, d, s in zip(self.groups, disp_g, self.group_path)},
            self.steps)
        tensors = {}
        for prefix, names, disp, length in (("", self.names, disp_t, self.tensor_path),
                                             ("group_", self.groups, disp_g, self.group_path)):
            for i, name in enumerate(names):
                tensors[f"{prefix}displacement/{name}"] = disp[i].cpu()
                tensors[f"{prefix}path_length/{name}"] = length[i].cpu()
        meta = {"steps": self.steps, "definition": DEFINITION, "exclude": list(DEFAULT_EXCLUDE),
                "layer_types": DEFAULT_LAYER_TYPES, "block_pattern": DEFAULT_BLOCK}
        write_tensors(path, tensors, metadata={"repsim": json.dumps(meta)})
        return lengths


@dataclass
class PathLengths:
    """(displacement, path length) per tensor and per group, over ``steps`` optimiser steps."""

    tensors: dict[str, tuple[float, float]]
    groups: dict[str, tuple[float, float]]
    steps: int

    def efficiency(self) -> dict[str, float]:
        """Step-level path efficiency of every group (NaN for a group that never moved)."""
        return {g: d / s if s > 0 else math.nan for g, (d, s) in self.groups.items()}


def read_path_lengths(path: str | Path) -> PathLengths:
    """Read a ``path_length.safetensors`` file written by :meth:`PathMeter.write`."""
    from safetensors import safe_open

    tensors: dict[str, list[float]] = {}
    groups: dict[str, list[float]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["repsim"])
        for key in f.keys():  # displacement/NAME, path_length/NAME, group_... for groups
            kind, name = key.split("/", 1)
            pair = (groups if kind.startswith("group_") else tensors).setdefault(name, [0.0, 0.0])
            pair[kind.endswith("path_length")] = float(f.get_tensor(key))
    return PathLengths({n: (d, s) for n, (d, s) in tensors.items()},
                       {n: (d, s) for n, (d, s) in groups.items()}, int(meta["steps"]))
