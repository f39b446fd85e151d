"""What a dataset part returns: indexed images in [0, 1] with integer labels."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ImageDataset(ABC):
    """A fixed, ordered split of labelled images.

    ``__getitem__`` returns ``(image, label)`` with ``image`` a float ``[C, H, W]`` tensor in
    [0, 1]; each model's own :class:`~repsim.models.Preprocess` resizes and normalises it.
    ``split_of`` names the datasets's other splits (``"train"``) so evaluators can ask for them.
    """

    name: str
    split: str
    classes: list[str]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...

    @abstractmethod
    def with_split(self, split: str) -> ImageDataset:
        """The same dataset, another split (raises DataError naming the known splits)."""

    def describe(self) -> dict[str, object]:
        return {"dataset": self.name, "split": self.split, "examples": len(self),
                "classes": len(self.classes)}


def split_conflict(recipe_split: str, params: Mapping[str, Any]) -> str | None:
    """The problem when a recipe's ``data.split`` and ``data.params.split`` differ, else None.

    Only a ``data.split`` the recipe wrote can conflict: its default must not count.
    """
    if "split" not in params or params["split"] == recipe_split:
        return None
    return (f"data.split = {recipe_split!r} and data.params.split = {params['split']!r} name "
            "different splits. Give the split once: remove `split` from data.params (or from "
            "[data]), or make both the same.")
