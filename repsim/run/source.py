"""The batch source: seeded sampling, the DataLoader, and the copy of inputs to the device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from repsim.data.base import ImageDataset
    from repsim.models.base import Preprocess


def sample_indices(n: int, seed: int, limit: int | None) -> list[int]:
    """The examples of a split in seeded random order, the first ``limit`` of them (all if None)."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order if limit is None else order[:limit]


class _Preprocessed:
    """A dataset view returning each distinct model transform of an image, its label, its
    dataset index and its position in the split's sampled order."""

    def __init__(self, dataset: ImageDataset, indices: list[int], positions: list[int],
                 transforms: list[Preprocess]) -> None:
        self.dataset, self.indices, self.positions = dataset, indices, positions
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image, label = self.dataset[self.indices[i]]
        return (*(t(image) for t in self.transforms), label, self.indices[i], self.positions[i])


@dataclass
class HostBatch:
    """One batch as the source yields it: inputs (one per distinct transform) on the device."""

    index: int
    inputs: list[torch.Tensor]
    labels: torch.Tensor
    examples: torch.Tensor  # dataset indices
    positions: torch.Tensor  # places in the split's sampled order (global across ranks)


class BatchSource:
    """Batches of ``batch_size`` consecutive examples of ``indices`` (dataset indices; their
    ``positions`` in the split's sampled order default to 0, 1, ...), preprocessed by workers.

    On CUDA the loader pins host memory and inputs are copied without blocking, so the copy of
    the next batch overlaps the forwards of this one; workers persist across epochs and prefetch.
    """

    def __init__(self, dataset: ImageDataset, indices: Sequence[int],
                 transforms: Sequence[Preprocess], batch_size: int, device: torch.device,
                 num_workers: int = 0, prefetch: int = 2,
                 positions: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.positions = list(positions) if positions is not None else list(range(len(indices)))
        self.transforms = list(transforms)
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers
        self.prefetch = prefetch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def batches(self, start: int = 0) -> Iterator[HostBatch]:
        """Batches from number ``start`` on (a resumed pass skips what it already saw)."""
        import torch
        from torch.utils.data import DataLoader

        workers = self.num_workers
        skip = start * self.batch_size
        loader = DataLoader(
            _Preprocessed(self.dataset, self.indices[skip:], self.positions[skip:],
                          self.transforms),
            batch_size=self.batch_size, shuffle=False, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=self.prefetch if workers > 0 else None)
        for b, (*inputs, labels, examples, positions) in enumerate(loader, start):
            yield HostBatch(b, [x.to(self.device, non_blocking=True) for x in inputs],
                            torch.as_tensor(labels), torch.as_tensor(examples),
                            torch.as_tensor(positions))
