"""The feature cache: what evaluators and full-batch metrics read after the pass.

One module owns the key format. The writer is a sink that saves one safetensors shard per batch
(``cache/SPLIT/RANK-BATCH.safetensors``; a model extracted later is added to the shards) holding
``MODEL|LAYER|REDUCTION`` features in the cache dtype, ``MODEL|output|raw`` model outputs,
``labels``, ``examples`` (dataset indices) and ``positions`` (places in the split's sampled
order); the reader concatenates the shards of every
rank in the order of their positions, so it sees one dataset in global order, as float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.errors import FeatureError
from repsim.layers import OUTPUT, reduce_output
from repsim.run.sinks import Sink

if TYPE_CHECKING:
    import torch

    from repsim.run.features import FeatureBatch

LABELS = "labels"
EXAMPLES = "examples"
POSITIONS = "positions"
RAW = "raw"


def feature_key(model: str, layer: str, reduction: str) -> str:
    return f"{model}|{layer}|{reduction}"


def output_key(model: str) -> str:
    return feature_key(model, OUTPUT, RAW)


@dataclass
class CachePlan:
    """What to cache for one split: (model, layer, reduction) keys, and whether outputs."""

    keys: set[tuple[str, str, str]] = field(default_factory=set)
    outputs: bool = False
    own: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, layer) -> reduction

    def __bool__(self) -> bool:
        return bool(self.keys) or self.outputs


class CacheWriter(Sink):
    """Writes the planned features of every batch to one shard (state: none; the shards are)."""

    def __init__(self, directory: Path, plan: CachePlan, num_prefix_tokens: Mapping[str, int],
                 dtype: torch.dtype, rank: int = 0) -> None:
        super().__init__("cache")
        self.directory = Path(directory)
        self.rank = rank
        self.plan = plan
        self.num_prefix_tokens = dict(num_prefix_tokens)
        self.dtype = dtype

    def update(self, batch: FeatureBatch) -> None:
        import torch

        from repsim.metrics.engine import check_features

        shard: dict[str, torch.Tensor] = {LABELS: batch.labels, EXAMPLES: batch.examples,
                                          POSITIONS: batch.positions}
        on_cuda = False
        for model, layer, reduction in sorted(self.plan.keys):
            if model not in batch.raw:
                continue  # a model extracted before: its features are in the shard already
            where = f"model '{model}', layer '{layer}'"
            try:
                t = reduce_output(batch.raw[model][layer], reduction,
                                  self.num_prefix_tokens[model], where)
            except FeatureError:
                if reduction == self.plan.own.get((model, layer)):
                    raise
                continue  # an extra reduction an evaluator asked for that this layer lacks
            on_cuda |= t.is_cuda
            shard[feature_key(model, layer, reduction)] = check_features(t, where).to(
                self.dtype).to("cpu", non_blocking=True)
        if self.plan.outputs:
            for model, raw in batch.raw.items():
                out = raw[OUTPUT]
                on_cuda |= out.is_cuda
                shard[output_key(model)] = out.reshape(out.shape[0], -1).float().to(
                    "cpu", non_blocking=True)
        if on_cuda:
            torch.cuda.synchronize()  # the non-blocking copies above must land before the write
        target = self.directory / f"{self.rank:03d}-{batch.index:06d}.safetensors"
        if target.exists():  # models added to a run: the others' features stay in the shard
            kept = {k: v for k, v in store.read_tensors(target).items()
                    if "|" in k and k.split("|", 1)[0] not in batch.raw
                    and k.split("|", 1)[0] in self.num_prefix_tokens}
            shard = kept | shard
        store.write_tensors(target, shard)

    def compute(self) -> FeatureReader:
        return FeatureReader(self.directory.parent)


# Shard files a reader keeps open for its life: opening every shard again for each key (its
# header parsed each time) was most of the evaluators' time on the embedded study (9 ms a key
# over 45 shards, 0.6 ms with the files kept open). Past this many, a shard is opened per read,
# so a cache of ImageNet's thousands of shards does not pile up open files.
_KEEP_OPEN = 1024


class FeatureReader:
    """Reads a run's feature cache: one split's shards, concatenated in order, as float32."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self._keys: dict[str, list[str]] = {}
        self._order: dict[str, torch.Tensor] = {}
        self._shard_lists: dict[str, list[Path]] = {}
        self._open: dict[Path, Any] = {}

    def _shards(self, split: str) -> list[Path]:
        if split not in self._shard_lists:
            shards = sorted((self.cache_dir / split).glob("[0-9]*.safetensors"))
            if not shards:
                cached = sorted(p.name for p in self.cache_dir.iterdir() if p.is_dir()) \
                    if self.cache_dir.exists() else []
                raise KeyError(f"no cached features for split '{split}'; cached splits: "
                               f"{cached}")
            self._shard_lists[split] = shards
        return self._shard_lists[split]

    def _file(self, shard: Path) -> Any:
        """The shard's open safetensors file (kept for the reader's life, up to _KEEP_OPEN)."""
        fh = self._open.get(shard)
        if fh is None:
            from safetensors import safe_open

            fh = safe_open(str(shard), framework="pt")
            if len(self._open) < _KEEP_OPEN:
                self._open[shard] = fh
        return fh

    def keys(self, split: str) -> list[str]:
        if split not in self._keys:
            self._keys[split] = list(self._file(self._shards(split)[0]).keys())
        return self._keys[split]

    def read(self, split: str, key: str, what: str) -> torch.Tensor:
        import torch

        if key not in self.keys(split):
            raise KeyError(f"{what} was not cached for split '{split}': an evaluator must ask "
                           "for it in its FeatureNeeds.")
        out = self._cat(split, key)[self._global_order(split)]
        return out.float() if torch.is_floating_point(out) else out

    def _cat(self, split: str, key: str) -> torch.Tensor:
        import torch

        return torch.cat([self._file(shard).get_tensor(key) for shard in self._shards(split)])

    def _global_order(self, split: str) -> torch.Tensor:
        """Where each example of the shards (in file order) goes: by position."""
        if split not in self._order:
            self._order[split] = self._cat(split, POSITIONS).argsort(stable=True)
        return self._order[split]

    def features(self, model: str, layer: str, reduction: str, split: str) -> torch.Tensor:
        what = f"features of model '{model}', layer '{layer}', reduction '{reduction}'"
        key = feature_key(model, layer, reduction)
        if key not in self.keys(split) and any(
                k.startswith(f"{model}|{layer}|") for k in self.keys(split)):
            raise FeatureError(f"{what}: this layer's output has no '{reduction}' reduction.")
        return self.read(split, key, what)

    def labels(self, split: str) -> torch.Tensor:
        return self.read(split, LABELS, "labels")

    def output(self, model: str, split: str) -> torch.Tensor:
        return self.read(split, output_key(model), f"outputs of model '{model}'")
