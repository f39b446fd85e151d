"""repsim: compare the internal representations of neural networks, layer by layer.

The package imports nothing heavy; torch is imported where it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from repsim.hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:
    from repsim.api import build_model, compare, similarity

_LAZY = {"similarity": "repsim.api", "compare": "repsim.api", "build_model": "repsim.api",
         "functional": "repsim.functional"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return module if name == "functional" else getattr(module, name)
    raise AttributeError(f"module 'repsim' has no attribute '{name}'")


__all__ = ["__version__", "build_model", "compare", "functional", "hookimpl", "similarity"]
