"""Sizes and schedules of the zoo: the shared ViT, each objective's optimiser budget, presets.

Pure dataclasses (no torch), so the cache key of an entry is computed from these alone. Bump
``CODE_VERSION`` whenever a change to the training code changes what a config produces: every
cache entry is keyed by it. Fine-tuned entries are keyed by the settings of the core's
fine-tuning runner and its ``CODE_VERSION`` too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from repsim.finetune.config import Settings, preset

CODE_VERSION = "3"

PRETRAINED = ("mocov3", "dino", "mae", "msn", "supervised")
FINETUNABLE = ("mocov3", "dino", "mae", "msn")
CONTROL = "untrained"


@dataclass(frozen=True)
class Arch:
    """The one ViT every objective trains: digits upsampled 8→16 px, 4×4 patches (16 tokens + CLS).

    16 tokens rather than 64 keep a training step ~4× cheaper on the CPU, which buys the step
    counts the objectives need within the time budget (README, "Budget").
    """

    img_size: int = 16
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int = 96
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 10


@dataclass(frozen=True)
class Schedule:
    """AdamW with linear warm-up then cosine decay to ``min_lr``, over ``steps`` minibatches."""

    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_frac: float = 0.1
    clip_grad: float | None = None


@dataclass(frozen=True)
class FinetuneSchedule:
    """The seeds' fine-tuning recipe (Table 5) scaled down to the digits: what the zoo changes
    in the core's ``table5`` preset (AdamW (0.9, 0.999), weight decay 0.05, layer decay 0.75,
    label smoothing 0.1 and drop path 0.1 stay). Fine-tuning runs on :mod:`repsim.finetune`."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3  # at 1e-3 and 10 epochs MAE reached 0.92 val accuracy, here 0.95
    warmup_epochs: int = 1
    # Digits suit neither mixup, cutmix, RandAugment nor flips (a mirrored digit is another
    # symbol or none): crops and intensity jitter instead, as the zoo's other views.
    mixup: float = 0.0
    cutmix: float = 0.0
    auto_augment: str | None = None
    hflip: float = 0.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    color_jitter: float = 0.3
    interpolation: str = "bilinear"

    def settings(self, seed: int) -> Settings:
        """The core's settings for a run from ``seed``."""
        return preset("table5", seed=seed, **to_jsonable(self))


@dataclass(frozen=True)
class Preset:
    """Everything a zoo build depends on besides the seed."""

    arch: Arch = field(default_factory=Arch)
    schedules: dict[str, Schedule] = field(default_factory=dict)
    finetune: FinetuneSchedule = field(default_factory=FinetuneSchedule)
    objective_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


# Each objective costs ~40–90 CPU-seconds (one thread); README, "Budget". Minibatches of 64: at a
# fixed compute budget more updates beat larger batches (supervised 20-NN 0.95 vs 0.74 at 256).
DEFAULT = Preset(
    schedules={
        "mocov3": Schedule(steps=400, lr=3e-3, weight_decay=0.1),
        "dino": Schedule(steps=300, lr=1e-3, weight_decay=0.04, clip_grad=3.0),
        "mae": Schedule(steps=1000, lr=1.5e-3, weight_decay=0.05),
        "msn": Schedule(steps=600, lr=1e-3, weight_decay=0.04, clip_grad=3.0),
        "supervised": Schedule(steps=400, lr=2e-3, betas=(0.9, 0.999)),
    },
)

# For tests: a 2-block, 32-wide ViT and a handful of steps.
TINY = Preset(
    arch=Arch(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    schedules={name: Schedule(steps=6, batch_size=32, lr=2e-3) for name in PRETRAINED},
    finetune=FinetuneSchedule(epochs=2, batch_size=256),
    objective_overrides={
        "mocov3": {"hidden_dim": 64, "out_dim": 32},
        "dino": {"hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 64, "local_crops": 2},
        "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "msn": {"hidden_dim": 64, "out_dim": 32, "prototypes": 32, "focal_views": 2},
    },
)

PRESETS = {"default": DEFAULT, "tiny": TINY}

# Seconds of one training step at one thread on the reference 2-core machine (README, "Budget");
# "ft" is a fine-tuning step. Used to deal the zoo to processes and for the first estimate only.
STEP_SECONDS = {"mocov3": 0.15, "dino": 0.20, "msn": 0.095, "mae": 0.03, "supervised": 0.045,
                "ft": 0.08}


def to_jsonable(obj: Any) -> Any:
    """Dataclasses and tuples as plain JSON values, for hashing and sidecars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def config_key(config: Any) -> str:
    """Short, stable hash of a training configuration plus the code version."""
    blob = json.dumps({"code_version": CODE_VERSION, "config": to_jsonable(config)},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
