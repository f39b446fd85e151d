"""The feature pass: every model forward once per batch, its layers tapped and reduced.

The result of one batch is a :class:`FeatureBatch` that the pass hands to every sink; nothing in
it calls back. Taps stay attached for the whole pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from repsim.layers import LayerTap, reduce_output

if TYPE_CHECKING:
    import torch

    from repsim.models.base import Preprocess
    from repsim.run.device import DeviceSettings
    from repsim.run.plan import ModelPlan


@dataclass
class FeatureBatch:
    """One batch of one split, as every sink receives it.

    ``features[model][layer]``: ``[n, D]`` float32 in the model's (or group's) reduction, on the
    engine's device. ``raw[model][layer]``: the tapped outputs (float32, on the run's device),
    for the feature cache's extra reductions and the streaming observers. ``examples``: the
    dataset indices of the batch, in order; ``positions`` their places in the split's sampled
    order (global across ranks); ``labels`` on the host.
    """

    split: str
    index: int
    examples: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    features: dict[str, dict[str, torch.Tensor]]
    raw: dict[str, dict[str, torch.Tensor]]
    info: Mapping[str, Mapping[str, Any]]

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def observe_info(plan: ModelPlan) -> dict[str, Any]:
    """What streaming observers are told of a model: prefix tokens, family, patch grid."""
    embed = getattr(plan.loaded.module, "patch_embed", None)
    grid, patch = getattr(embed, "grid_size", None), getattr(embed, "patch_size", None)
    return {"num_prefix_tokens": plan.loaded.num_prefix_tokens, "family": plan.loaded.family,
            "grid_size": tuple(grid) if grid is not None else None,
            "patch_size": tuple(patch) if patch is not None else None}


class FeaturePass:
    """Forwards of every model on one batch: taps, autocast, reductions to float32."""

    def __init__(self, models: Mapping[str, ModelPlan], transforms: Sequence[Preprocess],
                 extra_layers: Mapping[str, Sequence[str]], settings: DeviceSettings) -> None:
        self.models = dict(models)
        self.transforms = list(transforms)
        self.settings = settings
        self.taps = {label: LayerTap(plan.loaded, [*plan.layers, *(
            x for x in extra_layers.get(label, ()) if x not in plan.layers)])
            for label, plan in self.models.items()}
        self.info = {label: observe_info(plan) for label, plan in self.models.items()}

    @contextmanager
    def attached(self) -> Iterator[FeaturePass]:
        with ExitStack() as stack:
            for tap in self.taps.values():
                stack.enter_context(tap.attached())
            yield self

    def __call__(self, split: str, index: int, inputs: Sequence[torch.Tensor],
                 labels: torch.Tensor, examples: torch.Tensor,
                 positions: torch.Tensor | None = None) -> FeatureBatch:
        import torch

        engine = self.settings.engine_device
        features: dict[str, dict[str, torch.Tensor]] = {}
        raw: dict[str, dict[str, torch.Tensor]] = {}
        for label, plan in self.models.items():
            x = inputs[self.transforms.index(plan.loaded.preprocess)]
            with self.settings.autocast():
                out = self.taps[label].run(x)
            # Half-precision outputs of autocast become float32 once, here: every metric,
            # cache and observer sees float32 (means over tokens are not taken in bf16).
            raw[label] = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
                          for k, v in out.items()}
            features[label] = {
                layer: reduce_output(raw[label][layer], plan.reduce_for(layer),
                                     plan.loaded.num_prefix_tokens,
                                     f"model '{label}', layer '{layer}'").to(engine)
                for layer in plan.layers}
        if positions is None:
            positions = torch.arange(len(examples))
        return FeatureBatch(split, index, examples, positions, labels, features, raw, self.info)
