"""Weighted k-NN classification in the DINO protocol (Caron et al. 2021, ``eval_knn.py``).

Features are L2-normalised; each query's k most cosine-similar training examples vote for their
label with weight exp(sim / T); the class with the largest total wins. Similarities are formed
one block at a time (queries × training examples) so memory stays bounded for any train size;
the block GEMM dominates the time (``benchmarks/bench_knn.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from repsim.errors import FeatureError
from repsim.evaluators._common import (MISSING, cached_layers, figure, json_float, layer_axis,
                                       resolve_layers, resolve_models, table)
from repsim.evaluators.base import EvalContext, Evaluator, EvalResult, FeatureNeeds
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


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                k: int = 20, temperature: float = 0.07, *, num_classes: int | None = None,
                memory_mb: float = 256.0) -> torch.Tensor:
    """Predicted labels ``[N_test]`` of DINO's weighted k-NN classifier.

    ``train_x``/``test_x`` are ``[N, D]`` features (any float dtype; computed in the dtype of
    ``train_x`` after L2 normalisation), ``train_y`` integer labels. Ties between neighbours at
    equal similarity are broken by ``torch.topk``; ties between classes with equal vote totals go
    to the lower class index.
    """
    import torch
    import torch.nn.functional as F

    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise FeatureError(f"k-NN needs [N, D] features of equal width; got train "
                           f"{tuple(train_x.shape)} and test {tuple(test_x.shape)}.")
    n_train = train_x.shape[0]
    if train_y.shape != (n_train,):
        raise FeatureError(f"{n_train} training features but labels of shape "
                           f"{tuple(train_y.shape)}.")
    if not 1 <= k <= n_train:
        raise FeatureError(f"k = {k} needs at least k training examples; there are {n_train}.")
    if not torch.is_floating_point(train_x):
        train_x = train_x.float()
    train_y = train_y.to(train_x.device, torch.long)
    n_cls = int(num_classes if num_classes is not None else int(train_y.max()) + 1)
    train_n = F.normalize(train_x, dim=1)
    test_n = F.normalize(test_x.to(train_x.device, train_x.dtype), dim=1)
    n_query = test_n.shape[0]
    q_size, t_size = _blocks(n_query, n_train, k, memory_mb)
    # One preallocated buffer for all similarity blocks: no reallocation per block.
    buf = torch.empty(q_size * t_size, dtype=train_n.dtype, device=train_n.device)
    preds = torch.empty(n_query, dtype=torch.long, device=train_n.device)
    for q0 in range(0, n_query, q_size):
        q = test_n[q0:q0 + q_size]
        best_sim = best_idx = None
        for t0 in range(0, n_train, t_size):
            t = train_n[t0:t0 + t_size]
            sim = torch.mm(q, t.T, out=buf[: q.shape[0] * t.shape[0]].view(q.shape[0], -1))
            vals, idx = sim.topk(min(k, t.shape[0]), dim=1)  # last block may be short
            idx += t0
            if best_sim is None:
                best_sim, best_idx = vals, idx
            else:  # merge this block's top-k into the running top-k
                vals, idx = torch.cat([best_sim, vals], 1), torch.cat([best_idx, idx], 1)
                best_sim, pos = vals.topk(k, dim=1)
                best_idx = idx.gather(1, pos)
        assert best_sim is not None and best_idx is not None
        votes = torch.zeros(q.shape[0], n_cls, dtype=best_sim.dtype, device=q.device)
        votes.scatter_add_(1, train_y[best_idx], (best_sim / temperature).exp_())
        preds[q0:q0 + q_size] = votes.argmax(1)
    return preds


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

    def __init__(self, params: KnnParams | None = None, name: str | None = "knn") -> None:
        super().__init__(params or KnnParams(), name)
        p = self.params
        self.needs = FeatureNeeds(splits=(p.train_split, p.eval_split),
                                  reductions=tuple(p.reductions),
                                  layers=cached_layers(p.layers, p.group))

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        p = self.params
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
            acc = torch.full((len(layers), len(p.reductions)), float("nan"), dtype=torch.float64)
            for i, layer in enumerate(layers):
                for j, red in enumerate(p.reductions):
                    try:
                        train_x = ctx.features(model, layer, p.train_split, red)
                        eval_x = ctx.features(model, layer, p.eval_split, red)
                    except MISSING as exc:
                        notes.append(f"{model} {layer} {red}: skipped ({exc})")
                        continue
                    pred = knn_predict(train_x.to(p.device), train_y, eval_x, p.k,
                                       p.temperature, num_classes=n_cls, memory_mb=p.memory_mb)
                    acc[i, j] = (pred.cpu() == eval_y.cpu().long()).double().mean()
                    rows.append([model, layer, i + 1, red, float(acc[i, j])])
            tensors[f"accuracy/{model}"] = acc
            data[model] = {red: {layer: json_float(acc[i, j]) for i, layer in enumerate(layers)}
                           for j, red in enumerate(p.reductions)}
        protocol = {
            "evaluator": self.name, "protocol": "DINO weighted k-NN (Caron et al. 2021)",
            "k": p.k, "temperature": p.temperature, "similarity": "cosine (L2-normalised)",
            "vote_weight": "exp(similarity / temperature)",
            "ties": "neighbours: torch.topk order; classes: lowest index",
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
