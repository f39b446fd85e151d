"""k-NN benchmark: 50 000 train × 10 000 query 768-d features (not part of the test run).

Prints the time of the similarity GEMMs alone (the same blocks k-NN forms), the time of the full
weighted k-NN, their ratio, and the peak resident memory above the features themselves, against
the memory a one-shot [query × train] similarity matrix would need.

    .venv/bin/python benchmarks/bench_knn.py [--train 50000 --query 10000 --dim 768
                                              --classes 1000 --memory-mb 256]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from repsim.evaluators.knn import _blocks, knn_predict


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def gemm_only(train: torch.Tensor, query: torch.Tensor, k: int, memory_mb: float) -> float:
    """Seconds for the similarity blocks alone (normalised inputs, same block sizes)."""
    train = torch.nn.functional.normalize(train, dim=1)
    query = torch.nn.functional.normalize(query, dim=1)
    q_size, t_size = _blocks(query.shape[0], train.shape[0], k, memory_mb)
    buf = torch.empty(q_size * t_size)
    start = time.perf_counter()
    for q0 in range(0, query.shape[0], q_size):
        q = query[q0:q0 + q_size]
        for t0 in range(0, train.shape[0], t_size):
            t = train[t0:t0 + t_size]
            torch.mm(q, t.T, out=buf[: q.shape[0] * t.shape[0]].view(q.shape[0], -1))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--query", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--memory-mb", type=float, default=256.0)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    train = torch.randn(args.train, args.dim, generator=g)
    train_y = torch.randint(0, args.classes, (args.train,), generator=g)
    query = torch.randn(args.query, args.dim, generator=g)
    knn_predict(train[:2000], train_y[:2000], query[:256], args.k)  # warm-up
    base = peak_rss_mb()

    start = time.perf_counter()
    knn_predict(train, train_y, query, args.k, 0.07, num_classes=args.classes,
                memory_mb=args.memory_mb)
    full = time.perf_counter() - start
    knn_peak = peak_rss_mb() - base
    gemm = gemm_only(train, query, args.k, args.memory_mb)

    q_size, t_size = _blocks(args.query, args.train, args.k, args.memory_mb)
    flops = 2 * args.train * args.query * args.dim
    print(f"k-NN {args.train} train x {args.query} query x {args.dim}-d, {args.classes} classes, "
          f"k={args.k}, {torch.get_num_threads()} threads")
    print(f"blocks: {q_size} queries x {t_size} train ({args.memory_mb:g} MB budget)")
    print(f"similarity GEMM alone: {gemm:7.2f} s  ({flops / gemm / 1e9:.0f} GFLOP/s)")
    print(f"full k-NN:             {full:7.2f} s")
    print(f"ratio full / GEMM:     {full / gemm:7.2f}")
    print(f"peak memory above the features (incl. normalised copies): {knn_peak:.0f} MB; "
          f"one-shot similarity matrix would be {args.train * args.query * 4 / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
