"""Parameter models of the built-in evaluators.

Kept free of torch so the registry can validate a recipe's evaluator parameters at start-up.
Defaults follow the seeds' protocols (``docs/evaluators.md`` gives each one's source).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Reduction = Literal["cls", "gap", "gap_no_cls", "flatten"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KnnParams(_Params):
    """Weighted k-NN in the DINO protocol, for every layer and token reduction."""

    models: list[str] | None = None  # None: every model of the run
    group: str | None = None  # only this layer group (e.g. "blocks"); None: every selected layer
    layers: list[str] | None = None  # explicit layer or group names instead
    reductions: list[Reduction] = Field(default_factory=lambda: ["cls", "gap", "gap_no_cls"],
                                        min_length=1)
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    train_split: str = "train"
    eval_split: str = "eval"
    memory_mb: float = Field(256.0, gt=0)  # bound on one block of similarities
    device: str = "cpu"


class LinearProbeParams(_Params):
    """BatchNorm (no affine) + linear classifier on cached features, over a hyper-parameter grid."""

    models: list[str] | None = None
    group: str | None = None  # "last" / "all" within this layer group (e.g. "blocks")
    # "last": the last selected layer; "all": every selected layer on its own; or a list whose
    # entries are a layer (or a group: each of its layers on its own) or a list of layers whose
    # features are concatenated (final + intermediate CLS tokens, seeds 003 Fig. 2c).
    layers: Literal["last", "all"] | list[str | list[str]] = "last"
    reduction: Reduction | None = None  # None: the reduction the run cached for the model
    train_split: str = "train"
    eval_split: str = "eval"
    optimizer: Literal["sgd", "lars"] = "sgd"
    base_lrs: list[float] = Field(default_factory=lambda: [0.1, 0.01, 0.001], min_length=1)
    weight_decays: list[float] = Field(default_factory=lambda: [0.0, 1e-4, 1e-3], min_length=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(256, ge=2)
    epochs: list[int] = Field(default_factory=lambda: [100], min_length=1)
    warmup_epochs: list[int] = Field(default_factory=lambda: [10], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    top: int = Field(5, ge=1)  # report mean ± std of the best `top` runs
    selection: Literal["holdout", "eval"] = "holdout"
    holdout: float = Field(0.1, gt=0, lt=1)  # fraction of the train split held out for selection
    device: str = "cpu"

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> LinearProbeParams:
        if max(self.warmup_epochs) >= min(self.epochs):
            raise ValueError(f"every warmup_epochs value {self.warmup_epochs} must be smaller "
                             f"than every epochs value {self.epochs}")
        if min(self.base_lrs) <= 0 or min(self.weight_decays) < 0:
            raise ValueError("base_lrs must be > 0 and weight_decays >= 0")
        return self


class MlpProbeParams(LinearProbeParams):
    """Probes with ``depth`` blocks of Linear → BatchNorm → ReLU before the classifier."""

    depths: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)  # 0: linear
    hidden: int | None = Field(None, ge=1)  # None: the input width

    @model_validator(mode="after")
    def _depths_non_negative(self) -> MlpProbeParams:
        if min(self.depths) < 0:
            raise ValueError("depths must be >= 0 (0 is the linear probe)")
        return self


PROBE_GRID_KEYS = ("optimizer", "base_lrs", "weight_decays", "momentum", "batch_size", "epochs",
                   "warmup_epochs", "seeds", "selection", "holdout")


class AgreementParams(_Params):
    """Kendall's tau of top-k class rankings and top-1 F1 between pairs of models."""

    models: list[str] | None = None  # None: every model; every unordered pair is compared
    pairs: list[tuple[str, str]] | None = None  # explicit pairs instead of all pairs of `models`
    ks: list[int] = Field(default_factory=lambda: [5, 10, 100], min_length=1)
    split: str = "eval"
    reference: Literal["a", "b", "symmetric"] = "symmetric"
    f1_average: Literal["macro", "micro", "weighted"] = "macro"
    # "output": the models' own class scores. "linear_probe": the scores of a linear probe trained
    # on `train_split` features of `layer` (the seeds rank with linear-probe outputs, Fig. 4).
    scores: Literal["output", "linear_probe"] = "output"
    layer: str | None = None  # a layer, or a group (its last layer); None: last selected layer
    reduction: Reduction | None = None
    train_split: str = "train"
    probe: dict[str, Any] = Field(default_factory=dict)  # linear_probe grid keys; best run used

    @model_validator(mode="after")
    def _check(self) -> AgreementParams:
        if min(self.ks) < 2:
            raise ValueError("every k must be >= 2 (Kendall's tau needs two classes)")
        unknown = set(self.probe) - set(PROBE_GRID_KEYS)
        if unknown:
            raise ValueError(f"probe: unknown keys {sorted(unknown)}; use {PROBE_GRID_KEYS}")
        LinearProbeParams(**self.probe)  # same checks as the linear_probe evaluator
        return self


class PathEfficiencyParams(_Params):
    """‖θ_T − θ_0‖ / Σ‖θ_t − θ_{t−1}‖ over fine-tuning snapshots, globally, per type and block."""

    # One run: a list of safetensors files (in order), a glob, or a folder of *.safetensors
    # (natural sort: epoch_2 before epoch_10). Several runs: `runs = {label = <same forms>}`.
    snapshots: str | list[str] | None = None
    runs: dict[str, str | list[str]] = Field(default_factory=dict)
    # Recipe model labels whose builder recorded its fine-tuning snapshots in the model's
    # provenance (`provenance["snapshots"]`, e.g. the minizoo `*_ft` entries).
    models: list[str] = Field(default_factory=list)
    # Pretrained checkpoint (safetensors): only keys it holds with the same shape count.
    reference: str | None = None
    exclude: list[str] | None = None  # glob patterns; None: the new head and BatchNorm buffers
    layer_types: dict[str, str] | None = None  # type -> regex on parameter names, first match
    block_pattern: str | None = None  # regex whose group 1 is the block id

    @model_validator(mode="after")
    def _one_source(self) -> PathEfficiencyParams:
        if self.snapshots is not None and self.runs:
            raise ValueError("give either `snapshots` (one run) or `runs` (several), not both")
        return self


class CkaDepthParams(_Params):
    """CKA against relative layer depth between models of different depth or family."""

    metric: str = "minibatch_cka"
    pairs: list[tuple[str, str]] | None = None  # None: every unordered pair of models
    group: str | None = None  # restrict both models to one layer group (e.g. the blocks)
    bins: int = Field(10, ge=1)


class AttentionParams(_Params):
    """Streamed attention maps of ViT blocks (selector ``attn_maps``)."""

    indices: list[int] | int | None = None  # blocks to watch (timm style); None: every block
    split: str = "eval"


class AttentionCollapseParams(AttentionParams):
    """NMI and cosine similarities; ``eps = 1e-8`` reproduces Park et al.'s smoothing exactly."""

    eps: float = Field(0.0, ge=0)  # added to the patch-to-patch weights before renormalising


class AttentionDistanceParams(AttentionParams):
    """Mean attention distance; ``pixels`` scales by each model's (square) patch size."""

    unit: Literal["patches", "pixels"] = "patches"


class FourierParams(_Params):
    """Relative log amplitude of the 2-D Fourier transform of block token maps."""

    split: str = "eval"
    embedding: bool = True  # also the tokens entering block 0 (depth 0 in Park et al.'s figure)
    # "log_amplitude": mean over channels and examples of log(|F| + eps), as Park et al.'s code;
    # "amplitude": log(mean |F| + eps).
    average: Literal["log_amplitude", "amplitude"] = "log_amplitude"
    # "diagonal": frequencies (k, k), as Park et al.; "ring": the mean over every frequency whose
    # larger axis component is k.
    profile: Literal["diagonal", "ring"] = "diagonal"
    eps: float = Field(1e-6, gt=0)
