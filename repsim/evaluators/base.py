"""What an evaluator declares, what it is given, and what it returns.

An evaluator runs after the data pass. It reads what it declared: cached features
(:class:`FeatureNeeds`), and through :class:`Access` the similarity results, the built models on
the run's device, or the dataset's splits (to train a network). It never reaches back into the
orchestrator: everything it may read comes through :class:`EvalContext`.
"""

from __future__ import annotations

import time
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
    # Where this process stands in a distributed run (0, 1, None in one process). Only an
    # evaluator marked ``distributed`` runs on every rank; the others see rank 0 of 1.
    rank: int
    world_size: int
    group: Any  # the torch.distributed process group of the ranks (gloo), or None

    def layers(self, model: str) -> list[str]:
        """Selected layers of a model, in network order."""

    def groups(self, model: str) -> dict[str, list[str]]:
        """Layer groups of a model (recipe ``[layers]`` names → layers)."""

    def features(self, model: str, layer: str, split: str = "eval",
                 reduction: str | None = None) -> torch.Tensor:
        """Cached ``[N, D]`` features of one layer (float32)."""

    def labels(self, split: str = "eval") -> torch.Tensor:
        """``[N]`` integer labels of a split, in extraction order."""

    def local_features(self, model: str, layer: str, split: str = "eval",
                       reduction: str | None = None) -> torch.Tensor:
        """This rank's share of :meth:`features` (all of it in one process): the rows whose
        global indices :meth:`local_index` gives, in that order."""

    def local_labels(self, split: str = "eval") -> torch.Tensor:
        """This rank's share of :meth:`labels`, rows as in :meth:`local_features`."""

    def local_index(self, split: str = "eval") -> torch.Tensor:
        """``[n]`` global example indices (ascending) of this rank's rows: every example of the
        split is on exactly one rank."""

    def progress(self, total: int, unit: str) -> Progress:
        """A progress reporter for ``total`` steps of a long evaluator (silent off rank 0)."""

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
    # True: in a distributed run ``evaluate`` runs on every rank (over the local_* shares, with
    # collectives on ``ctx.group``) and rank 0's result is written; False: on rank 0 alone.
    # An evaluator that reads similarity results always runs on rank 0 alone. An instance may
    # set it from its parameters (prediction_agreement: only its probe scores are distributed).
    distributed: bool = False

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        self.params = params
        self.name = name or type(self).__name__.lower()

    def describe(self) -> str:
        """One line saying what the evaluator will do (shown when it starts)."""
        doc = (type(self).__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split()) or self.name

    @abstractmethod
    def evaluate(self, ctx: EvalContext) -> EvalResult: ...


class Progress:
    """Periodic progress lines of a long evaluator: steps done, time so far, an estimate of the
    time left (from the mean time per step), and a last line when it is done.

    ``say`` prints a line (a no-op for silent progress); a line comes at most every
    ``every`` seconds, so a quick evaluator prints only its last line.
    """

    every = 10.0  # seconds between lines

    def __init__(self, say: Callable[[str], None], name: str, total: int, unit: str) -> None:
        self.say, self.name, self.total, self.unit = say, name, total, unit
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, steps: int = 1) -> None:
        self.done += steps
        now = time.monotonic()
        elapsed = now - self.start
        if self.done >= self.total:
            self.say(f"evaluator '{self.name}': {self.done} {self.unit} done in "
                     f"{_duration(elapsed)}")
        elif now - self.last >= self.every:
            self.last = now
            left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            self.say(f"evaluator '{self.name}': {self.done}/{self.total} {self.unit} "
                     f"({100 * self.done // self.total} %), {_duration(elapsed)} so far, "
                     f"about {_duration(left)} left")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no step done yet
        return "?"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes else f"{seconds:.1f} s"


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


def first_of_ranks(message: str | None, group: Any) -> str | None:
    """The first rank's ``message`` that is not None (``message`` itself in one process). A
    distributed evaluator skips an item on every rank or on none, so the ranks' collectives stay
    in step."""
    if group is None:
        return message
    import torch.distributed as dist

    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, message, group=group)
    return next((m for m in messages if m is not None), None)
