"""Weighted k-NN classification in the DINO protocol (Caron et al. 2021, ``eval_knn.py``).

Features are L2-normalised; each query's k most cosine-similar training examples vote for their
label with weight exp(sim / T); the class with the largest total wins. Similarities are formed
one block at a time (queries × training examples) so memory stays bounded for any train size;
the block GEMM dominates the time (``benchmarks/bench_knn.py``).

Neighbours are ordered by similarity, then by example index: a total order, so lists cut into
blocks, or into the shares of several processes (:func:`knn_neighbours` with a process group),
merge into exactly the lists of one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from repsim.errors import FeatureError
from repsim.evaluators._common import (MISSING, cached_layers, figure, json_float, layer_axis,
                                       resolve_layers, resolve_models, table)
from repsim.evaluators.base import (EvalContext, Evaluator, EvalResult, FeatureNeeds,
                                   first_of_ranks)
from repsim.evaluators.params import KnnParams

if TYPE_CHECKING:
    import torch

QUERY_CHUNK = 1024  # queries per block: large enough for an efficient GEMM, small enough to bound


def _blocks(n_query: int, n_train: int, k: int, memory_mb: float) -> tuple[int, int]:
    """Block sizes (queries, training examples) whose float32 similarities fit ``memory_mb``.

    Whole training set per block when it fits with at least 64 queries; otherwise the training
    set is cut too and the per-block top-k lists are merged (never fewer than k per block).
    """
    budget = max(int(memory_mb * 2**20) // 4, 1)
    q = max(1, min(n_query, QUERY_CHUNK, max(budget // n_train, 64)))
    t = max(k, min(n_train, budget // q))
    return q, t


def _topk(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row and their columns; among equal values at the k-th place
    the lowest columns (``torch.topk`` picks any of them)."""
    if k >= sim.shape[1]:  # the whole row: nothing is left out
        return sim.topk(k, dim=1)
    vals, cols = sim.topk(k + 1, dim=1)
    # Rows whose first value left out equals the k-th: a stable sort takes the lowest columns.
    cut = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)
    vals, cols = vals[:, :k].contiguous(), cols[:, :k].contiguous()
    if cut.numel():
        v, c = sim[cut].sort(dim=1, descending=True, stable=True)
        vals[cut], cols[cut] = v[:, :k], c[:, :k]
    return vals, cols


def _merge(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each row, ordered by similarity descending, then example index
    ascending: a total order, so the result does not depend on how the candidates were cut."""
    by_index = idx.argsort(dim=1, stable=True)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    best = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, best), idx.gather(1, best)


def _search(train_n: torch.Tensor, index: torch.Tensor, queries: torch.Tensor, k: int,
            memory_mb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``min(k, n_train)`` similarities and global indices of L2-normalised queries against
    L2-normalised training rows whose ``index`` ascends, block by block."""
    import torch

    n_query, n_train = queries.shape[0], train_n.shape[0]
    k = min(k, n_train)
    vals_out = torch.empty(n_query, k, dtype=train_n.dtype, device=train_n.device)
    idx_out = torch.empty(n_query, k, dtype=torch.long, device=train_n.device)
    if n_query == 0 or k == 0:
        return vals_out, idx_out
    q_size, t_size = _blocks(n_query, n_train, k, memory_mb)
    # One preallocated buffer for all similarity blocks: no reallocation per block.
    buf = torch.empty(q_size * t_size, dtype=train_n.dtype, device=train_n.device)
    for q0 in range(0, n_query, q_size):
        q = queries[q0:q0 + q_size]
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        for t0 in range(0, n_train, t_size):
            t = train_n[t0:t0 + t_size]
            sim = torch.mm(q, t.T, out=buf[: q.shape[0] * t.shape[0]].view(q.shape[0], -1))
            vals, cols = _topk(sim, min(k, t.shape[0]))  # the last block may be short
            idx = index[t0:t0 + t.shape[0]][cols]
            if best is not None:  # merge this block's top-k into the running top-k
                vals, idx = torch.cat([best[0], vals], 1), torch.cat([best[1], idx], 1)
            best = _merge(vals, idx, k)
        assert best is not None
        vals_out[q0:q0 + q_size], idx_out[q0:q0 + q_size] = best
    return vals_out, idx_out


def knn_neighbours(train_x: torch.Tensor, test_x: torch.Tensor | None, k: int = 20, *,
                   index: torch.Tensor | None = None, memory_mb: float = 256.0,
                   group: Any = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The k nearest training examples of every query by cosine similarity: ``[N_test, k]``
    similarities (descending) and training indices, ties broken by the lower index.

    One process (``group`` None): ``train_x`` is the whole training set, ``index`` its example
    indices (default ``0..N-1``). Distributed: every rank of ``group`` passes its share of the
    training set with the global indices of its rows; rank 0 passes the queries (other ranks
    ``None``), which are broadcast in chunks; each rank searches its share, and rank 0 merges the
    ranks' lists in the same total order, so it gets what one process gets from the whole set
    (the others get ``(None, None)``). Computed in the dtype of ``train_x`` after L2
    normalisation.
    """
    import torch
    import torch.nn.functional as F

    if train_x.ndim != 2 or (test_x is not None and (
            test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1])):
        raise FeatureError(f"k-NN needs [N, D] features of equal width; got train "
                           f"{tuple(train_x.shape)} and test "
                           f"{None if test_x is None else tuple(test_x.shape)}.")
    if not torch.is_floating_point(train_x):
        train_x = train_x.float()
    device = train_x.device
    index = torch.arange(train_x.shape[0]) if index is None else index.long()
    if index.numel() > 1 and bool((index.diff() <= 0).any()):
        order = index.argsort()  # ascending indices: the lowest column is the lowest index
        train_x, index = train_x[order.to(device)], index[order]
    index = index.to(device)
    train_n = F.normalize(train_x, dim=1)
    test_n = None if test_x is None else F.normalize(test_x.to(device, train_x.dtype), dim=1)
    n_train = train_x.shape[0]
    if group is None:
        if test_n is None:
            raise FeatureError("k-NN in one process needs the queries.")
        _enough(n_train, k)
        return _search(train_n, index, test_n, k, memory_mb)
    return _sharded(train_n, index, test_n, k, memory_mb, group)


def _enough(n_train: int, k: int) -> None:
    if not 1 <= k <= n_train:
        raise FeatureError(f"k = {k} needs at least k training examples; there are {n_train}.")


def _sharded(train_n: torch.Tensor, index: torch.Tensor, test_n: torch.Tensor | None, k: int,
             memory_mb: float, group: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`knn_neighbours` across the ranks of ``group`` (host tensors on the wire)."""
    import torch
    import torch.distributed as dist

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    meta = torch.tensor([train_n.shape[0], *(test_n.shape if rank == 0 and test_n is not None
                                             else (0, 0))])
    dist.all_reduce(meta, group=group)  # training examples of all ranks; rank 0's query shape
    n_train, n_query, dim = (int(v) for v in meta)
    _enough(n_train, k)
    if rank == 0 and test_n is None:
        raise FeatureError("k-NN: rank 0 needs the queries.")
    merged_vals, merged_idx = [], []
    pad_idx = torch.iinfo(torch.long).max  # never chosen: its similarity is -inf
    for q0 in range(0, n_query, QUERY_CHUNK):
        rows = min(QUERY_CHUNK, n_query - q0)
        q = test_n[q0:q0 + rows].cpu().contiguous() if rank == 0 else \
            torch.empty(rows, dim, dtype=train_n.dtype)
        dist.broadcast(q, 0, group=group)
        vals, idx = _search(train_n, index, q.to(train_n.device), k, memory_mb)
        short = k - vals.shape[1]  # a share with fewer than k examples
        vals = torch.cat([vals.cpu(), vals.new_full((rows, short), float("-inf"), device="cpu")], 1)
        idx = torch.cat([idx.cpu(), idx.new_full((rows, short), pad_idx, device="cpu")], 1)
        gathered = [(torch.empty_like(vals), torch.empty_like(idx)) for _ in range(size)] \
            if rank == 0 else None
        dist.gather(vals, [g[0] for g in gathered] if gathered else None, dst=0, group=group)
        dist.gather(idx, [g[1] for g in gathered] if gathered else None, dst=0, group=group)
        if gathered is not None:
            best = _merge(torch.cat([g[0] for g in gathered], 1),
                          torch.cat([g[1] for g in gathered], 1), k)
            merged_vals.append(best[0])
            merged_idx.append(best[1])
    if rank != 0:
        return None, None
    if not merged_vals:
        return torch.empty(0, k, dtype=train_n.dtype), torch.empty(0, k, dtype=torch.long)
    return torch.cat(merged_vals), torch.cat(merged_idx)


def knn_vote(similarities: torch.Tensor, labels: torch.Tensor, num_classes: int,
             temperature: float = 0.07) -> torch.Tensor:
    """DINO's weighted vote: each neighbour adds exp(sim / T) to its class (``labels``: the
    neighbours' labels, ``[N, k]``); the largest total wins, ties to the lower class. Summed
    on the CPU in neighbour order, so the same lists give the same votes on any device."""
    import torch

    sims = similarities.cpu()
    votes = torch.zeros(sims.shape[0], num_classes, dtype=sims.dtype)
    votes.scatter_add_(1, labels.cpu().long(), (sims / temperature).exp_())
    return votes.argmax(1)


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                k: int = 20, temperature: float = 0.07, *, num_classes: int | None = None,
                memory_mb: float = 256.0) -> torch.Tensor:
    """Predicted labels ``[N_test]`` (on the device of ``train_x``) of DINO's weighted k-NN
    classifier.

    ``train_x``/``test_x`` are ``[N, D]`` features (any float dtype; computed in the dtype of
    ``train_x`` after L2 normalisation), ``train_y`` integer labels. Neighbours at equal
    similarity are taken in order of their index; ties between classes with equal vote totals go
    to the lower class index.
    """
    n_train = train_x.shape[0]
    if train_y.shape != (n_train,):
        raise FeatureError(f"{n_train} training features but labels of shape "
                           f"{tuple(train_y.shape)}.")
    sims, idx = knn_neighbours(train_x, test_x, k, memory_mb=memory_mb)
    assert sims is not None and idx is not None
    train_y = train_y.cpu().long()
    n_cls = int(num_classes if num_classes is not None else int(train_y.max()) + 1)
    return knn_vote(sims, train_y[idx.cpu()], n_cls, temperature).to(train_x.device)


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, k: int = 20, temperature: float = 0.07, *,
                 memory_mb: float = 256.0) -> float:
    """Top-1 accuracy of DINO's weighted k-NN (cosine similarity, votes exp(sim / T))."""
    if test_y.shape != (test_x.shape[0],):
        raise FeatureError(f"{test_x.shape[0]} test features but labels of shape "
                           f"{tuple(test_y.shape)}.")
    n_cls = int(max(int(train_y.max()), int(test_y.max()))) + 1
    pred = knn_predict(train_x, train_y, test_x, k, temperature, num_classes=n_cls,
                       memory_mb=memory_mb)
    return float((pred.cpu() == test_y.cpu().long()).double().mean())


class KnnEvaluator(Evaluator):
    """20-NN accuracy per block for every token reduction (seeds 001 Fig. 3, 003 Fig. 12)."""

    params: KnnParams
    distributed = True  # each rank searches its share of the memory bank

    def __init__(self, params: KnnParams | None = None, name: str | None = "knn") -> None:
        super().__init__(params or KnnParams(), name)
        p = self.params
        self.needs = FeatureNeeds(splits=(p.train_split, p.eval_split),
                                  reductions=tuple(p.reductions),
                                  layers=cached_layers(p.layers, p.group))

    def describe(self) -> str:
        p = self.params
        where = f"layers {p.layers}" if p.layers else f"group '{p.group}'" if p.group else \
            "every selected layer"
        return (f"weighted {p.k}-NN (T = {p.temperature}) of '{p.eval_split}' against the "
                f"'{p.train_split}' memory bank, {where}, reductions {', '.join(p.reductions)}")

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        """In a distributed run every rank searches its share of the training split (queries
        broadcast by rank 0); rank 0 merges, votes and returns the result."""
        import torch

        p = self.params
        main = ctx.rank == 0
        train_y, eval_y = ctx.labels(p.train_split), ctx.labels(p.eval_split)
        n_cls = int(max(int(train_y.max()), int(eval_y.max()))) + 1
        rows: list[list[Any]] = []
        notes: list[str] = []
        data: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        layers_of: dict[str, list[str]] = {}
        for model in resolve_models(ctx, p.models, self.name):
            layers = resolve_layers(ctx, model, p.layers, self.name, p.group)
            if not layers:
                notes.append(f"{model}: skipped, no layer group '{p.group}'")
                continue
            layers_of[model] = layers
        progress = ctx.progress(sum(map(len, layers_of.values())) * len(p.reductions),
                                "layer × reduction items")
        index = ctx.local_index(p.train_split)
        for model, layers in layers_of.items():
            acc = torch.full((len(layers), len(p.reductions)), float("nan"), dtype=torch.float64)
            for i, layer in enumerate(layers):
                for j, red in enumerate(p.reductions):
                    try:
                        train_x = ctx.local_features(model, layer, p.train_split, red)
                        eval_x = ctx.features(model, layer, p.eval_split, red) if main else None
                        missing = None
                    except MISSING as exc:
                        missing = f"{model} {layer} {red}: skipped ({exc})"
                    missing = first_of_ranks(missing, ctx.group)
                    if missing is not None:
                        notes.append(missing)
                        progress.update()
                        continue
                    sims, idx = knn_neighbours(train_x.to(p.device), eval_x, p.k,
                                               index=index, memory_mb=p.memory_mb,
                                               group=ctx.group)
                    progress.update()
                    if not main:
                        continue
                    assert sims is not None and idx is not None
                    pred = knn_vote(sims, train_y.long()[idx.cpu()], n_cls, p.temperature)
                    acc[i, j] = (pred == eval_y.cpu().long()).double().mean()
                    rows.append([model, layer, i + 1, red, float(acc[i, j])])
            tensors[f"accuracy/{model}"] = acc
            data[model] = {red: {layer: json_float(acc[i, j]) for i, layer in enumerate(layers)}
                           for j, red in enumerate(p.reductions)}
        protocol = {
            "evaluator": self.name, "protocol": "DINO weighted k-NN (Caron et al. 2021)",
            "k": p.k, "temperature": p.temperature, "similarity": "cosine (L2-normalised)",
            "vote_weight": "exp(similarity / temperature)",
            "ties": "neighbours: similarity descending, then lower example index; classes: "
                    "lowest index",
            "train_split": p.train_split, "eval_split": p.eval_split,
            "n_train": int(train_y.numel()), "n_eval": int(eval_y.numel()),
            "num_classes": n_cls, "reductions": list(p.reductions), "group": p.group,
            "memory_mb": p.memory_mb, "tensor_layout": "accuracy/<model>: [layer, reduction]",
            "notes": notes,
        }

        def plot():
            fig, axes = figure(len(p.reductions))
            for ax, (j, red) in zip(axes, enumerate(p.reductions)):
                for model, layers in layers_of.items():
                    acc = tensors[f"accuracy/{model}"][:, j]
                    ax.plot(range(1, len(layers) + 1), acc.numpy(), marker="o", label=model)
                layer_axis(ax, layers_of)
                ax.set_title(f"{p.k}-NN accuracy, {red}")
                ax.set_ylabel("top-1 accuracy")
                ax.legend(fontsize=7)
            return fig

        return EvalResult(
            protocol=protocol,
            tables={"knn": table(["model", "layer", "position", "reduction", "accuracy"], rows)},
            tensors=tensors, data={"accuracy": data, "layers": layers_of},
            figures={"accuracy_per_block": plot},
        )

