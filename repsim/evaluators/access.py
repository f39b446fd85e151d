"""Model and data access for evaluators that train or look inside a network.

:class:`ModelAccess` is a built model on the run's device: its module, its layer outputs for
inputs of the evaluator's choice (with gradients if asked), and train/eval mode. :class:`DataAccess`
is one split of a dataset, preprocessed for a model, with targets of any shape (class indices,
detection annotations), and a seeded loader over it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from repsim.data.base import ImageDataset
    from repsim.models.base import LoadedModel, Preprocess
    from repsim.run.device import DeviceSettings


@dataclass
class ModelAccess:
    """A built model on the run's device."""

    label: str
    loaded: LoadedModel
    settings: DeviceSettings

    @property
    def module(self) -> nn.Module:
        return self.loaded.module

    @property
    def device(self) -> torch.device:
        return self.settings.device

    @property
    def preprocess(self) -> Preprocess:
        return self.loaded.preprocess

    def extract(self, x: torch.Tensor, layers: Sequence[str], grad: bool = False
                ) -> dict[str, torch.Tensor]:
        """Raw outputs of ``layers`` (module paths, ``:in`` suffix, ``output``) for inputs
        ``x``, under the run's autocast; ``grad=True`` keeps the graph for training."""
        from repsim.layers import LayerTap

        tap = LayerTap(self.loaded, layers)
        with tap.attached(), self.settings.autocast():
            return tap.run(x.to(self.device, non_blocking=True), grad=grad)

    @contextmanager
    def mode(self, train: bool) -> Iterator[nn.Module]:
        """The module in train (or eval) mode for the block; its previous mode after."""
        before = self.module.training
        self.module.train(train)
        try:
            yield self.module
        finally:
            self.module.train(before)


class DataAccess:
    """One split of a dataset: ``(input, target)`` pairs, inputs preprocessed by ``preprocess``."""

    def __init__(self, dataset: ImageDataset, preprocess: Preprocess | None = None) -> None:
        self.dataset = dataset
        self.preprocess = preprocess

    @property
    def split(self) -> str:
        return self.dataset.split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[index]
        return (self.preprocess(image) if self.preprocess is not None else image), target

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0,
               num_workers: int = 0, drop_last: bool = False, collate_fn: Any = None,
               pin_memory: bool = False) -> DataLoader:
        """A DataLoader over the split; shuffling is seeded, so two loaders agree."""
        import torch
        from torch.utils.data import DataLoader

        return DataLoader(self, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None,
                          num_workers=num_workers, drop_last=drop_last, collate_fn=collate_fn,
                          pin_memory=pin_memory)
