"""Official self-supervised checkpoints → timm / torchvision backbones, loaded exactly.

What each training method's files hold (containers, prefixes, dropped keys) is read from
:data:`repsim.models.methods.METHODS`; this module holds the torch code: reading, converting,
exact loading and the messages when a file does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repsim.errors import CheckpointError, RecipeError
from repsim.models.base import LoadedModel, Preprocess
from repsim.models.builtin import check_input_size
from repsim.models.checkpoints import Checkpoint, log, log_reading, read_checkpoint
from repsim.models.methods import DDP_PREFIX, METHODS
from repsim.models.zoo import ENTRIES, ZooEntry, ZooParams

# safetensors metadata written by `repsim convert`
META_MODEL = "repsim_model"
META_SOURCE = "repsim_source"
META_PARAMS = "repsim_params"


@dataclass
class Extracted:
    """The backbone's weights under target names, and everything left out on purpose."""

    state: dict[str, torch.Tensor]
    layout: str
    dropped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    branch: str | None = None


def build_official(entry: ZooEntry, params: ZooParams) -> LoadedModel:
    """Read the checkpoint, convert its keys, build the backbone and load it exactly."""
    started = time.perf_counter()
    log_reading(entry.name, Path(params.checkpoint))
    ckpt = read_checkpoint(params.checkpoint)
    branch = getattr(params, "branch", None)
    explicit = "branch" in params.model_fields_set
    overrides = dict(params.arch_overrides)
    if META_MODEL in ckpt.metadata:
        extracted, overrides = _from_converted(entry, ckpt, branch if explicit else None, overrides)
    else:
        extracted = extract(entry, ckpt, branch, explicit)
    classes = _head_classes(entry, extracted.state)
    # The skeleton on the meta device: no random init to pay for, since every tensor is then
    # assigned from the file (a ViT-L initialises in seconds, and would hold two copies).
    with torch.device("meta"):
        module = _create(entry, classes, overrides)
    preprocess = _preprocess(entry, params, overrides, module)
    filled = _load_exact(entry, module, extracted.state, ckpt.path, overrides)
    log.info("%s: loaded %d tensors from %s in %.1f s", entry.name, len(extracted.state),
             extracted.layout, time.perf_counter() - started)
    provenance: dict[str, Any] = {
        "model": entry.name,
        "checkpoint": str(ckpt.path),
        "checkpoint_bytes": ckpt.path.stat().st_size,
        "published_at": entry.url,
        "layout": extracted.layout,
        "branch": extracted.branch,
        "arch": ("torchvision:" if entry.arch == "resnet50" else "timm:") + entry.arch,
        "arch_kwargs": {**entry.kwargs, **overrides, "num_classes": classes or 0},
        "loaded_keys": len(extracted.state),
        "file_dtypes": sorted({str(v.dtype).removeprefix("torch.")
                               for v in extracted.state.values()}),
        "dropped_keys": extracted.dropped,
        "ignored_entries": extracted.ignored,
        "missing_keys": filled,
        "preprocess": preprocess.describe(),
    }
    return LoadedModel(
        module, preprocess, name=entry.name,
        num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 0)),
        family=entry.family, provenance=provenance,
    )


def official_structure(entry: ZooEntry, params: ZooParams) -> LoadedModel:
    """The entry's network and transform without its weights, on the current device.

    The file is not read, except the header of a `repsim convert` output, which records the
    architecture's size. A classifier, whose size only the weights tell, is left out.
    """
    overrides = dict(params.arch_overrides) or _converted_overrides(Path(params.checkpoint))
    module = _create(entry, None, overrides)
    return LoadedModel(module, _preprocess(entry, params, overrides, module), name=entry.name,
                       num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 0)),
                       family=entry.family, provenance={"model": entry.name})


def _preprocess(entry: ZooEntry, params: ZooParams, overrides: dict[str, Any],
                module: nn.Module) -> Preprocess:
    """The override, or the method's evaluation transform at the network's input size
    (``arch_overrides.img_size`` scales resize and crop alike); refused if the network cannot
    take its crop."""
    if params.preprocess is not None:
        preprocess = params.preprocess.build()
    else:
        preprocess = entry.training.preprocess
        size = overrides.get("img_size")
        size = size[0] if isinstance(size, (list, tuple)) else size
        if size is not None and preprocess.crop and preprocess.resize:
            preprocess = dataclasses.replace(
                preprocess, resize=math.floor(size * preprocess.resize / preprocess.crop),
                crop=size)
    check_input_size(module, preprocess, f"'{entry.name}'", "arch_overrides.img_size")
    return preprocess


# ------------------------------------------------------------------ finding the backbone's keys


def extract(entry: ZooEntry, ckpt: Checkpoint, branch: str | None, explicit: bool) -> Extracted:
    """Pick the backbone out of an official file and rename it to timm / torchvision keys."""
    data, path, method = ckpt.data, ckpt.path, entry.training
    names = [c.format(branch=branch) for c in method.containers]
    container = next((c for c in names if isinstance(data.get(c), dict)), None)
    if container is None:
        others = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
        if others:
            raise CheckpointError(
                f"checkpoint '{path}' has none of the entries {names} where a {entry.method} "
                f"checkpoint keeps its weights, and is not a bare state dict either (top-level "
                f"entries: {', '.join(map(str, list(data)[:8]))}). Is it the file for model "
                f"'{entry.name}' ({entry.checkpoint})?"
            )
        if explicit and method.branch_is_entry:
            raise CheckpointError(
                f"branch '{branch}' was requested, but checkpoint '{path}' is a bare backbone "
                "state dict (one network only). Use the full training checkpoint to choose a "
                "branch, or drop `branch`."
            )
        state, dropped, ignored, where = dict(data), [], [], "bare state dict"
    else:
        state = {k: v for k, v in data[container].items() if isinstance(v, torch.Tensor)}
        # Top-level weight tensors outside the network (MSN's prototypes) are dropped weights;
        # anything else (optimizer, args, the other branch, a 0-d best_acc1) is bookkeeping.
        dropped = [k for k, v in data.items() if k != container and _is_weight(v)]
        ignored = [k for k, v in data.items() if k != container and not _is_weight(v)]
        ignored += [f"{container}/{k}" for k, v in data[container].items()
                    if not isinstance(v, torch.Tensor)]
        where = f"'{container}'"
    prefix = DDP_PREFIX if state and all(k.startswith(DDP_PREFIX) for k in state) else ""
    selected = _select(entry, {k[len(prefix):]: v for k, v in state.items()}, branch, path)
    kept, note, used_branch = _CONVERTERS[method.converter](entry, selected, branch, explicit, path)
    # DINO and MSN keep each branch in its own top-level entry; MoCo-v3 uses key prefixes.
    used_branch = branch if container == branch else used_branch
    layout = f"{where}, prefix '{prefix}' ({note})" if prefix else f"{where} ({note})"
    return Extracted(kept, layout, dropped + [prefix + k for k in selected.dropped], ignored,
                     used_branch)


def _is_weight(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0


@dataclass
class Selected:
    """The backbone's keys of a method's layout; ``nested`` is the backbone's prefix in a training
    checkpoint (stripped), ``""`` in a file that holds the backbone alone."""

    state: dict[str, torch.Tensor]
    dropped: list[str]
    nested: str


def _select(entry: ZooEntry, state: dict[str, torch.Tensor], branch: str | None, path: Path
            ) -> Selected:
    """Keep the backbone: the keys under the method's nested prefix (if the file has it), minus
    its training-only keys."""
    method, head = entry.training, _head_key(entry)
    nested, dropped = "", []
    prefixes = tuple(method.nested.format(branch=b) for b in method.branches) or (method.nested,)
    if method.nested and any(k.startswith(prefixes) for k in state):
        nested = method.nested.format(branch=branch)
        dropped = [k for k in state if not k.startswith(nested)]
        state = {k[len(nested):]: v for k, v in state.items() if k.startswith(nested)}
        if not state:
            raise CheckpointError(f"checkpoint '{path}' has no '{branch}' encoder.")
    drop = [p.format(head=head) for p in method.drop]
    keep = [p.format(head=head) for p in method.keep]
    gone = [k for k in state if any(fnmatchcase(k, p) for p in drop)
            and not any(fnmatchcase(k, p) for p in keep)]
    kept = {k: v for k, v in state.items() if k not in gone}
    return Selected(kept, dropped + [nested + k for k in gone], nested)


def _head_key(entry: ZooEntry) -> str:
    return "fc" if entry.arch == "resnet50" else "head"


# A converter finishes a method's selected keys: the state under target names, a note for the
# provenance's layout, and the branch it loaded where the keys tell (MoCo-v3's prefixes).
Converted = tuple[dict[str, torch.Tensor], str, "str | None"]
Converter = Callable[[ZooEntry, Selected, "str | None", bool, Path], Converted]
_CONVERTERS: dict[str, Converter] = {}


def _converter(name: str) -> Callable[[Converter], Converter]:
    """Register a converter under the name a :class:`~repsim.models.methods.TrainingMethod` uses."""

    def register(fn: Converter) -> Converter:
        _CONVERTERS[name] = fn
        return fn

    return register


@_converter("mocov3")
def _mocov3(entry: ZooEntry, sel: Selected, branch: str | None, explicit: bool, path: Path
            ) -> Converted:
    if sel.nested:
        return sel.state, f"MoCo-v3 pre-training checkpoint, {branch}", branch
    if explicit:
        raise CheckpointError(
            f"branch '{branch}' was requested, but checkpoint '{path}' holds one network only "
            "(no base_encoder/momentum_encoder keys: a linear-eval or converted file). Drop "
            "`branch`."
        )
    kind = ("MoCo-v3 linear-classification checkpoint, classifier kept"
            if f"{_head_key(entry)}.weight" in sel.state else "backbone only")
    return sel.state, kind, None


@_converter("dino")
def _dino(entry: ZooEntry, sel: Selected, branch: str | None, explicit: bool, path: Path
          ) -> Converted:
    if sel.nested:
        return sel.state, f"DINO training checkpoint, {branch} backbone, DINO head dropped", None
    return sel.state, "DINO backbone", None


@_converter("mae")
def _mae(entry: ZooEntry, sel: Selected, branch: str | None, explicit: bool, path: Path
         ) -> Converted:
    return sel.state, "MAE encoder, decoder dropped" if sel.dropped else "MAE encoder", None


@_converter("mae_ft")
def _mae_ft(entry: ZooEntry, sel: Selected, branch: str | None, explicit: bool, path: Path
            ) -> Converted:
    return sel.state, "MAE fine-tuned model, fc_norm and classifier kept", None


@_converter("msn")
def _msn(entry: ZooEntry, sel: Selected, branch: str | None, explicit: bool, path: Path
         ) -> Converted:
    return sel.state, "MSN encoder, projector fc dropped", None


@_converter("fcmae")
def _fcmae(entry: ZooEntry, sel: Selected, branch: str | None, explicit: bool, path: Path
           ) -> Converted:
    state = sel.state
    note = ("FCMAE checkpoint, encoder kept, proj/decoder/mask_token/pred dropped" if sel.nested
            else "ConvNeXt-V2 in timm layout")
    if any(k.startswith("downsample_layers.") for k in state):
        state = _convnext_to_timm(_sparse_to_dense(state, path))
        note += "; sparse kernels made dense, keys renamed to timm"
    return state, note, None


def _sparse_to_dense(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """MinkowskiEngine tensors → the dense ConvNeXt-V2 layout (as the authors' remap does it).

    ``MinkowskiConvolution.kernel`` is ``[k*k, in, out]``, ``MinkowskiDepthwiseConvolution.kernel``
    ``[k*k, C]``; the flattened kernel index runs over (x, y), hence the final transpose.
    """
    out: dict[str, torch.Tensor] = {}
    for key, v in state.items():
        parts = key.split(".")
        if parts[-1] == "kernel":
            ks = math.isqrt(v.shape[0])
            if ks * ks != v.shape[0] or v.ndim not in (2, 3):
                raise CheckpointError(
                    f"checkpoint '{path}': sparse kernel '{key}' has shape {list(v.shape)}, not "
                    "[k*k, in, out] or [k*k, channels]; the file is not a ConvNeXt-V2 FCMAE "
                    "checkpoint."
                )
            if v.ndim == 3:
                w = v.permute(2, 1, 0).reshape(v.shape[2], v.shape[1], ks, ks).transpose(3, 2)
            else:
                w = v.permute(1, 0).reshape(v.shape[1], 1, ks, ks).transpose(3, 2)
            out[".".join(parts[:-1] + ["weight"])] = w.contiguous()
            continue
        if len(parts) > 2 and parts[-2] in ("ln", "linear"):  # MinkowskiLayerNorm / Linear wrappers
            parts.pop(-2)
        if parts[-1] == "bias" and v.ndim == 2:  # Minkowski biases are [1, C]
            v = v.reshape(-1)
        out[".".join(parts)] = v
    return out


# Official dense ConvNeXt-V2 names → timm names (facts from timm's convnext.checkpoint_filter_fn).
_CONVNEXT_RENAMES = (
    (re.compile(r"^downsample_layers\.0\."), "stem."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"^downsample_layers\.(\d+)\."), r"stages.\1.downsample."),
    (re.compile(r"\.dwconv\."), ".conv_dw."),
    (re.compile(r"\.pwconv(\d)\."), r".mlp.fc\1."),
    (re.compile(r"\.grn\.gamma$"), ".mlp.grn.weight"),
    (re.compile(r"\.grn\.beta$"), ".mlp.grn.bias"),
)


def _convnext_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, v in state.items():
        for rx, repl in _CONVNEXT_RENAMES:
            key = rx.sub(repl, key)
        if ".mlp.grn." in key:  # [1, C] (sparse) or [1, 1, 1, C] (dense) → timm's [C]
            v = v.reshape(-1)
        out[key] = v
    return out


def _from_converted(entry: ZooEntry, ckpt: Checkpoint, branch: str | None,
                    overrides: dict[str, Any]) -> tuple[Extracted, dict[str, Any]]:
    """A `repsim convert` output: already in target names; its metadata names model and params."""
    made_for = ckpt.metadata[META_MODEL]
    if made_for != entry.name:
        raise CheckpointError(
            f"checkpoint '{ckpt.path}' was converted for model '{made_for}', not '{entry.name}'. "
            f"Use model '{made_for}', or convert the original file again with --model {entry.name}."
        )
    saved = json.loads(ckpt.metadata.get(META_PARAMS, "{}"))
    if branch is not None and saved.get("branch") not in (None, branch):
        raise CheckpointError(
            f"checkpoint '{ckpt.path}' holds the '{saved['branch']}' network only; branch "
            f"'{branch}' needs the original training checkpoint."
        )
    source = ckpt.metadata.get(META_SOURCE, "?")
    extracted = Extracted(dict(ckpt.data), f"repsim convert output, from '{source}'",
                          branch=saved.get("branch"))
    return extracted, overrides or dict(saved.get("arch_overrides", {}))


def _converted_overrides(path: Path) -> dict[str, Any]:
    """The arch_overrides a `repsim convert` output was made with, read from its header alone;
    none for any other file (a missing or bad one is reported when the run reads it)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - reading the weights reports the bad file with its cause
        return {}
    return dict(json.loads(metadata.get(META_PARAMS, "{}")).get("arch_overrides", {}))


# ------------------------------------------------------------------ building and loading


def _head_classes(entry: ZooEntry, state: dict[str, torch.Tensor]) -> int | None:
    """Classes of a classifier the file carries and the entry keeps (linear-eval, fine-tuned)."""
    weight = state.get(f"{_head_key(entry)}.weight")
    if entry.training.classifier and weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return None


def _create(entry: ZooEntry, classes: int | None, overrides: dict[str, Any]) -> nn.Module:
    """The network, on the current device, in eval mode."""
    try:
        return _create_on_current_device(entry, classes, overrides).eval()
    except TypeError as exc:
        raise RecipeError(
            f"model '{entry.name}': arch_overrides {overrides} are not accepted by {entry.arch} "
            f"({exc})."
        ) from None


def _create_on_current_device(entry: ZooEntry, classes: int | None, overrides: dict[str, Any]
                              ) -> nn.Module:
    if entry.arch == "resnet50":
        from torchvision.models.resnet import Bottleneck, ResNet

        kwargs = dict(overrides)
        module: nn.Module = ResNet(Bottleneck, list(kwargs.pop("layers", [3, 4, 6, 3])), **kwargs)
        module.fc = nn.Linear(module.fc.in_features, classes) if classes else nn.Identity()
        return module
    import timm

    module = timm.create_model(entry.arch, pretrained=False, num_classes=classes or 0,
                               **{**entry.kwargs, **overrides})
    if not entry.training.head_norm:
        module.head.norm = nn.Identity()
    return module


def mocov3_pos_embed(grid: tuple[int, int], dim: int, temperature: float = 10000.0
                     ) -> torch.Tensor:
    """MoCo-v3's fixed position embedding (vits.py), with its zero CLS slot: ``[1, 1+h*w, dim]``."""
    h, w = grid
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32),
                                    torch.arange(h, dtype=torch.float32), indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb])[None]


def _pos_embed_check(entry: ZooEntry, module: nn.Module, state: dict[str, torch.Tensor],
                     path: Path) -> list[str]:
    """MoCo-v3's position embedding is fixed 2-D sin-cos: fill it if absent, and use it to tell
    MoCo-v3 files from others of the same shapes (MoCo-v3 ViT-S has 12 heads, DINO/MSN ViT-S 6)."""
    expected = module.state_dict().get("pos_embed")
    if expected is None or expected.shape[-1] % 4:
        return []
    ref = mocov3_pos_embed(tuple(module.patch_embed.grid_size), expected.shape[-1])
    if ref.shape != expected.shape:
        return []
    have = state.get("pos_embed")
    is_sincos = have is not None and have.shape == ref.shape and torch.allclose(
        have.float(), ref, atol=1e-4)
    if entry.training.sincos_pos_embed:
        if have is None:
            state["pos_embed"] = ref
            return ["pos_embed (filled with MoCo-v3's fixed 2-D sin-cos embedding)"]
        if have.shape == ref.shape and not is_sincos:
            raise CheckpointError(
                f"checkpoint '{path}' does not fit model '{entry.name}': its pos_embed is not "
                "MoCo-v3's fixed 2-D sin-cos embedding, so the file is not a MoCo-v3 checkpoint "
                "(DINO, MSN and MAE ViTs have the same shapes). Use the entry of the method that "
                "produced it (`repsim list models`)."
            )
    elif is_sincos:
        size = {"w": entry.width, "d": entry.depth, "p": entry.patch}
        sincos = [m.name for m in METHODS.values() if m.sincos_pos_embed]
        raise CheckpointError(
            f"checkpoint '{path}' looks like a MoCo-v3 checkpoint (its pos_embed is MoCo-v3's "
            f"fixed 2-D sin-cos embedding), not a {entry.method} one; loading it into "
            f"'{entry.name}' would silently use the wrong architecture. Use "
            f"{' or '.join(_fits(size, sincos))}."
        )
    return []


def _load_exact(entry: ZooEntry, module: nn.Module, state: dict[str, torch.Tensor], path: Path,
                overrides: dict[str, Any]) -> list[str]:
    """Assign ``state`` to the meta-device ``module`` so that every network tensor is a copy of the
    file's (cast to the network's dtype); return what had to be filled in."""
    filled = _pos_embed_check(entry, module, state, path) if entry.family == "vit" else []
    expected = module.state_dict()
    for key in expected:
        # BatchNorm's update counter is unused in eval mode; files from old torch lack it.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
            filled.append(f"{key} (BatchNorm counter, unused in eval)")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(_misfit(entry, path, state, expected, missing, unexpected,
                                      mismatched, overrides))
    # Copy: tensors read with mmap stay backed by the file, which may change or vanish later.
    module.load_state_dict({k: v.to(expected[k].dtype).clone(memory_format=torch.contiguous_format)
                            for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict (non-persistent buffer) was never materialised
        raise CheckpointError(
            f"model '{entry.name}': tensors {left[:4]} are not stored in checkpoints, so "
            f"'{path}' cannot set them; this architecture is not supported by the zoo loader."
        )
    return filled


# ------------------------------------------------------------------ explaining a misfit


def _shape(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """ViT size of a state dict: width, depth, patch (empty if not a ViT)."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return {}
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return {"w": int(proj.shape[0]), "d": max(blocks, default=-1) + 1, "p": int(proj.shape[-1])}


def _describe(state: dict[str, torch.Tensor]) -> str:
    vit = _shape(state)
    if vit:
        extra = ", global pool + fc_norm" if "fc_norm.weight" in state else ""
        if "head.weight" in state:
            extra += f", classifier of {state['head.weight'].shape[0]} classes"
        return f"a ViT (embed {vit['w']}, depth {vit['d']}, patch {vit['p']}{extra})"
    layers = [len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
              for i in range(1, 5)]
    if any(layers):
        return f"a ResNet with {layers} bottlenecks per stage"
    stages = [len({m.group(1) for k in state
                   if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}) for i in range(4)]
    if any(stages):
        return f"a ConvNeXt with {stages} blocks per stage"
    return f"{len(state)} tensors such as {', '.join(list(state)[:3])}"


def _fits(vit: dict[str, int], methods: Collection[str] = (), depth: bool = True) -> list[str]:
    """Zoo entries of this ViT size (ignoring depth if not ``depth``), those of ``methods``
    first."""
    same = [e for e in ENTRIES if (e.width, e.patch) == (vit["w"], vit["p"])
            and (e.depth == vit["d"] or not depth)]
    same.sort(key=lambda e: e.method not in methods)
    return [e.name for e in same]


def _misfit(entry: ZooEntry, path: Path, state: dict[str, torch.Tensor],
            expected: dict[str, torch.Tensor], missing: list[str], unexpected: list[str],
            mismatched: list[str], overrides: dict[str, Any]) -> str:
    built = entry.arch + (f" with {overrides}" if overrides else "")
    lines = [f"checkpoint '{path}' does not fit model '{entry.name}' ({entry.label}, built as "
             f"{built}):"]
    if mismatched:
        k = mismatched[0]
        lines.append(f"  {len(mismatched)} tensors have other shapes, e.g. '{k}': "
                     f"{list(state[k].shape)} in the file, {list(expected[k].shape)} in the "
                     "network")
    if missing:
        lines.append(f"  {len(missing)} network tensors are not in the file: "
                     f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        lines.append(f"  {len(unexpected)} file tensors have no place in the network (loading "
                     f"would lose them): {', '.join(unexpected[:4])}"
                     f"{' ...' if len(unexpected) > 4 else ''}")
    lines.append(f"The file holds {_describe(state)}.")
    hint = entry.training.misfit
    if hint and all(k in unexpected for k in hint.unexpected) and all(
            k in missing for k in hint.missing):
        lines.append(f"It is {hint.file_is}: use "
                     f"{' or '.join(e.name for e in ENTRIES if e.method == hint.use)}.")
    elif (vit := _shape(state)) and vit != _shape(expected):
        # With a depth override the depth is the user's choice; width and patch still identify.
        fits = _fits(vit, (entry.method,), depth="depth" not in overrides)
        lines.append(f"Entries of that size: {', '.join(fits)}." if fits else
                     "No zoo entry has that size: use the 'timm' entry with the matching arch.")
    elif unexpected and not missing and not mismatched:
        lines.append("The extra tensors are not part of this method's published layout: the "
                     "file may come from another method or a modified training script.")
    lines.append("Fix: pick the entry that matches the file (`repsim list models`); for a "
                 "smaller variant of the same architecture set arch_overrides.")
    return "\n".join(lines)


# ------------------------------------------------------------------ `repsim convert`


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    tensors: int
    bytes: int
    dropped: int


def convert_checkpoint(model: str, checkpoint: Path | str, out: Path | str, **params: Any
                       ) -> ConvertResult:
    """Build ``model`` from ``checkpoint`` and save its backbone as ``out`` (.safetensors).

    The file keeps timm/torchvision names and records the model name and parameters in its
    metadata, so the entry that reads it back builds the same network and refuses other entries.
    """
    from safetensors.torch import save_file

    from repsim.api import build_model

    out = Path(out)
    if out.suffix != ".safetensors":
        raise RecipeError(f"--out '{out}' must end in .safetensors")
    loaded = build_model(model, checkpoint=checkpoint, **params)
    state = {k: v.detach().contiguous() for k, v in loaded.module.state_dict().items()}
    saved = {k: v for k, v in params.items() if k not in ("checkpoint", "preprocess")}
    if loaded.provenance.get("branch"):
        saved["branch"] = loaded.provenance["branch"]
    metadata = {META_MODEL: model, META_SOURCE: Path(checkpoint).name,
                META_PARAMS: json.dumps(saved, default=str)}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=out.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, out)  # never leave a half-written file under the final name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ConvertResult(out, len(state), out.stat().st_size,
                         len(loaded.provenance.get("dropped_keys", [])))
