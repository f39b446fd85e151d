"""Training and inference of the detector: ViTDet's augmentation, optimizer and schedule around
the core's training loop (:func:`repsim.training.train`).

Iterations are counted in steps; the loop's "epochs" are chunks of ``checkpoint_every`` steps, so
a run checkpoints every chunk and resumes at the last one. Every augmentation draw (image order,
jitter scale, crop position, flip) comes from the loop's checkpointed generator in the main
process, so data-loading workers are deterministic and a resumed run sees the same images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from repsim.errors import RecipeError
from repsim.training import History, train
from repsim_vitdet.coco import CocoDataset
from repsim_vitdet.params import VitDetParams
from repsim_vitdet.scoring import to_coco_results

WARMUP_FACTOR = 0.001  # detectron2's WarmupParamScheduler start, as in ViTDet
LR_DROP = 0.1  # the lr factor at each milestone


class Jitter(NamedTuple):
    """One training image's augmentation: scale, crop position in [0, 1)², horizontal flip."""

    scale: float
    u: float
    v: float
    flip: bool


def augment(image: torch.Tensor, target: dict[str, torch.Tensor], size: int, jitter: Jitter
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Large-scale jitter (detectron2's ``ResizeScale`` + ``FixedSizeCrop`` without padding,
    ViTDet's LSJ): fit the image in ``size``², rescale it by ``jitter.scale``, crop at most
    ``size``² at the drawn position, flip; boxes are recomputed from the cropped masks and empty
    instances dropped (ViTDet's ``recompute_boxes``)."""
    import torchvision.transforms.v2.functional as TF
    from torchvision import tv_tensors
    from torchvision.ops import masks_to_boxes

    h, w = image.shape[-2:]
    r = jitter.scale * min(size / h, size / w)
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    top, left = round(max(nh - size, 0) * jitter.u), round(max(nw - size, 0) * jitter.v)
    image = TF.resize(image, [nh, nw], antialias=True)
    masks = TF.resize(tv_tensors.Mask(target["masks"]), [nh, nw])  # nearest for masks
    image, masks = (TF.crop(t, top, left, min(nh, size), min(nw, size)) for t in (image, masks))
    if jitter.flip:
        image, masks = TF.horizontal_flip(image), TF.horizontal_flip(masks)
    masks = masks.as_subclass(torch.Tensor)
    keep = masks.flatten(1).amax(1) > 0
    masks = masks[keep]
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel; a box ends one past it
    return image, {"boxes": boxes, "labels": target["labels"][keep], "masks": masks}


class TrainImages(torch.utils.data.Dataset):
    """``(index, Jitter)`` → an augmented image and its torchvision target (crowds left out)."""

    def __init__(self, dataset: CocoDataset, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, Jitter]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, jitter = item
        return augment(self.dataset.image(index), self.dataset.detection_target(index), self.size,
                       jitter)


def draw_plan(generator: torch.Generator, n: int, count: int, scale_range: tuple[float, float],
              flip: bool) -> list[tuple[int, Jitter]]:
    """``count`` (image index, Jitter) draws: the images in successive random permutations."""
    order = torch.cat([torch.randperm(n, generator=generator)
                       for _ in range(math.ceil(count / n))])[:count]
    lo, hi = scale_range
    scale = lo + (hi - lo) * torch.rand(count, generator=generator, dtype=torch.float64)
    uv = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    flips = torch.rand(count, generator=generator) < 0.5
    return [(int(i), Jitter(float(s), float(a), float(b), bool(f) and flip))
            for i, s, (a, b), f in zip(order, scale, uv.tolist(), flips)]


def optimizer(detector: nn.Module, lr: float, weight_decay: float, layer_decay: float
              ) -> torch.optim.AdamW:
    """AdamW (β = 0.9, 0.999) with ViTDet's layer-wise lr decay: a ViT parameter of layer l
    (0: embeddings, i + 1: block i, timm's ``group_matcher``) gets lr × decay^(L + 1 - l) for L
    blocks, everything outside the ViT the full lr. No weight decay on 1-d parameters (biases,
    norms) nor on the ViT's ``no_weight_decay()`` (position embedding, class token)."""
    from timm.models import group_parameters

    vit = detector.backbone.vit
    layer_of = group_parameters(vit, vit.group_matcher(coarse=False), reverse=True)
    top = len(vit.blocks) + 1
    skip = set(vit.no_weight_decay())
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    vit_params = {id(p) for p in vit.parameters()}
    for name, p in detector.named_parameters():
        if not p.requires_grad:
            continue
        inside = id(p) in vit_params
        vit_name = name.removeprefix("backbone.vit.")
        scale = layer_decay ** (top - layer_of[vit_name]) if inside else 1.0
        decay = 0.0 if p.ndim <= 1 or (inside and vit_name in skip) else weight_decay
        groups.setdefault((scale, decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr * s, "weight_decay": d}
                              for (s, d), ps in groups.items()], lr=lr, betas=(0.9, 0.999))


def lr_factor(step: int, warmup: int, milestones: Sequence[int]) -> float:
    """ViTDet's schedule: linear warm-up from 0.001 over ``warmup`` steps, × 0.1 at each
    milestone."""
    warm = 1.0 if step >= warmup else WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / warmup
    return warm * LR_DROP ** sum(step >= m for m in milestones)


class _Losses(nn.Module):
    """Mask R-CNN as the training loop calls a model: ``model((images, targets))`` → loss dict."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, batch: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]
                ) -> dict[str, torch.Tensor]:
        return self.detector(*batch)


def _world(distributed: bool) -> tuple[bool, int, int]:
    """(DDP in use, world size, rank): DDP when asked for and a process group is initialised."""
    import torch.distributed as dist

    if distributed and dist.is_initialized():
        return True, dist.get_world_size(), dist.get_rank()
    return False, 1, 0


def fit(detector: nn.Module, dataset: CocoDataset, cfg: VitDetParams, *, seed: int,
        checkpoint: Path | None, distributed: bool = False, progress: bool = False) -> History:
    """Train ``detector`` (on its device) for ``cfg.steps`` steps of ``cfg.batch_size`` images.

    ``distributed`` with an initialised process group: DistributedDataParallel, each process
    taking its slice of every step's images and keeping its own checkpoint (``NAME.rankR.pt``
    beside rank 0's); every process must call this."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    ddp, world, rank = _world(distributed)
    per_rank = cfg.batch_size // world
    if cfg.batch_size % world or per_rank % cfg.micro_batch_size:
        raise RecipeError(f"evaluator 'vitdet': batch_size = {cfg.batch_size} is not a multiple "
                          f"of micro_batch_size = {cfg.micro_batch_size} × {world} processes.")
    accumulate = per_rank // cfg.micro_batch_size
    device = next(detector.parameters()).device
    if checkpoint is not None and rank:
        checkpoint = checkpoint.with_suffix(f".rank{rank}{checkpoint.suffix}")
    model: nn.Module = _Losses(detector)
    if ddp:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # a batch without objects leaves the mask head unused
    opt = optimizer(detector, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, cfg.warmup_steps, cfg.milestones))
    views = TrainImages(dataset, cfg.image_size)
    bar = tqdm(total=cfg.steps, desc="vitdet train", unit="step", disable=not progress or rank)

    def batches(generator: torch.Generator) -> Iterator[tuple[Any, None]]:
        plan = draw_plan(generator, len(dataset), cfg.checkpoint_every * cfg.batch_size,
                         cfg.scale_range, cfg.flip)
        mine = [item for s in range(cfg.checkpoint_every)
                for item in plan[s * cfg.batch_size + rank * per_rank:][:per_rank]]
        micro = [mine[i:i + cfg.micro_batch_size]
                 for i in range(0, len(mine), cfg.micro_batch_size)]
        loader = DataLoader(views, batch_sampler=micro, num_workers=cfg.num_workers,
                            collate_fn=list, pin_memory=device.type == "cuda")
        for j, batch in enumerate(loader, 1):
            images = [im.to(device, non_blocking=True) for im, _ in batch]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()}
                       for _, t in batch]
            yield (images, targets), None
            if j % accumulate == 0:
                bar.update()

    def on_epoch(_done: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        return train(model, batches, lambda losses, _: sum(losses.values()), opt,
                     cfg.steps // cfg.checkpoint_every, schedule=schedule,
                     precision=cfg.precision, accumulate=accumulate,
                     seed=seed, checkpoint=checkpoint, on_epoch=on_epoch)
    finally:
        bar.close()


class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, dataset: CocoDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor]:
        return self.indices[j], self.dataset.image(self.indices[j])


@torch.no_grad()
def predict(detector: nn.Module, dataset: CocoDataset, indices: Sequence[int], batch_size: int,
            num_workers: int = 0, distributed: bool = False
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO result records (bbox, segm) of ``detector`` on the images ``indices`` of
    ``dataset``, in fp32; with ``distributed``, each process takes a share and all get all."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    ddp, world, rank = _world(distributed)
    device = next(detector.parameters()).device
    detector.eval()
    bbox: list[dict[str, Any]] = []
    segm: list[dict[str, Any]] = []
    loader = DataLoader(_EvalImages(dataset, indices[rank::world]), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=list)
    for batch in loader:
        outputs = detector([im.to(device, non_blocking=True) for _, im in batch])
        for (index, _), out in zip(batch, outputs):
            b, s = to_coco_results(dataset.image_ids[index], out, dataset.category_ids)
            bbox += b
            segm += s
    if ddp and world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (bbox, segm))
        bbox = [r for part, _ in gathered for r in part]
        segm = [r for _, part in gathered for r in part]
    return bbox, segm
