"""What an evaluator declares, what it is given, and what it returns.

An evaluator runs after the data pass. It reads what it declared: cached features
(:class:`FeatureNeeds`), and through :class:`Access` the similarity results, the built models on
the run's device, or the dataset's splits (to train a network). It never reaches back into the
orchestrator: everything it may read comes through :class:`EvalContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from repsim.evaluators.access import DataAccess, ModelAccess
    from repsim.metrics.results import SimilarityResult


@dataclass(frozen=True)
class FeatureNeeds:
    """Which cached features an evaluator reads.

    ``splits``: dataset splits to extract (``"eval"`` is the recipe's split; others by name, e.g.
    ``"train"``; ``()`` for an evaluator that reads no features, only checkpoints or similarity
    results). ``reductions``: token reductions to cache for every selected layer (None: the
    model's own). ``output``: the models' return values (class scores) too. ``layers``: layer or
    group names whose features to cache (None: every selected layer; a name a model lacks selects
    nothing of it), so a k-NN on the blocks does not cache every layer type on the train split.
    """

    splits: tuple[str, ...] = ("eval",)
    reductions: tuple[str, ...] | None = None
    output: bool = False
    layers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Access:
    """What an evaluator reads besides cached features, which also says when it runs.

    ``similarity``: similarity results of the run (it runs after the metrics; the others right
    after the pass). ``models``: the built models on the run's device
    (:meth:`EvalContext.model`), e.g. to fine-tune or to read weights. ``data``: splits of the
    dataset with their targets (:meth:`EvalContext.data`), e.g. to train a network end to end.
    """

    similarity: bool = False
    models: bool = False
    data: tuple[str, ...] = ()


class EvalContext(Protocol):
    """Read-only view of a finished data pass.

    Asking for something the run did not produce raises ``KeyError`` (a missing model, layer,
    split, output or similarity result) or :class:`~repsim.errors.FeatureError` (a reduction a
    layer cannot give, e.g. ``cls`` of a CNN map); evaluators skip such items with a note.
    :class:`repsim.evaluators.context.InMemoryContext` implements this over tensors in memory.
    """

    models: list[str]  # labels of the recipe's models, in recipe order
    seed: int

    def layers(self, model: str) -> list[str]:
        """Selected layers of a model, in network order."""

    def groups(self, model: str) -> dict[str, list[str]]:
        """Layer groups of a model (recipe ``[layers]`` names → layers)."""

    def features(self, model: str, layer: str, split: str = "eval",
                 reduction: str | None = None) -> torch.Tensor:
        """Cached ``[N, D]`` features of one layer (float32)."""

    def labels(self, split: str = "eval") -> torch.Tensor:
        """``[N]`` integer labels of a split, in extraction order."""

    def output(self, model: str, split: str = "eval") -> torch.Tensor:
        """``[N, C]`` model outputs (requires ``FeatureNeeds(output=True)``)."""

    def similarity(self, metric: str, model_a: str, model_b: str) -> SimilarityResult:
        """A similarity result computed in this run."""

    def model_info(self, model: str) -> dict[str, Any]:
        """Registry name, parameters, family, provenance of a model."""

    def classes(self) -> list[str]: ...

    def model(self, model: str) -> ModelAccess:
        """The built model on the run's device (requires ``Access(models=True)``)."""

    def data(self, split: str = "eval") -> DataAccess:
        """A split of the dataset with its targets (requires ``split`` in ``Access.data``)."""


@dataclass
class EvalResult:
    """Tables, tensors, JSON data and figures of one evaluator; the run writes them atomically."""

    protocol: dict[str, Any]
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Callable[[], Figure]] = field(default_factory=dict)


class Evaluator(ABC):
    """An analysis of what representations do for transfer (k-NN, probes, agreement, ...)."""

    needs: FeatureNeeds = FeatureNeeds()
    access: Access = Access()

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        self.params = params
        self.name = name or type(self).__name__.lower()

    @abstractmethod
    def evaluate(self, ctx: EvalContext) -> EvalResult: ...


@dataclass(frozen=True)
class ObserveSpec:
    """Raw layer outputs a streaming evaluator watches during the data pass.

    The run picks the layers of every model with the layer selector ``selector`` (a registry
    name, e.g. ``"attn_maps"`` or ``"blocks"``) and ``params``; a model the selector finds nothing
    in is skipped with a note. Those outputs go only to the evaluator, never to the metrics.
    """

    selector: str
    params: Mapping[str, Any] = field(default_factory=dict)
    splits: tuple[str, ...] = ("eval",)


class StreamingEvaluator(Evaluator):
    """An evaluator that sees raw outputs (tokens, attention maps) batch by batch during the pass.

    For statistics that need the unreduced outputs, which are too large to cache (ViT-B attention
    maps are 1.9 MB per image and block). State must be additive tensors returned by ``state``, so
    an interrupted run resumes with it.
    """

    observes: ObserveSpec

    @abstractmethod
    def observe(self, split: str, model: str, layer: str, raw: torch.Tensor,
                labels: torch.Tensor, info: Mapping[str, Any]) -> None:
        """One batch of one layer. ``info``: ``num_prefix_tokens``, ``family``, ``grid_size``,
        ``patch_size`` (the last two for ViTs, else None)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Everything observed so far, as tensors (saved with the run's resumable state)."""

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...
