"""Choosing layers, hooking them, and reducing their outputs to one vector per example.

A layer is named by its module path in the network (``blocks.3.attn.qkv``), the same names as
``model.named_modules()``. A ``:in`` suffix captures the module's *input* instead of its output
(``blocks.3.norm2:in`` is the residual stream after the attention branch). ``output`` is the
network's own return value (class scores for a classifier).
"""

from __future__ import annotations

import fnmatch
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from repsim.errors import FeatureError, LayerSelectionError
from repsim.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    import torch
    from torch import nn

    from repsim.models.base import LoadedModel

OUTPUT = "output"
INPUT_SUFFIX = ":in"
Reduction = Literal["cls", "gap", "gap_no_cls", "flatten"]
REDUCTIONS: tuple[str, ...] = ("cls", "gap", "gap_no_cls", "flatten")


def natural_key(name: str) -> list[object]:
    """Sort ``blocks.10`` after ``blocks.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def module_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_modules() if name]


class LayerSelector(ABC):
    """Chooses an ordered list of layer names from a model."""

    @abstractmethod
    def select(self, model: LoadedModel) -> list[str]: ...


class GlobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patterns: list[str] = Field(description="shell-style patterns on module paths, e.g. 'blocks.*'")


class GlobSelector(LayerSelector):
    """Module paths matching any pattern, in network order; ``*`` stays within one path segment
    (``blocks.*`` is the blocks, not their sub-modules), ``**`` crosses segments."""

    def __init__(self, params: GlobParams) -> None:
        self.patterns = params.patterns

    @staticmethod
    def _regex(pattern: str) -> re.Pattern[str]:
        out = []
        for part in re.split(r"(\*\*|\*|\?|\[[^\]]*\])", pattern):
            if part == "**":
                out.append(".*")
            elif part == "*":
                out.append(r"[^.]*")
            elif part == "?":
                out.append(r"[^.]")
            elif part.startswith("["):
                out.append(fnmatch.translate(part)[4:-3])
            else:
                out.append(re.escape(part))
        return re.compile("".join(out) + r"\Z")

    def select(self, model: LoadedModel) -> list[str]:
        names = module_names(model.module)
        chosen: list[str] = []
        for pattern in self.patterns:
            suffix = INPUT_SUFFIX if pattern.endswith(INPUT_SUFFIX) else ""
            base = pattern[: -len(suffix)] if suffix else pattern
            if base == OUTPUT:
                hits = [OUTPUT]
            else:
                rx = self._regex(base)
                hits = [n + suffix for n in names if rx.match(n)]
            if not hits:
                raise LayerSelectionError(no_match_message(model, pattern, names))
            chosen.extend(h for h in hits if h not in chosen)
        order = {n: i for i, n in enumerate(names)}
        order[OUTPUT] = len(names)
        return sorted(chosen, key=lambda n: order[n.removesuffix(INPUT_SUFFIX)])


class IndexParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    indices: list[int] | int = Field(
        description="block indices; negative count from the end; an int n means the last n"
    )
    container: str | None = Field(
        None, description="module whose children are indexed; default 'blocks', 'stages' or 'layers'"
    )


class IndexSelector(LayerSelector):
    """timm-style selection of blocks by index (``forward_intermediates(indices=...)``)."""

    def __init__(self, params: IndexParams) -> None:
        self.params = params

    def select(self, model: LoadedModel) -> list[str]:
        names = dict(model.module.named_modules())
        container = self.params.container
        if container is None:
            container = next((c for c in ("blocks", "stages", "layers") if c in names), None)
        if container is None or container not in names:
            raise LayerSelectionError(
                f"model '{model.name}' has no module '{container or 'blocks'}' to index. Set "
                "`container` to the module holding the blocks (see `repsim layers MODEL`)."
            )
        children = [f"{container}.{n}" for n, _ in names[container].named_children()]
        idx = self.params.indices
        wanted = list(range(len(children) - idx, len(children))) if isinstance(idx, int) else idx
        out = []
        for i in wanted:
            if not -len(children) <= i < len(children):
                raise LayerSelectionError(
                    f"index {i} is out of range for '{container}' of model '{model.name}', which "
                    f"has {len(children)} children (valid: {-len(children)} .. {len(children) - 1})."
                )
            out.append(children[i])
        return out


def no_match_message(model: LoadedModel, pattern: str, names: Sequence[str]) -> str:
    top = sorted({n.split(".")[0] for n in names})
    base = pattern.removesuffix(INPUT_SUFFIX)
    parent = base.rsplit(".", 1)[0] if "." in base else ""
    hint = ""
    if parent:
        rx = GlobSelector._regex(parent + ".*")
        near = sorted({n.rsplit(".", 1)[1] for n in names if rx.match(n)}, key=natural_key)
        if near:
            hint = f" Under '{parent}' there are: {', '.join(near[:20])}."
    return (
        f"layer pattern '{pattern}' matches nothing in model '{model.name}'.{hint} Top-level "
        f"modules: {', '.join(top)}. `repsim layers MODEL` lists every layer; '*' matches within "
        "one dotted segment, '**' across segments."
    )


# Named selectors for the layer types of the seeds, on timm ViTs.
_VIT_TYPES = {
    "blocks": (["blocks.*"], "residual stream after each transformer block"),
    "attn_residual": (["blocks.*.norm2:in"], "residual stream after the attention branch (pre-norm2)"),
    "norm1": (["blocks.*.norm1"], "LayerNorm-1 output of each block (seeds Fig. 2)"),
    "attn_qkv": (["blocks.*.attn.qkv"], "MHSA QKV projection of each block (seeds Fig. 2)"),
    "mlp_fc1": (["blocks.*.mlp.fc1"], "MLP FC-1 of each block (seeds Fig. 2)"),
}


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@hookimpl
def register_layer_selectors(register: Register) -> None:
    register("glob", GlobSelector, params=GlobParams,
             summary="module paths matching shell-style patterns ('blocks.*.attn.qkv')")
    register("index", IndexSelector, params=IndexParams,
             summary="blocks by index, timm style; negative indices count from the end")
    for name, (patterns, summary) in _VIT_TYPES.items():
        register(name, _fixed_glob(patterns), params=_NoParams, summary=summary,
                 patterns=patterns)


def _fixed_glob(patterns: list[str]):
    def build(_: BaseModel) -> GlobSelector:
        return GlobSelector(GlobParams(patterns=patterns))

    return build


# ---------------------------------------------------------------- extraction and token reduction


def reduce_output(t: torch.Tensor, how: str, num_prefix_tokens: int, where: str) -> torch.Tensor:
    """Reduce one layer's batch output to ``[B, D]``.

    ``[B, D]``: unchanged. ``[B, T, D]`` tokens: ``cls`` (token 0), ``gap`` (mean of all tokens),
    ``gap_no_cls`` (mean of the non-prefix tokens), ``flatten``. ``[B, C, H, W]`` maps: ``gap``
    (spatial mean) or ``flatten``.
    """
    if how not in REDUCTIONS:
        raise FeatureError(f"{where}: unknown token reduction '{how}'; use one of {REDUCTIONS}.")
    if t.ndim == 2:
        return t
    if how == "flatten":
        return t.reshape(t.shape[0], -1)
    if t.ndim == 3:
        if how == "gap":
            return t.mean(dim=1)
        if num_prefix_tokens < 1:
            raise FeatureError(
                f"{where}: reduction '{how}' needs a CLS token, but the model declares no prefix "
                "tokens. Use reduce = 'gap' or 'flatten' for this model."
            )
        if how == "cls":
            return t[:, 0]
        return t[:, num_prefix_tokens:].mean(dim=1)
    if t.ndim == 4 and how == "gap":
        return t.mean(dim=(2, 3))
    raise FeatureError(
        f"{where}: output of shape {tuple(t.shape)} has no '{how}' reduction (a conv map has no CLS "
        "token). Use reduce = 'gap' (spatial mean) or 'flatten' for this model."
    )


class LayerTap:
    """Forward hooks on chosen layers; ``run(x)`` returns their raw outputs for one batch."""

    def __init__(self, model: LoadedModel, layers: Sequence[str]) -> None:
        self.model = model
        self.layers = list(layers)
        modules = dict(model.module.named_modules())
        for layer in self.layers:
            base = layer.removesuffix(INPUT_SUFFIX)
            if base != OUTPUT and base not in modules:
                raise LayerSelectionError(
                    no_match_message(model, layer, module_names(model.module))
                )
        self._modules = modules
        self._captured: dict[str, torch.Tensor] = {}

    @contextmanager
    def attached(self) -> Iterator[LayerTap]:
        handles = []
        for layer in self.layers:
            base = layer.removesuffix(INPUT_SUFFIX)
            if base == OUTPUT:
                continue
            mod = self._modules[base]
            if layer.endswith(INPUT_SUFFIX):
                handles.append(mod.register_forward_pre_hook(self._pre_hook(layer)))
            else:
                handles.append(mod.register_forward_hook(self._hook(layer)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, layer: str):
        def hook(_m, _inp, out):
            self._captured[layer] = out[0] if isinstance(out, tuple) else out

        return hook

    def _pre_hook(self, layer: str):
        def hook(_m, inp):
            self._captured[layer] = inp[0]

        return hook

    def run(self, x: torch.Tensor, grad: bool = False) -> dict[str, torch.Tensor]:
        """Raw outputs of the tapped layers for one batch; ``grad=True`` keeps the autograd
        graph (for evaluators that train through the model), else inference mode."""
        import torch

        self._captured = {}
        with torch.enable_grad() if grad else torch.inference_mode():
            out = self.model.module(x)
        if OUTPUT in self.layers:
            self._captured[OUTPUT] = out[0] if isinstance(out, tuple) else out
        missing = [layer for layer in self.layers if layer not in self._captured]
        if missing:
            raise LayerSelectionError(
                f"layers {missing} of model '{self.model.name}' were never called in the forward "
                "pass (unused modules, or a fused path that skips them). Select other layers."
            )
        return {layer: self._captured[layer] for layer in self.layers}
