"""Supervised end-to-end fine-tuning of a zoo backbone, the seeds' recipe (Table 5) scaled down.

AdamW, warm-up then cosine, label smoothing, layer-wise learning-rate decay, drop path. The
parameters are saved after every epoch (epoch 0 = the pretrained start) and the step-level path
length of every tensor is recorded, for the path-efficiency analysis (seeds 003, Fig. 14):
efficiency = ‖θ_T − θ_0‖ / Σ_t ‖θ_{t+1} − θ_t‖ (1 = a straight path).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repsim_minizoo.config import Arch, FinetuneSchedule, to_jsonable
from repsim_minizoo.data import Batches, ViewSpec, digits, normalize, random_view
from repsim_minizoo.train import deterministic, lr_at, param_groups, summarise_losses, threads
from repsim_minizoo.vit import build_vit

# RandAugment scaled down to what suits digits: crops, rotations, intensity jitter.
FT_VIEW = ViewSpec(16, scale=(0.5, 1.0), rotate=15.0, jitter=0.3)


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def param_group_of(name: str) -> list[str]:
    """Groups with a reported path efficiency: all, embed, attn, mlp, norm, head, blocks.i.attn."""
    groups = ["all"]
    m = re.match(r"blocks\.(\d+)\.(\w+)", name)
    if m:
        kind = "norm" if m.group(2).startswith("norm") else m.group(2)
        groups += [kind] + ([f"blocks.{m.group(1)}.attn"] if kind == "attn" else [])
    elif name.startswith(("cls_token", "pos_embed", "patch_embed")):
        groups.append("embed")
    elif name.startswith(("norm", "fc_norm")):
        groups.append("norm")
    else:
        groups.append("head")
    return groups


class PathMeter:
    """Accumulates ‖Δθ‖ per tensor and per group after every optimiser step."""

    def __init__(self, module: nn.Module) -> None:
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self.prev = [p.detach().clone() for p in self.params]
        groups = sorted({g for n in self.names for g in param_group_of(n)})
        self.groups = groups
        # membership[g, i] = 1 if tensor i belongs to group g: a group's step norm is
        # sqrt(Σ_i∈g ‖Δθ_i‖²), one matrix-vector product per step.
        self.membership = torch.tensor([[float(g in param_group_of(n)) for n in self.names]
                                        for g in groups], dtype=torch.float64)
        self.tensor_path = torch.zeros(len(self.params), dtype=torch.float64)
        self.group_path = torch.zeros(len(groups), dtype=torch.float64)

    @torch.no_grad()
    def step(self) -> None:
        sq = torch.stack([(p - q).double().pow(2).sum() for p, q in zip(self.params, self.prev)])
        self.tensor_path += sq.sqrt()
        self.group_path += (self.membership @ sq).sqrt()
        for p, q in zip(self.params, self.prev):
            q.copy_(p)

    @torch.no_grad()
    def summary(self) -> dict[str, Any]:
        sq = torch.stack([(p - s).double().pow(2).sum() for p, s in zip(self.params, self.start)])
        disp_t, disp_g = sq.sqrt(), (self.membership @ sq).sqrt()

        def entry(disp: float, path: float) -> dict[str, float]:
            return {"displacement": disp, "path_length": path,
                    "efficiency": disp / path if path > 0 else float("nan")}

        return {
            "definition": "efficiency = ||theta_T - theta_0|| / sum_t ||theta_{t+1} - theta_t||, "
                          "t over optimiser steps",
            "groups": {g: entry(d, p) for g, d, p in
                       zip(self.groups, disp_g.tolist(), self.group_path.tolist())},
            "tensors": {n: entry(d, p) for n, d, p in
                        zip(self.names, disp_t.tolist(), self.tensor_path.tolist())},
        }


def finetune(backbone: dict[str, torch.Tensor], arch: Arch, sched: FinetuneSchedule, seed: int,
             save_epoch: Callable[[int, dict[str, torch.Tensor]], None],
             progress: bool = True, desc: str = "minizoo ft"
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fine-tune a pretrained backbone state (a new 10-class head) on the digits train split.

    ``save_epoch(epoch, state)`` is called for epoch 0 (the start) and after every epoch.
    Returns the final state dict and a record (losses, train accuracy, path lengths, timing)."""
    from tqdm.auto import tqdm

    start, cpu_start = time.perf_counter(), time.process_time()
    with deterministic():
        images, labels = digits("train", arch.img_size)
        vit = build_vit(arch, seed, drop_path=sched.drop_path)
        missing, unexpected = vit.load_state_dict(backbone, strict=False)
        if unexpected or set(missing) - {"head.weight", "head.bias"}:
            raise RuntimeError(f"backbone does not fit the zoo ViT: missing {missing}, "
                               f"unexpected {unexpected}")
        torch.manual_seed(seed + 3)
        nn.init.trunc_normal_(vit.head.weight, std=2e-5)  # MAE's head initialisation
        nn.init.zeros_(vit.head.bias)
        vit.train()
        scale = {n: sched.layer_decay ** (arch.depth + 1 - layer_id(n, arch.depth))
                 for n, _ in vit.named_parameters()}
        opt = torch.optim.AdamW(param_groups(vit, sched.weight_decay, scale), lr=sched.lr,
                                betas=sched.betas)
        g = torch.Generator().manual_seed(seed + 4)
        batches = Batches(len(labels), sched.batch_size, g)
        per_epoch = math.ceil(len(labels) / batches.batch_size)
        total, warmup = sched.epochs * per_epoch, sched.warmup_epochs * per_epoch
        meter = PathMeter(vit)
        save_epoch(0, vit.state_dict())
        losses: list[float] = []
        correct = seen = 0
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, mininterval=0.5)
        for epoch in range(1, sched.epochs + 1):
            correct = seen = 0
            for _ in range(per_epoch):
                step = len(losses)
                lr = lr_at(step, total, warmup, sched.lr, sched.min_lr)
                for group in opt.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                idx = batches.next()
                logits = vit(normalize(random_view(images[idx], FT_VIEW, g)))
                loss = F.cross_entropy(logits, labels[idx], label_smoothing=sched.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                meter.step()
                losses.append(float(loss.detach()))
                correct += int((logits.argmax(1) == labels[idx]).sum())
                seen += len(idx)
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", refresh=False)
            save_epoch(epoch, vit.state_dict())
        bar.close()
    record = {"seed": seed, "epochs": sched.epochs, "steps": len(losses),
              "train_seconds": round(time.perf_counter() - start, 2),
              "cpu_seconds": round(time.process_time() - cpu_start, 2), "threads": threads(),
              "schedule": to_jsonable(sched), "train_accuracy_last_epoch": correct / max(seen, 1),
              "path": meter.summary(), **summarise_losses(losses)}
    return vit.state_dict(), record
