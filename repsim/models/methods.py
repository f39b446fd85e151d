"""Training methods: how each one's code writes its checkpoints, one row per method.

Torch-free, since the zoo (imported at start-up) names a method for each entry;
:mod:`repsim.models.official` reads every method-specific fact from :data:`METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from repsim.models.base import Preprocess

# Any method's training script may save the network wrapped in DistributedDataParallel.
DDP_PREFIX = "module."


@dataclass(frozen=True)
class Misfit:
    """A sibling method's file, recognised by the keys it has that the network lacks and vice
    versa; the error message then names the entries of ``use``."""

    unexpected: tuple[str, ...]
    missing: tuple[str, ...]
    file_is: str
    use: str


@dataclass(frozen=True)
class TrainingMethod:
    """One method's checkpoint layouts, dropped keys, architecture quirks and preprocessing.

    Keys are named inside the container, after :data:`DDP_PREFIX` is stripped. ``{branch}`` stands
    for the chosen branch, ``{head}`` for the classifier's name (``head`` in ViTs, ``fc`` in
    ResNets).
    """

    name: str
    converter: str  # the key converter of repsim.models.official registered under this name
    # Top-level entries that may hold the network, first match wins; a file without any of them
    # must be a bare state dict.
    containers: tuple[str, ...]
    branches: tuple[str, ...] = ()  # networks of a training checkpoint, the default first
    branch_doc: str = ""
    # Prefix of the backbone's keys in a training checkpoint; every other key is dropped.
    nested: str = ""
    drop: tuple[str, ...] = ()  # glob patterns of training-only keys (projector, decoder)
    keep: tuple[str, ...] = ()  # exceptions to ``drop``
    classifier: bool = False  # a classifier in the file belongs to the network
    head_norm: bool = True  # timm's ConvNeXt head norm
    sincos_pos_embed: bool = False  # fixed 2-D sin-cos position embedding
    misfit: Misfit | None = None
    preprocess: Preprocess = Preprocess.imagenet()

    @property
    def branch_is_entry(self) -> bool:
        """Whether each branch is a top-level entry of the file (not a key prefix)."""
        return any("{branch}" in c for c in self.containers)


METHODS: dict[str, TrainingMethod] = {m.name: m for m in (
    # moco-v3 main_moco.py, builder.py: `state_dict` with module.base_encoder.,
    # module.momentum_encoder. and module.predictor.; the encoders' head.N (ViT) / fc.N (ResNet)
    # is the projector. Linear-eval files: `state_dict` with module. and a head/fc classifier.
    # convert_to_deit.py output: `model` with bare names.
    TrainingMethod(
        "mocov3", "mocov3", ("state_dict", "model"),
        branches=("base_encoder", "momentum_encoder"),
        branch_doc="which encoder of a pre-training checkpoint to load",
        nested="{branch}.", drop=("{head}.*",), keep=("{head}.weight", "{head}.bias"),
        classifier=True, sincos_pos_embed=True,
    ),
    # dino main_dino.py: a bare backbone, or teacher/student holding backbone. and head. (the
    # DINO head), the student (and a ResNet teacher) under module.
    TrainingMethod(
        "dino", "dino", ("{branch}",), branches=("teacher", "student"),
        branch_doc="which network of a full training checkpoint to load", nested="backbone.",
    ),
    # mae main_pretrain.py: `model` with decoder_* and mask_token next to the encoder.
    TrainingMethod(
        "mae", "mae", ("model",), drop=("decoder*", "mask_token"),
        misfit=Misfit(("fc_norm.weight",), (), "a fine-tuned MAE model (fc_norm and classifier)",
                      "mae_ft"),
    ),
    # mae main_finetune.py: `model`, patch tokens pooled into fc_norm, head kept.
    TrainingMethod(
        "mae_ft", "mae_ft", ("model",), classifier=True,
        misfit=Misfit(("norm.weight",), ("fc_norm.weight",),
                      "a pre-trained MAE encoder (final norm, no fc_norm)", "mae"),
    ),
    # msn msn_train.py: target_encoder/encoder under module. with a projector fc.; prototypes at
    # the top level.
    TrainingMethod(
        "msn", "msn", ("{branch}",), branches=("target_encoder", "encoder"),
        branch_doc="which encoder of a training checkpoint to load", drop=("fc.*",),
    ),
    # ConvNeXt-V2 fcmae.py, utils.remap_checkpoint_keys: `model` with encoder. (a MinkowskiEngine
    # network: *.kernel tensors, ln/linear wrappers, [1, C] biases and GRN parameters) next to
    # proj, decoder, mask_token and pred. The encoder ends at stage 4, with no norm.
    TrainingMethod("fcmae", "fcmae", ("model",), nested="encoder.", head_norm=False),
)}
