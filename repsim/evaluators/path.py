"""Path efficiency of fine-tuning (seeds 003 Sec. 2.3, Fig. 14).

For snapshots θ_0 … θ_T of one run and a group G of parameters,

    efficiency(G) = ‖θ_T[G] − θ_0[G]‖ / Σ_t ‖θ_t[G] − θ_{t−1}[G]‖

with ‖·‖ the L2 norm of all of G's entries together: 1 for a straight path, towards 0 for a
wandering one, NaN if G never moves. Groups: every shared parameter (``"all"``), each layer type,
each block, each (block, type). Snapshots are read one at a time (safetensors files are
memory-mapped), so memory holds about three tensors of one parameter at a time.
"""

from __future__ import annotations

import fnmatch
import glob
import math
import re
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from repsim.errors import CheckpointError, FeatureError
from repsim.evaluators._common import figure, json_float, layer_axis, table
from repsim.evaluators.base import EvalContext, Evaluator, EvalResult, FeatureNeeds
from repsim.evaluators.params import PathEfficiencyParams

if TYPE_CHECKING:
    import torch

Snapshot = Union[str, Path, Mapping[str, "torch.Tensor"]]

# A classifier trained from scratch is not part of the pretrained model (timm ViT `head`,
# ConvNeXt `head.fc`, ResNet `fc`, HF `classifier`); BatchNorm statistics are buffers, not
# parameters.
DEFAULT_EXCLUDE = ("head.weight", "head.bias", "head.fc.*", "fc.weight", "fc.bias",
                   "classifier.*", "*running_mean", "*running_var", "*num_batches_tracked")

# Layer type of a parameter: the first pattern that matches its name (re.search).
DEFAULT_LAYER_TYPES = {
    "norm": r"(^|\.)(norm\w*|fc_norm|ln\w*|bn\d*|layer_?norm\w*|batch_?norm\w*|[qk]_norm)\.",
    "attention": r"(^|\.)(attn|attention|self_attn|qkv|[qkv]_proj|out_proj)\.",
    "mlp": r"(^|\.)(mlp|ffn|feed_forward|intermediate|fc\d)\.",
    "embed": r"(^|\.)(patch_embed|pos_embed|cls_token|reg_token|dist_token|mask_token|"
             r"embeddings?|stem)(\.|$)",
    "conv": r"(^|\.)(conv\w*|downsample)\.",
}

# A block is the name up to its first numeric component, extended by `.blocks.<n>` (timm's
# ConvNeXt stages): blocks.3 / layer2.1 / encoder.layer.7 / stages.1.blocks.2.
DEFAULT_BLOCK = r"^((?:[^.]+\.)*?\d+(?:\.blocks\.\d+)?)\."


@dataclass
class PathEfficiency:
    """Efficiency of every group, with the displacement and path length it came from."""

    efficiency: dict[str, float]  # flat keys: see :func:`path_efficiency`
    displacement: dict[str, float]
    path_length: dict[str, float]
    types: list[str]
    blocks: list[str]
    n_snapshots: int
    n_params: int
    parameters: list[str]
    excluded: list[str] = field(default_factory=list)


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def find_snapshots(spec: str | Sequence[str]) -> list[str]:
    """Files of one run: a list (kept in order), a glob or a folder of ``*.safetensors`` (both in
    natural order, so ``epoch_2`` comes before ``epoch_10``)."""
    if not isinstance(spec, str):
        return [str(s) for s in spec]
    p = Path(spec)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [Path(f) for f in glob.glob(spec)]
    if not files and p.is_file():
        files = [p]
    if not files:
        raise CheckpointError(f"no snapshot matches '{spec}' (a folder of *.safetensors, a glob, "
                              "or a list of files).")
    return [str(f) for f in sorted(files, key=lambda f: _natural(f.name))]


class _Reader:
    """Tensors of one snapshot by name: a mapping, or a memory-mapped safetensors file."""

    def __init__(self, snap: Snapshot, stack: ExitStack) -> None:
        if isinstance(snap, Mapping):
            self.name = "<memory>"
            self._map: Mapping[str, Any] | None = snap
            self._shapes = {k: tuple(v.shape) for k, v in snap.items()}
            return
        from safetensors import safe_open

        path = Path(snap)
        self.name = str(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"snapshot '{path}': only .safetensors files are read (no "
                                  "pickle); convert with safetensors.torch.save_file(state_dict).")
        if not path.is_file():
            raise CheckpointError(f"snapshot '{path}' does not exist.")
        self._map = None
        self._file = stack.enter_context(safe_open(str(path), framework="pt"))
        self._shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def get(self, key: str) -> torch.Tensor:
        t = self._map[key] if self._map is not None else self._file.get_tensor(key)
        return t.detach().double()


def parameter_groups(keys: Sequence[str], layer_types: Mapping[str, str] | None = None,
                     block_pattern: str = DEFAULT_BLOCK
                     ) -> tuple[dict[str, list[int]], list[str], list[str]]:
    """The groups of parameters ``keys``: ``"all"``, each layer type (the first ``layer_types``
    regex that matches, else ``"other"``), each block and each block × type
    (``"blocks.3/attention"``), as indices into ``keys``; with the types found (in
    ``layer_types`` order) and the blocks found (natural order)."""
    types = dict(DEFAULT_LAYER_TYPES if layer_types is None else layer_types)
    type_res = {t: re.compile(p) for t, p in types.items()}
    block_re = re.compile(block_pattern)
    groups: dict[str, list[int]] = {"all": list(range(len(keys)))}
    found_types: list[str] = []
    found_blocks: list[str] = []
    for i, key in enumerate(keys):
        kind = next((t for t, r in type_res.items() if r.search(key)), "other")
        m = block_re.search(key)
        names = [kind] + ([m.group(1), f"{m.group(1)}/{kind}"] if m else [])
        for name in names:
            groups.setdefault(name, []).append(i)
        if kind not in found_types:
            found_types.append(kind)
        if m and m.group(1) not in found_blocks:
            found_blocks.append(m.group(1))
    order = [t for t in [*types, "other"] if t in found_types]
    return groups, order, sorted(found_blocks, key=_natural)


def path_efficiency_report(snapshots: Sequence[Snapshot], *, reference: Snapshot | None = None,
                           exclude: Sequence[str] = DEFAULT_EXCLUDE,
                           layer_types: Mapping[str, str] | None = None,
                           block_pattern: str = DEFAULT_BLOCK) -> PathEfficiency:
    """Path efficiency with its parts; see :func:`path_efficiency`."""
    import torch

    if len(snapshots) < 2:
        raise FeatureError(f"path efficiency needs at least 2 snapshots (θ_0 and θ_T); got "
                           f"{len(snapshots)}.")
    with ExitStack() as stack:
        first = _Reader(snapshots[0], stack)
        shapes = dict(first.shapes)
        if reference is not None:
            ref = _Reader(reference, stack).shapes
            shapes = {k: s for k, s in shapes.items() if ref.get(k) == s}
        excluded = sorted(k for k in first.shapes if k not in shapes
                          or any(fnmatch.fnmatchcase(k, pat) for pat in exclude))
        keys = [k for k in first.shapes if k not in excluded]
        steps = torch.zeros(len(keys), len(snapshots) - 1, dtype=torch.float64)  # ‖Δθ_t‖² per key
        prev = first
        for t, snap in enumerate(snapshots[1:]):
            cur = _Reader(snap, stack)
            for i, key in enumerate(keys):
                if cur.shapes.get(key) != shapes[key]:
                    raise CheckpointError(f"snapshot {t + 1} ({cur.name}) lacks '{key}' or has "
                                          f"another shape than snapshot 0 ({first.name}).")
                steps[i, t] = (cur.get(key) - prev.get(key)).pow(2).sum()
            prev = cur
        total = torch.tensor([float((prev.get(k) - first.get(k)).pow(2).sum()) for k in keys],
                             dtype=torch.float64)
    if not keys:
        raise FeatureError("no parameter is shared by the snapshots (after exclusions "
                           f"{list(exclude)}).")

    groups, order, found_blocks = parameter_groups(keys, layer_types, block_pattern)
    eff, disp, length = {}, {}, {}
    for name, idx in groups.items():
        ix = torch.tensor(idx)
        disp[name] = math.sqrt(float(total[ix].sum()))
        length[name] = float(steps[ix].sum(0).sqrt().sum())
        eff[name] = disp[name] / length[name] if length[name] > 0 else float("nan")
    return PathEfficiency(eff, disp, length, order, found_blocks,
                          len(snapshots), int(sum(math.prod(shapes[k]) for k in keys)), keys,
                          excluded)


def path_efficiency(snapshots: Sequence[Snapshot], **options: Any) -> dict[str, float]:
    """‖θ_T − θ_0‖ / Σ_t ‖θ_t − θ_{t−1}‖ of a fine-tuning run.

    ``snapshots``: state dicts (name → tensor) or ``.safetensors`` paths, θ_0 first. Parameters
    count if every snapshot has them with θ_0's shape, ``reference`` (a pretrained checkpoint, if
    given) has them with that shape, and no ``exclude`` glob matches (default: the new head and
    BatchNorm buffers). Keys: ``"all"``; each layer type (``"attention"``, ``"mlp"``, ``"norm"``,
    ``"embed"``, ``"conv"``, ``"other"``, from ``layer_types`` regexes); each block
    (``"blocks.3"``); each block and type (``"blocks.3/attention"``).
    """
    return path_efficiency_report(snapshots, **options).efficiency


class PathEfficiencyEvaluator(Evaluator):
    """Path efficiency of one or several fine-tuning runs, from files or from memory."""

    params: PathEfficiencyParams
    needs = FeatureNeeds(splits=())  # reads checkpoints only

    def __init__(self, params: PathEfficiencyParams | None = None,
                 name: str | None = "path_efficiency",
                 runs: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None) -> None:
        """``runs``: in-memory snapshots per run label (from Python), instead of files."""
        super().__init__(params or PathEfficiencyParams(), name)
        self.memory_runs = dict(runs or {})

    def _runs(self, ctx: EvalContext) -> dict[str, list[Snapshot]]:
        p = self.params
        files: dict[str, str | list[str]] = dict(p.runs)
        if p.snapshots is not None:
            files["run"] = p.snapshots
        for model in p.models:
            snaps = ctx.model_info(model).get("provenance", {}).get("snapshots")
            if not snaps:
                raise FeatureError(
                    f"evaluator '{self.name}': model '{model}' records no fine-tuning snapshots "
                    "in its provenance; give the snapshot files with `snapshots` or `runs`.")
            files[model] = list(snaps)
        out: dict[str, list[Snapshot]] = {k: list(find_snapshots(v)) for k, v in files.items()}
        out.update({k: list(v) for k, v in self.memory_runs.items()})
        if not out:
            raise FeatureError(f"evaluator '{self.name}': no snapshots; set `snapshots` (files, "
                               "a glob or a folder), `runs`, or `models`.")
        return out

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        p = self.params
        exclude = DEFAULT_EXCLUDE if p.exclude is None else tuple(p.exclude)
        runs = self._runs(ctx)
        reports = {label: path_efficiency_report(
            snaps, reference=p.reference, exclude=exclude, layer_types=p.layer_types,
            block_pattern=p.block_pattern or DEFAULT_BLOCK) for label, snaps in runs.items()}
        types = list(dict.fromkeys(t for r in reports.values() for t in r.types))
        summary, per_block = [], []
        tensors: dict[str, torch.Tensor] = {}
        for label, r in reports.items():
            for key in ["all", *r.types]:
                summary.append([label, key, r.efficiency[key], r.displacement[key],
                                r.path_length[key]])
            rows = [[r.efficiency[b], *[r.efficiency.get(f"{b}/{t}", float("nan")) for t in types]]
                    for b in r.blocks]
            per_block.extend([label, b, *row] for b, row in zip(r.blocks, rows))
            tensors[f"per_block/{label}"] = torch.tensor(
                rows, dtype=torch.float64).reshape(len(r.blocks), 1 + len(types))
        protocol = {
            "evaluator": self.name,
            "definition": "||theta_T - theta_0|| / sum_t ||theta_t - theta_(t-1)||, L2 over all "
                          "entries of a group",
            "runs": {label: {"snapshots": [s if isinstance(s, str) else "<memory>"
                                           for s in runs[label]],
                             "n_snapshots": r.n_snapshots, "n_params": r.n_params,
                             "n_tensors": len(r.parameters), "excluded": r.excluded}
                     for label, r in reports.items()},
            "reference": p.reference, "exclude": list(exclude),
            "layer_types": dict(DEFAULT_LAYER_TYPES if p.layer_types is None else p.layer_types),
            "block_pattern": p.block_pattern or DEFAULT_BLOCK,
            "tensor_layout": "per_block/<run>: [block, (all, *types)]",
        }

        def plot():
            panels = ["all", *types]
            fig, axes = figure(len(panels), width=3.6)
            for ax, kind in zip(axes, panels):
                for label, r in reports.items():
                    key = (lambda b: b) if kind == "all" else (lambda b, k=kind: f"{b}/{k}")
                    ys = [r.efficiency.get(key(b), float("nan")) for b in r.blocks]
                    ax.plot(range(1, len(ys) + 1), ys, marker="o", label=label)
                ax.set_title(f"path efficiency: {kind}")
                ax.set_ylim(0, 1.05)
                layer_axis(ax, {label: r.blocks for label, r in reports.items()})
                ax.set_xlabel("block")
            axes[0].set_ylabel("||θ_T − θ_0|| / Σ||θ_t − θ_t−1||")
            axes[0].legend(fontsize=7)
            return fig

        return EvalResult(
            protocol=protocol,
            tables={"efficiency": table(["run", "group", "efficiency", "displacement",
                                         "path_length"], summary),
                    "per_block": table(["run", "block", "all", *types], per_block)},
            tensors=tensors,
            data={label: {"efficiency": {k: json_float(v) for k, v in r.efficiency.items()},
                          "blocks": r.blocks, "types": r.types}
                  for label, r in reports.items()},
            figures={"efficiency_per_block": plot},
        )
