"""Images/s of the ``paper`` preset (ViT-B/16 at 1024 px, ViTDet's heads) on this machine's GPU.

A random ``vit_base_patch16_224`` (throughput does not depend on the weights) trains a few steps
of the preset's schedule on generated 1024-px ``coco_shapes`` images and scores some; prints the
training and scoring images/s of each backbone mode. Run: ``python bench_paper_preset.py``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from repsim.evaluators.access import ModelAccess
from repsim.evaluators.context import InMemoryContext
from repsim.plugins import build_part
from repsim.run.device import DeviceSettings, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per mode")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    loaded = build_part("model", "timm", arch="vit_base_patch16_224", kwargs={"num_classes": 0})
    loaded.module.to(device)
    ctx = InMemoryContext(models=["vit_b16"], model_access={
        "vit_b16": ModelAccess("vit_b16", loaded, DeviceSettings(device))})
    data = {"dataset": "coco_shapes", "params": {"size": 1024, "train_images": 64,
                                                 "val_images": 16}}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in ("frozen", "finetune"):
            ev = build_part("evaluator", "vitdet", preset="paper", backbone=backbone, data=data,
                            steps=args.steps, checkpoint_every=args.steps, warmup_steps=0,
                            milestones=[], batch_size=args.batch_size,
                            micro_batch_size=args.micro_batch_size, num_workers=4,
                            eval_images=8, checkpoint_dir=tmp, progress=False)
            run = ev.evaluate(ctx).data["runs"][0]
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            print(f"{backbone:9s} train {run['train_images_per_s']:.2f} images/s, score "
                  f"{run['eval_images_per_s']:.2f} images/s, peak memory {peak:.1f} GiB "
                  f"({device}, micro-batch {args.micro_batch_size})")


if __name__ == "__main__":
    main()
