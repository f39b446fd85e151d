"""Every built-in evaluator's computation as a plain function of tensors."""

from __future__ import annotations

__all__: list[str] = []
