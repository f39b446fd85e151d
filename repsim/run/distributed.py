"""Scale-out on torch.distributed: one recipe on many processes, the numbers of one process.

Ranks come from the environment that ``torchrun`` (or SLURM's ``srun``) sets. The batch plan is
built once from the seed: the split's sampled examples in order, cut into *units* (whole
estimator minibatches of every streaming metric), and rank r takes units ``r::W`` — no padding,
no example twice, no collective per batch. At the end of a pass every rank's sink states go to
rank 0 once, which merges them in plan order, checks the counters against the plan, and writes
the results. Evaluators marked distributed run on every rank over its share of the feature
cache (``repsim.run.evaluate``); the others run on rank 0 over the merged cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from repsim.errors import RecipeError

if TYPE_CHECKING:
    import torch

    from repsim.run.sinks import Sink

# A file:// URL here replaces env:// (MASTER_ADDR/MASTER_PORT, as torchrun sets them): a shared
# file system as rendezvous.
INIT_METHOD_ENV = "REPSIM_DIST_INIT"


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, else SLURM's
    SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE, else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        size = int(env["WORLD_SIZE"])
        return World(int(env["RANK"]), size, int(env.get("LOCAL_RANK", 0)),
                     int(env.get("LOCAL_WORLD_SIZE", size)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        size = int(env["SLURM_NTASKS"])
        per_node = env.get("SLURM_NTASKS_PER_NODE", str(size)).split("(")[0]
        return World(int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", 0)),
                     int(per_node))
    return World()


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[Any]:
    """The default process group for the run (nccl on CUDA, gloo on the CPU) and a gloo group
    for the few host-side exchanges (fingerprints, sink states); nothing for one process."""
    if not world.distributed:
        yield None
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # nccl's device, and what an evaluator's device "cuda" means
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=os.environ.get(INIT_METHOD_ENV, "env://"),
                            rank=world.rank, world_size=world.size)
    try:
        yield dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    finally:
        dist.destroy_process_group()


def batch_unit(minibatches: Sequence[int], batch_size: int) -> int:
    """Examples per unit of the batch plan: a whole number of minibatches of every streaming
    metric (their least common multiple), or the forward batch if there is none."""
    return math.lcm(*minibatches) if minibatches else batch_size


def rank_positions(n: int, unit: int, world: World) -> list[int]:
    """Positions (in the split's sampled order) of the examples rank r takes: units r::W."""
    units = range(world.rank, -(-n // unit), world.size)
    return [p for u in units for p in range(u * unit, min((u + 1) * unit, n))]


def global_batch_order(n: int, unit: int, minibatch: int, min_batch: int, size: int) -> list[int]:
    """Where each estimator minibatch of the rank-major concatenation of all ranks' minibatches
    belongs in the plan's order: ``order[g]`` is the rank-major index of global minibatch g."""
    units = -(-n // unit)

    def count(u: int) -> int:
        examples = min(unit, n - u * unit)
        return examples // minibatch + (1 if examples % minibatch >= min_batch else 0)

    start: dict[int, int] = {}
    offset = 0
    for r in range(size):
        for u in range(r, units, size):
            start[u] = offset
            offset += count(u)
    return [start[u] + j for u in range(units) for j in range(count(u))]


def check_same(value: str, what: str, group: Any, world: World) -> None:
    """Refuse to run when the ranks disagree on ``value`` (e.g. the recipe's fingerprint)."""
    import torch.distributed as dist

    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value, group=group)
    if len(set(values)) > 1:
        listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise RecipeError(f"the ranks were started with different {what} ({listing}). Start every "
                          "rank with the same recipe and options.")


def gather_to_main(sinks: Sequence[Sink], group: Any, world: World
                   ) -> list[list[dict[str, torch.Tensor]]] | None:
    """Every rank's sink states, on rank 0 (``[rank][sink]``); None elsewhere."""
    import torch.distributed as dist

    mine = [{k: v.cpu() for k, v in s.state_dict().items()} for s in sinks]
    out: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(mine, out, dst=0, group=group)
    return out


def plan_counts(n: int, unit: int, minibatch: int, min_batch: int) -> tuple[int, int]:
    """(minibatches, examples) the estimator takes from the plan: every unit's full minibatches
    and its short last one if it has at least ``min_batch`` examples."""
    batches = examples = 0
    for u in range(-(-n // unit)):
        size = min(unit, n - u * unit)
        full, rest = size // minibatch, size % minibatch
        keep = rest >= min_batch
        batches += full + keep
        examples += full * minibatch + (rest if keep else 0)
    return batches, examples


def merge_ranks(sinks: Sequence[Sink], states: Sequence[Sequence[dict[str, torch.Tensor]]],
                examples: int, unit: int) -> None:
    """Rank 0's sinks become the merge of every rank's (``states[rank][sink]``), in the plan's
    order; the metric sinks' counters are checked against the plan."""
    from repsim.run.sinks import MetricSink

    for i, sink in enumerate(sinks):
        for rank_states in states[1:]:
            sink.merge_state(rank_states[i])
        if isinstance(sink, MetricSink):
            mb, least = sink.minibatch, sink.metric.min_batch_size
            if sink.counts() != plan_counts(examples, unit, mb, least):
                raise RuntimeError(
                    f"metric sink '{sink.name}': the ranks added (minibatches, examples) = "
                    f"{sink.counts()}; the batch plan has {plan_counts(examples, unit, mb, least)}."
                    " A rank's saved state does not belong to this run: delete the run "
                    "directory's cache/ and rerun.")
            sink.reorder_batches(global_batch_order(examples, unit, mb, least, len(states)))


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``repsim ARGV`` as ``nproc`` processes on this machine through torchrun's launcher
    (``torch.distributed.run`` with a standalone rendezvous); returns its exit code. A rank that
    fails takes the others down, and its message is what the user sees."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "repsim", *argv]
    return subprocess.call(cmd)
