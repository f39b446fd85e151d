"""Fine-tuning recipes: a TOML file naming the model, the data, a preset and its overrides.

```toml
[model]                     # any registered model entry (`repsim list models`)
model = "mae_vit_b16"
params = { checkpoint = "checkpoints/mae_pretrain_vit_base.pth" }

[data]                      # any registered dataset; `split` trains, `eval_split` is measured
dataset = "imagefolder"
split = "train"
eval_split = "val"
params = { root = "data/imagenet" }

[finetune]                  # a preset, then any of its settings (Settings' fields) overridden
preset = "table5"
output = "runs/ft-mae"
epochs = 100

[run]                       # where and how it computes: not part of the run's identity
device = "cuda"
precision = "bf16"
device_batch = 128
```

Pydantic only (no torch): ``repsim --help`` and the cache keys of plugins import this module.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from repsim.errors import RecipeError

# Bump when the runner changes what a configuration produces (plugins key their caches by it).
CODE_VERSION = "1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Settings(_Strict):
    """What a fine-tuning run does. The defaults are the seeds' Table 5 (003, App. B.5), the
    preset ``table5``; the augmentation and regularisation parts are timm's."""

    epochs: int = Field(100, ge=1, description="training epochs, warm-up included (Table 5: 100)")
    warmup_epochs: int = Field(5, ge=0, description="linear warm-up epochs (Table 5: 5)")
    batch_size: int = Field(1024, ge=1, description="effective batch: device_batch × gradient "
                            "accumulation × processes (Table 5: 1024)")
    optimizer: str = Field("adamw", description="timm optimizer name (create_optimizer_v2)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (Table 5)")
    base_lr: float = Field(1e-3, gt=0, description="learning rate = base_lr × batch_size / 256 "
                           "(Table 5: 1e-3)")
    lr: float | None = Field(None, gt=0, description="absolute learning rate, instead of "
                             "base_lr × batch_size / 256")
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the schedule")
    warmup_lr: float = Field(0.0, ge=0, description="learning rate at the start of warm-up")
    schedule: str = Field("cosine", description="timm scheduler (create_scheduler_v2), stepped "
                          "per update (Table 5: cosine decay)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay; none on biases, "
                                "norms and position/class tokens (Table 5: 0.05)")
    layer_decay: float | None = Field(0.75, gt=0, le=1, description="layer-wise lr decay "
                                      "(Table 5: 0.75); None: off")
    clip_grad: float | None = Field(None, gt=0, description="max gradient 2-norm; None: off")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Table 5: 0.1")
    mixup: float = Field(0.8, ge=0, description="mixup alpha (Table 5: 0.8); 0: off")
    cutmix: float = Field(1.0, ge=0, description="cutmix alpha (Table 5: 1.0); 0: off")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="chance a batch is mixed")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="chance of cutmix, not mixup, "
                                     "when both are on")
    mixup_mode: Literal["batch", "pair", "elem"] = Field("batch", description="one mix per "
                                                         "micro-batch, pair or element")
    auto_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm auto-augment "
                                     "policy; RandAugment magnitude 9, std 0.5 (Table 5: "
                                     "RandAug (9, 0.5)); 'none': off")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth of the last block, "
                             "linear from 0 over the blocks (Table 5: 0.1)")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random-resized-crop area")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random-resized-crop "
                                            "aspect ratios")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    color_jitter: float = Field(0.0, ge=0, description="colour jitter strength, 0: off (timm "
                                "turns it off while RandAugment is on)")
    random_erase: float = Field(0.0, ge=0, le=1, description="random erasing probability "
                                "(not in Table 5; MAE's fine-tuning uses 0.25)")
    interpolation: Literal["bicubic", "bilinear", "nearest"] = Field(
        "bicubic", description="resize filter of the training crops (MAE: bicubic)")
    img_size: int | None = Field(None, ge=1, description="training input size; default: the "
                                 "model's (its preprocess crop)")
    head: Literal["new", "keep"] = Field("new", description="'new': a new classifier for the "
                                         "dataset's classes; 'keep': the model's own")
    head_init_std: float | None = Field(2e-5, gt=0, description="std of the new classifier's "
                                        "truncated-normal init (MAE: 2e-5); None: timm's")
    snapshot_every: int = Field(1, ge=1, description="snapshot every this many snapshot_units")
    snapshot_unit: Literal["epoch", "step"] = Field("epoch", description="snapshots per epoch, "
                                                    "or per optimizer step")
    seed: int = Field(0, description="seeds the head, the data order, augmentation, mixup and "
                      "drop path")

    @field_validator("auto_augment", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:  # TOML has no null
        return None if isinstance(value, str) and value.lower() in ("", "none") else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs = {self.warmup_epochs} must be below epochs = "
                             f"{self.epochs}")
        for name in ("crop_scale", "crop_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} = ({lo}, {hi}) must satisfy 0 < low <= high")
        if self.crop_scale[1] > 1:
            raise ValueError(f"crop_scale = {self.crop_scale}: the area is at most 1")
        return self

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: ``lr``, else ``base_lr × batch_size / 256`` (MAE's rule)."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (then targets are soft and the loss is soft-target CE)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


# Named starting points of [finetune]; a recipe overrides any of their fields.
PRESETS: dict[str, Settings] = {"table5": Settings()}


def preset(name: str, **overrides: Any) -> Settings:
    """The preset ``name`` with ``overrides`` applied, validated as a whole."""
    if name not in PRESETS:
        raise RecipeError(f"finetune.preset = '{name}' is not a preset; use one of "
                          f"{', '.join(PRESETS)}.")
    return Settings.model_validate({**PRESETS[name].model_dump(), **overrides})


class ModelSpec(_Strict):
    """[model]: the registered model entry fine-tuned, and its parameters."""

    model: str = Field(description="registry name, see `repsim list models`")
    params: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Strict):
    """[data]: the registered dataset, the split trained on and the one measured."""

    dataset: str = Field(description="registry name, see `repsim list datasets`")
    split: str = Field("train", description="the split fine-tuned on")
    eval_split: str | None = Field(None, description="a split whose top-1 accuracy is measured "
                                   "after every epoch")
    examples: int | None = Field(None, ge=1, description="train on this many examples of the "
                                 "split (a seeded random subset); all if unset")
    params: dict[str, Any] = Field(default_factory=dict)


class FinetuneSection(Settings):
    """[finetune]: a preset and any of its settings."""

    preset: str = Field("table5", description=f"one of {', '.join(PRESETS)}")
    output: Path = Field(Path("runs/finetune"), description="run directory")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneSection:
        return self  # the section alone lacks the preset's values: settings() checks the merge

    def settings(self) -> Settings:
        """The preset with the fields this section sets."""
        own = {k: getattr(self, k) for k in self.model_fields_set if k in Settings.model_fields}
        return preset(self.preset, **own)


class ComputeSpec(_Strict):
    """[run]: where and how the run computes. None of it is part of the run's identity: a run
    resumes with other values (other GPUs, more processes, smaller device batches; a CPU run's
    checkpoint resumes on the CPU only, as the loop's generators differ)."""

    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype of "
                                                        "the forwards and losses")
    tf32: bool = Field(False, description="allow TF32 matrix products on CUDA")
    device_batch: int | None = Field(None, ge=1, description="examples per forward on one "
                                     "device; default: the whole per-process batch (no "
                                     "gradient accumulation)")
    num_workers: int = Field(0, ge=0, description="data-loading processes (augmentation)")
    threads: int | None = Field(None, ge=1, description="torch threads; default: the cores this "
                                "process may use")


class FinetuneRecipe(_Strict):
    """A fine-tuning recipe file."""

    model: ModelSpec
    data: DataSpec
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    run: ComputeSpec = Field(default_factory=ComputeSpec)

    def source(self) -> dict[str, Any]:
        """What is fine-tuned on what: with the settings, the identity of the run (the split
        measured after each epoch is not part of it)."""
        return {"model": self.model.model_dump(mode="json"),
                "data": self.data.model_dump(mode="json", exclude={"eval_split"})}


class FinetunedParams(BaseModel):
    """Parameters of the model entry `finetuned`: a run directory and which of its weights."""

    model_config = ConfigDict(extra="forbid")
    # A str, not a Path: a missing run is reported once, by the entry, with what to run.
    run: str = Field(description="a fine-tuning run directory (`repsim finetune` writes it)")
    epoch: int | None = Field(None, ge=0, description="an epoch snapshot (0: before fine-tuning);"
                              " default: the final weights")
    step: int | None = Field(None, ge=0, description="a step snapshot (runs with "
                             "snapshot_unit = 'step')")

    @model_validator(mode="after")
    def _one(self) -> FinetunedParams:
        if self.epoch is not None and self.step is not None:
            raise ValueError("give `epoch` or `step`, not both")
        return self


def _invalid(path: Path, exc: ValidationError, section: str = "") -> RecipeError:
    lines = [f"{path}: the fine-tuning recipe does not validate:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in [*filter(None, [section]), *err["loc"]]) or "(top level)"
        msg = {"extra_forbidden": "unknown field (remove it or check its spelling)",
               "missing": "required field is missing"}.get(err["type"], err["msg"])
        lines.append(f"  {loc}: {msg}")
    lines.append("See recipes/paper/finetune_mae.toml for a complete example.")
    return RecipeError("\n".join(lines))


def parse_finetune_recipe(text: str, path: Path = Path("<recipe>"),
                          run_overrides: dict[str, Any] | None = None) -> FinetuneRecipe:
    """Validate a fine-tuning recipe; ``run_overrides`` replace [run] settings (the CLI flags)."""
    from repsim.paths import substitute
    from repsim.recipe import _toml_error  # the same file:line message as comparison recipes

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, exc) from None
    raw = substitute(raw, path)  # ${REPSIM_IMAGENET} etc., as in comparison recipes
    if run_overrides and isinstance(raw.get("run", {}), dict):
        raw["run"] = {**raw.get("run", {}), **run_overrides}
    try:
        recipe = FinetuneRecipe.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(path, exc) from None
    try:
        recipe.finetune.settings()  # the preset and the overrides together
    except ValidationError as exc:
        raise _invalid(path, exc, "finetune") from None
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    _check_parts(recipe, path)
    return recipe


def load_finetune_recipe(path: str | Path,
                         run_overrides: dict[str, Any] | None = None) -> FinetuneRecipe:
    """Read and validate a fine-tuning recipe file; names and parameters are resolved against
    the registries (no weights are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"fine-tuning recipe '{path}' does not exist (or is not a file). Give "
                          "a .toml file such as recipes/paper/finetune_mae.toml.")
    return parse_finetune_recipe(path.read_text(encoding="utf-8"), path, run_overrides)


def dataset_params(data: DataSpec, kind_params: dict[str, Any]) -> dict[str, Any]:
    """``data.params`` with ``split`` set from ``data.split`` where the dataset takes one."""
    params = dict(data.params)
    if "split" in kind_params:
        params.setdefault("split", data.split)
    return params


def _check_parts(recipe: FinetuneRecipe, path: Path) -> None:
    from repsim.plugins import registry

    problems = []
    for kind, name, params, where in (
            ("model", recipe.model.model, recipe.model.params, "model"),
            ("dataset", recipe.data.dataset, None, "data")):
        reg = registry(kind)
        if name not in reg:
            problems.append(f"{where}: {reg.unknown_message(name)}")
            continue
        part = reg.get(name)
        if params is None:
            params = dataset_params(recipe.data, part.params.model_fields)
        try:
            part.validate(params, where=where)
        except RecipeError as exc:
            problems.append(str(exc))
    if problems:
        raise RecipeError(f"{path}: {len(problems)} problem(s):\n" +
                          "\n".join(f"- {p}" for p in problems))
