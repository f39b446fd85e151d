"""Datasets: the base class and the built-in datasets."""

from repsim.data.base import ImageDataset

__all__ = ["ImageDataset"]
