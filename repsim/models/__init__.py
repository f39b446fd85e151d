"""Models: what a builder returns, and the built-in builders."""

from repsim.models.base import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, Preprocess

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LoadedModel", "Preprocess"]
