"""Benchmark: optimiser steps per second of fine-tuning with the Table 5 preset.

Not part of the test run::

    .venv/bin/python benchmarks/bench_finetune.py                       # CPU: ViT-Ti/16, batch 32
    .venv/bin/python benchmarks/bench_finetune.py --device cuda --precision bf16 \\
        --arch vit_base_patch16_224 --batch-size 256 --device-batch 256 --num-workers 8

The whole runner (:func:`repsim.finetune.runner.finetune`): RandAugment, mixup / cutmix, drop
path, layer decay, AdamW, the step-level path meter and a snapshot per epoch, on generated
224 px images (random initialisation: nothing is downloaded). Two epochs of ``--steps`` steps;
the second is timed (the first holds warm-up costs: allocator, kernels, worker start-up).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from repsim.finetune.config import preset
from repsim.finetune.runner import Compute, finetune
from repsim.plugins import build_part
from repsim.run.device import DeviceSettings, configured, resolve_device
from repsim.threads import available_cores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=32, help="examples per optimiser step")
    ap.add_argument("--device-batch", type=int, default=None, help="examples per forward")
    ap.add_argument("--steps", type=int, default=4, help="steps per epoch (2 epochs run)")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=available_cores())
    args = ap.parse_args()

    device = DeviceSettings(resolve_device(args.device), args.precision, threads=args.threads)
    # The synthetic dataset keeps 3/4 of its examples for the train split.
    data = build_part("dataset", "synthetic", split="train", size=224, classes=10,
                      examples=args.steps * args.batch_size * 4 // 3 + 4)
    model = build_part("model", "timm", arch=args.arch)
    settings = preset("table5", epochs=2, warmup_epochs=1, batch_size=args.batch_size)
    with configured(device), tempfile.TemporaryDirectory() as out:
        prov = finetune(model, data, settings, out, source={"model": {"model": args.arch},
                                                            "data": {"synthetic": 224}},
                        compute=Compute(device, args.device_batch, args.num_workers))
    seconds = prov["epoch_seconds"][1]
    result = {"arch": args.arch, "device": prov["device"].get("gpu", str(device.device)),
              "precision": args.precision, "threads": args.threads,
              "batch_size": args.batch_size, "device_batch": prov["device_batch"],
              "accumulate": prov["accumulate"], "steps": prov["steps_per_epoch"],
              "seconds": seconds, "steps_per_s": round(prov["steps_per_epoch"] / seconds, 4),
              "images_per_s": round(prov["steps_per_epoch"] * args.batch_size / seconds, 1),
              "torch": torch.__version__}
    print(json.dumps(result))
    print(f"{args.arch} on {result['device']} ({args.precision}, {args.threads} threads): "
          f"{result['steps_per_s']} steps/s of {args.batch_size} images "
          f"({result['images_per_s']} images/s), Table 5 augmentation included")


if __name__ == "__main__":
    main()
