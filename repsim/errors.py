"""User-facing errors.

Every exception here is a *user* error: its message names the offending thing (file, field, layer,
plugin) and says what would fix it. The CLI prints such messages without a traceback and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RepsimError(Exception):
    """Base class of user errors."""


class RecipeError(RepsimError):
    """A recipe file is malformed or names something invalid."""


class MissingFileError(RecipeError):
    """A file or folder a part needs is absent: ``path`` names it, so a preflight can list it
    with the others instead of stopping at it."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class UnknownPartError(RepsimError, KeyError):
    """A name that no registry holds."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicatePartError(RepsimError):
    """Two providers registered the same name."""


class LayerSelectionError(RepsimError):
    """A layer selector matched nothing, or named a layer that does not exist."""


class FeatureError(RepsimError):
    """Features are unusable: NaN/Inf, mismatched example counts, too few examples."""


class DataError(RepsimError):
    """A dataset could not be read."""


class CheckpointError(RepsimError):
    """A checkpoint file is missing, truncated, or does not fit the architecture."""


class DeviceError(RepsimError):
    """A device that was asked for is absent, or it ran out of memory."""


class MetricUndefinedWarning(UserWarning):
    """A similarity value is undefined (e.g. constant features); the value is NaN and noted."""

