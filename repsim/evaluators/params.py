"""Parameter models of the built-in evaluators.

Kept free of torch so the registry can validate a recipe's evaluator parameters at start-up.
Defaults follow the seeds' protocols (``docs/evaluators.md`` gives each one's source). Every field
carries a ``description``: ``repsim list evaluators NAME`` shows it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Reduction = Literal["cls", "gap", "gap_no_cls", "flatten"]

# Descriptions several evaluators share.
_MODELS = "recipe model labels to evaluate; None: every model of the run"
_GROUP = "only the layers of this layer group (e.g. 'blocks'); None: every selected layer"
_TRAIN = "the split whose cached features train (k-NN: the memory bank)"
_EVAL = "the split whose cached features are evaluated"
_DEVICE = "where the evaluator computes ('cpu', 'cuda', 'cuda:N', 'mps')"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KnnParams(_Params):
    """Weighted k-NN in the DINO protocol, for every layer and token reduction."""

    models: list[str] | None = Field(None, description=_MODELS)
    group: str | None = Field(None, description=_GROUP)
    layers: list[str] | None = Field(None, description="explicit layer or group names instead of "
                                                       "`group`")
    reductions: list[Reduction] = Field(default_factory=lambda: ["cls", "gap", "gap_no_cls"],
                                        min_length=1, description="token reductions, each "
                                        "evaluated on its own")
    k: int = Field(20, ge=1, description="neighbours that vote")
    temperature: float = Field(0.07, gt=0, description="T of the vote weight exp(cos / T)")
    train_split: str = Field("train", description=_TRAIN)
    eval_split: str = Field("eval", description=_EVAL)
    memory_mb: float = Field(256.0, gt=0, description="bound on one block of similarities (MB); "
                                                      "larger sets are cut and merged")
    device: str = Field("cpu", description=_DEVICE)


class LinearProbeParams(_Params):
    """BatchNorm (no affine) + linear classifier on cached features, over a hyper-parameter grid."""

    models: list[str] | None = Field(None, description=_MODELS)
    group: str | None = Field(None, description="the layer group 'last' / 'all' refer to (e.g. "
                                                "'blocks'); None: every selected layer")
    layers: Literal["last", "all"] | list[str | list[str]] = Field(
        "last", description="'last': the last selected layer; 'all': every selected layer on its "
        "own; or a list whose entries are a layer, a group (each of its layers on its own) or a "
        "list of layers whose features are concatenated (final + intermediate CLS tokens, "
        "seeds 003 Fig. 2c)")
    reduction: Reduction | None = Field(None, description="token reduction; None: the one the "
                                                          "run cached for the model")
    train_split: str = Field("train", description=_TRAIN)
    eval_split: str = Field("eval", description=_EVAL)
    optimizer: Literal["sgd", "lars"] = Field("sgd", description="'lars' needs ImageNet-sized "
                                              "train sets or ~100x larger learning rates")
    base_lrs: list[float] = Field(default_factory=lambda: [0.1, 0.01, 0.001], min_length=1,
                                  description="grid of base learning rates (lr = base × "
                                              "batch_size / 256)")
    weight_decays: list[float] = Field(default_factory=lambda: [0.0, 1e-4, 1e-3], min_length=1,
                                       description="grid of weight decays (weight matrices only)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD / LARS momentum")
    batch_size: int = Field(256, ge=2, description="capped at the training-set size; an "
                                                   "incomplete last batch is dropped")
    epochs: list[int] = Field(default_factory=lambda: [100], min_length=1,
                              description="grid of training lengths")
    warmup_epochs: list[int] = Field(default_factory=lambda: [10], min_length=1,
                                     description="grid of linear warm-up lengths, then cosine "
                                                 "decay")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="grid of training seeds")
    top: int = Field(5, ge=1, description="report mean ± std of the best `top` runs")
    selection: Literal["holdout", "eval"] = Field(
        "holdout", description="rank runs on a held-out part of the train split, or on the eval "
        "split as the seeds do (optimistic)")
    holdout: float = Field(0.1, gt=0, lt=1, description="fraction of the train split held out "
                                                        "for selection")
    device: str = Field("cpu", description=_DEVICE)

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

    depths: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1,
                              description="hidden blocks before the classifier; 0: the linear "
                                          "probe")
    hidden: int | None = Field(None, ge=1, description="hidden width; None: the input width")

    @model_validator(mode="after")
    def _depths_non_negative(self) -> MlpProbeParams:
        if min(self.depths) < 0:
            raise ValueError("depths must be >= 0 (0 is the linear probe)")
        return self


PROBE_GRID_KEYS = ("optimizer", "base_lrs", "weight_decays", "momentum", "batch_size", "epochs",
                   "warmup_epochs", "seeds", "selection", "holdout")


class AgreementParams(_Params):
    """Kendall's tau of top-k class rankings and top-1 F1 between pairs of models."""

    models: list[str] | None = Field(None, description="models whose every unordered pair is "
                                                       "compared; None: every model")
    pairs: list[tuple[str, str]] | None = Field(None, description="explicit pairs instead of all "
                                                                  "pairs of `models`")
    ks: list[int] = Field(default_factory=lambda: [5, 10, 100], min_length=1,
                          description="top-k rankings compared (each k >= 2)")
    split: str = Field("eval", description="the split whose predictions are compared")
    reference: Literal["a", "b", "symmetric"] = Field(
        "symmetric", description="whose k highest-scoring classes are compared: model a's, "
        "b's, or the mean over both")
    f1_average: Literal["macro", "micro", "weighted"] = Field(
        "macro", description="averaging of the top-1 F1 over classes")
    scores: Literal["output", "linear_probe"] = Field(
        "output", description="'output': the models' own class scores; 'linear_probe': the "
        "scores of a linear probe trained on `train_split` features of `layer` (seeds Fig. 4)")
    layer: str | None = Field(None, description="the probe's layer, or a group (its last "
                                                "layer); None: the last selected layer")
    reduction: Reduction | None = Field(None, description="the probe's token reduction; None: "
                                                          "the one the run cached")
    train_split: str = Field("train", description="the split the probe trains on")
    probe: dict[str, Any] = Field(default_factory=dict, description="linear_probe grid keys "
                                  "for the probe; its best run is used")

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

    snapshots: str | list[str] | None = Field(
        None, description="one run: safetensors files in order, a glob, or a folder of "
        "*.safetensors (natural sort: epoch_2 before epoch_10)")
    runs: dict[str, str | list[str]] = Field(default_factory=dict,
                                             description="several runs: {label = <same forms>}")
    models: list[str] = Field(default_factory=list, description="recipe model labels whose "
                              "builder recorded fine-tuning snapshots in its provenance (e.g. "
                              "the minizoo *_ft entries)")
    reference: str | None = Field(None, description="pretrained checkpoint (safetensors): only "
                                                    "keys it holds with the same shape count")
    exclude: list[str] | None = Field(None, description="glob patterns of parameters left out; "
                                                        "None: the new head and BatchNorm buffers")
    layer_types: dict[str, str] | None = Field(None, description="type -> regex on parameter "
                                                                 "names, first match wins")
    block_pattern: str | None = Field(None, description="regex whose group 1 is the block id")

    @model_validator(mode="after")
    def _one_source(self) -> PathEfficiencyParams:
        if self.snapshots is not None and self.runs:
            raise ValueError("give either `snapshots` (one run) or `runs` (several), not both")
        return self


class CkaDepthParams(_Params):
    """CKA against relative layer depth between models of different depth or family."""

    metric: str = Field("minibatch_cka", description="the recipe metric whose values are binned")
    pairs: list[tuple[str, str]] | None = Field(None, description="model pairs; None: every "
                                                                  "unordered pair of models")
    group: str | None = Field(None, description="restrict both models to one layer group (e.g. "
                                                "'blocks')")
    bins: int = Field(10, ge=1, description="equal-width bins of relative-depth distance over "
                                            "[0, 1)")


class AttentionParams(_Params):
    """Streamed attention maps of ViT blocks (selector ``attn_maps``)."""

    indices: list[int] | int | None = Field(None, description="blocks to watch (timm style: "
                                                              "negative from the end); None: "
                                                              "every block")
    split: str = Field("eval", description="the split whose pass is watched")


class AttentionCollapseParams(AttentionParams):
    """NMI and cosine similarities; ``eps = 1e-8`` reproduces Park et al.'s smoothing exactly."""

    eps: float = Field(0.0, ge=0, description="added to the patch-to-patch weights before "
                                              "renormalising")


class AttentionDistanceParams(AttentionParams):
    """Mean attention distance; ``pixels`` scales by each model's (square) patch size."""

    unit: Literal["patches", "pixels"] = Field("patches", description="unit of the distances")


class FourierParams(_Params):
    """Relative log amplitude of the 2-D Fourier transform of block token maps."""

    split: str = Field("eval", description="the split whose pass is watched")
    embedding: bool = Field(True, description="also the tokens entering block 0 (depth 0 in Park "
                                              "et al.'s figure)")
    average: Literal["log_amplitude", "amplitude"] = Field(
        "log_amplitude", description="'log_amplitude': mean over channels and examples of "
        "log(|F| + eps), as Park et al.'s code; 'amplitude': log(mean |F| + eps)")
    profile: Literal["diagonal", "ring"] = Field(
        "diagonal", description="'diagonal': frequencies (k, k), as Park et al.; 'ring': the mean "
        "over every frequency whose larger axis component is k")
    eps: float = Field(1e-6, gt=0, description="added to the amplitude before the log")
