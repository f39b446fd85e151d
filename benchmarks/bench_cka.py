"""Benchmark: repsim's all-pairs minibatch CKA against the per-pair peers and the Gram floor.

Not part of the test run. The peers are installed in the benchmark environment only::

    .venv/bin/pip install ckatorch torch-cka
    .venv/bin/python benchmarks/bench_cka.py            # all 8 cases (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_cka.py --quick    # 2 cases

For every case (layers per model × examples × width, batch 32) the same features are built once
and timed in this one process:

- ``repsim``: ``repsim.similarity(feats_a, feats_b, "minibatch_cka", batch_size=32)``, the
  all-pairs matrix;
- ``floor``: centring every batch of every layer and its float32 Gram GEMM, nothing else (the best
  of one bmm per layer, a loop over batches, and chunks of batches of 1 MB and 1 MB per thread);
- ``ckatorch``: ``ckatorch.core.cka_batch`` called on every layer pair (float64, the library's
  minibatch CKA);
- ``torch-cka``: the loop of ``torch_cka.CKA.compare`` (batches outer, layer pairs inner, its
  ``_HSIC`` with ``.item()``), run on the same tensors instead of model hooks.

A peer that cannot be imported is replaced by a faithful per-pair loop (float64 HSIC_1 of eq. 4
per pair and batch), and the table says so. Peers on large cases run a subset of layer pairs
within a time budget and are extrapolated to all pairs (column ``pairs run``). Times are the
minimum over interleaved repeats (CPU time with one thread, wall time with more), because the
machine is shared and the minimum is the least disturbed run.

Each model's layers are overlapping column windows of one pool ``Z W + noise`` (shared latent Z
across models, so the values are not all near zero), which keeps the 36-layer, 4096 × 12480 case
within memory. Peak memory of the streaming accumulator is measured in fresh subprocesses.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

BATCH = 32
FULL_CASES = [(L, n, d) for L in (12, 36) for n in (1024, 4096) for d in (768, 65 * 192)]
QUICK_CASES = [(12, 1024, 768), (12, 1024, 65 * 192)]


def make_features(layers: int, n: int, d: int, seed: int = 0) -> tuple[dict, dict]:
    """Two models' layers as windows of per-model pools that share a latent factor."""
    g = torch.Generator().manual_seed(seed)
    stride = max(1, d // 64)
    width = d + (layers - 1) * stride
    z = torch.randn(n, 64, generator=g)
    feats = []
    for _ in range(2):
        pool = z @ torch.randn(64, width, generator=g) + 2.0 * torch.randn(n, width, generator=g)
        pool += torch.randn(width, generator=g)  # a non-zero mean per feature, as real layers have
        feats.append({f"l{i}": pool[:, i * stride : i * stride + d] for i in range(layers)})
    return feats[0], feats[1]


def clock() -> float:
    """CPU time of this process with one thread (robust when other jobs share the cores), wall
    time with more (CPU time would add the threads up)."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum time of each function over ``repeats`` interleaved rounds (after a warm-up), so
    that a busy moment of the machine hits every contender alike."""
    for fn in fns.values():
        fn()
    best = {k: math.inf for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], clock() - t0)
    return best


# ----------------------------------------------------------------------------------- the floor

def floor_variants(feats: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    def bmm() -> None:
        for x in feats:
            xb = x.reshape(-1, BATCH, x.shape[1])
            xc = xb - xb.mean(1, keepdim=True)
            torch.bmm(xc, xc.transpose(1, 2))

    def loop() -> None:
        for x in feats:
            for s in range(0, x.shape[0], BATCH):
                xb = x[s : s + BATCH]
                xc = xb - xb.mean(0)
                torch.mm(xc, xc.T)

    def chunks(size: int) -> Callable[[], None]:
        def run() -> None:
            for x in feats:
                xb = x.reshape(-1, BATCH, x.shape[1])
                step = max(1, size // (BATCH * x.shape[1] * 4))
                for s in range(0, xb.shape[0], step):
                    c = xb[s : s + step]
                    cc = c - c.mean(1, keepdim=True)
                    torch.bmm(cc, cc.transpose(1, 2))

        return run

    # L2-sized chunks of batches, per thread and in all (1 MB: what repsim uses per thread).
    sizes = sorted({1 << 20, (1 << 20) * torch.get_num_threads()})
    return {"bmm": bmm, "loop": loop} | {f"chunks {s >> 20} MB": chunks(s) for s in sizes}


# ----------------------------------------------------------------------------------- the peers

def reference_cka_batch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fallback per-pair minibatch CKA, float64 HSIC_1 of eq. 4 (what ckatorch computes)."""
    def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
        n = k.shape[-1]
        k, l = k.clone(), l.clone()
        k.diagonal(dim1=-2, dim2=-1).zero_()
        l.diagonal(dim1=-2, dim2=-1).zero_()
        kl = torch.bmm(k, l)
        tr = kl.diagonal(dim1=-2, dim2=-1).sum(-1)
        mid = k.sum((-1, -2)) * l.sum((-1, -2)) / ((n - 1) * (n - 2))
        return (tr + mid - 2 / (n - 2) * kl.sum((-1, -2))) / (n * (n - 3))

    x, y = x.double(), y.double()
    k, l = torch.bmm(x, x.transpose(1, 2)), torch.bmm(y, y.transpose(1, 2))  # noqa: E741
    return hsic1(k, l).sum() / (hsic1(k, k).sum() * hsic1(l, l).sum()).sqrt()


def load_peers() -> dict[str, tuple[str, Callable]]:
    peers: dict[str, tuple[str, Callable]] = {}
    try:
        from ckatorch.core import cka_batch

        peers["ckatorch"] = ("ckatorch.core.cka_batch", cka_batch)
    except Exception as exc:  # noqa: BLE001 - any import failure means: use the fallback
        peers["ckatorch"] = (f"fallback per-pair loop (ckatorch: {type(exc).__name__})",
                             reference_cka_batch)
    try:
        from torch_cka import CKA

        peer = object.__new__(CKA)  # only its _HSIC is used; no models or hooks
        peer.device = "cpu"
        peers["torch-cka"] = ("torch_cka.CKA._HSIC loop", peer._HSIC)
    except Exception as exc:  # noqa: BLE001
        peers["torch-cka"] = (f"fallback per-pair loop (torch-cka: {type(exc).__name__})", None)
    return peers


def run_ckatorch(fn: Callable, xs: list, ys: list, budget: float) -> tuple[float, int, dict]:
    """Per-pair calls in row-major order until the budget is spent; returns (time, pairs, vals)."""
    nb = xs[0].shape[0] // BATCH
    vals: dict[tuple[int, int], float] = {}
    t0 = clock()
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            xb, yb = x.reshape(nb, BATCH, -1), y.reshape(nb, BATCH, -1)
            vals[(i, j)] = float(fn(xb, yb))
            if clock() - t0 > budget:
                return clock() - t0, len(vals), vals
    return clock() - t0, len(vals), vals


def run_torch_cka(hsic: Callable | None, xs: list, ys: list, budget: float
                  ) -> tuple[float, int, dict]:
    """torch-cka's compare() loop on a (rows × cols) corner of layers sized to the budget."""
    if hsic is None:
        return run_ckatorch(reference_cka_batch, xs, ys, budget)

    def corner(a: int, b: int) -> tuple[float, dict]:
        nb = xs[0].shape[0] // BATCH
        h = torch.zeros(a, b, 3)
        t0 = clock()
        for s in range(0, nb * BATCH, BATCH):
            for i in range(a):
                x = xs[i][s : s + BATCH].flatten(1)
                k = x @ x.t()
                k.fill_diagonal_(0.0)
                h[i, :, 0] += hsic(k, k) / nb
                for j in range(b):
                    y = ys[j][s : s + BATCH].flatten(1)
                    l = y @ y.t()  # noqa: E741
                    l.fill_diagonal_(0)
                    h[i, j, 1] += hsic(k, l) / nb
                    h[i, j, 2] += hsic(l, l) / nb
        cka = h[:, :, 1] / (h[:, :, 0].sqrt() * h[:, :, 2].sqrt())
        return clock() - t0, {(i, j): float(cka[i, j]) for i in range(a) for j in range(b)}

    probe, _ = corner(1, 1)
    side = max(1, min(len(xs), int(math.sqrt(budget / max(probe, 1e-9)))))
    elapsed, vals = corner(side, min(side, len(ys)))
    return elapsed, len(vals), vals


# ----------------------------------------------------------------------------------- memory

def memory_child(n: int) -> None:
    """Feed n examples of 2 models × 12 layers × 768-d to the metric sink; print peak RSS growth."""
    from repsim.api import get_metric
    from repsim.run.sinks import MetricSink

    layers = [f"l{i}" for i in range(12)]
    acc = MetricSink("cka", get_metric("minibatch_cka"), {"a": layers, "b": layers},  # type: ignore[arg-type]
                     [("a", "b")], minibatch=BATCH)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 768, generator=g)

    def batch() -> dict:
        z = torch.randn(BATCH, 64, generator=g)
        return {m: {layer: z @ w + torch.randn(BATCH, 768, generator=g) for layer in layers}
                for m in ("a", "b")}

    acc.update_features(batch())  # the first batch allocates what every later one reuses
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(n // BATCH - 1):
        acc.update_features(batch())
    acc.compute()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{base} {peak}")


def measure_memory(n: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(n)], check=True,
                         capture_output=True, text=True, env={**os.environ}).stdout.split()
    base, peak = (int(v) / 1024 for v in out[-2:])  # ru_maxrss is in KiB on Linux
    return base, peak


# ----------------------------------------------------------------------------------- main

@dataclass
class Row:
    case: str
    repsim: float
    floor: float
    floor_kind: str
    peers: dict[str, tuple[float, int, int, float]]  # name -> (time, pairs run, pairs, max diff)


def run_case(layers: int, n: int, d: int, repeats: int, budget: float,
             peers: dict[str, tuple[str, Callable]]) -> Row:
    import repsim

    fa, fb = make_features(layers, n, d)
    xs, ys = list(fa.values()), list(fb.values())
    variants = floor_variants(xs + ys)

    def ours() -> torch.Tensor:
        return repsim.similarity(fa, fb, "minibatch_cka", batch_size=BATCH).values

    values = ours()
    times = best_times({**variants, "repsim": ours}, repeats)
    t_ours = times.pop("repsim")
    floor_kind = min(times, key=times.get)  # type: ignore[arg-type]
    results = {}
    for name, (_, fn) in peers.items():
        runner = run_ckatorch if name == "ckatorch" else run_torch_cka
        elapsed, done, vals = runner(fn, xs, ys, budget)
        diff = max(abs(values[i, j].item() - v) for (i, j), v in vals.items())
        results[name] = (elapsed * layers * layers / done, done, layers * layers, diff)
    return Row(f"{layers}x{layers} N={n} D={d}", t_ours, times[floor_kind], floor_kind, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two small cases only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-budget", type=float, default=20.0,
                    help="seconds per peer per case before extrapolating")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    peers = load_peers()
    what = "CPU time" if torch.get_num_threads() == 1 else "wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({what}, best of "
          f"{args.repeats}), batch {BATCH}, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    for name, (how, _) in peers.items():
        print(f"peer {name}: {how}")
    header = (f"{'case':<26}{'repsim s':>10}{'floor s':>9}{'/floor':>8}  "
              f"{'ckatorch s':>11}{'speedup':>9}{'pairs run':>11}{'max|diff|':>11}  "
              f"{'torch-cka s':>12}{'speedup':>9}{'pairs run':>11}{'max|diff|':>11}")
    print(header)
    print("-" * len(header))
    for layers, n, d in (QUICK_CASES if args.quick else FULL_CASES):
        r = run_case(layers, n, d, args.repeats, args.peer_budget, peers)
        line = (f"{r.case:<26}{r.repsim:>10.4f}{r.floor:>9.4f}{r.repsim / r.floor:>7.2f}x  ")
        for name in ("ckatorch", "torch-cka"):
            t, done, total, diff = r.peers[name]
            width = 11 if name == "ckatorch" else 12
            line += (f"{t:>{width}.2f}{t / r.repsim:>8.0f}x{f'{done}/{total}':>11}"
                     f"{diff:>11.1e}  ")
        print(line + f"(floor: {r.floor_kind})", flush=True)
    print()
    peaks = {}
    for n in (1024, 16384):
        base, peaks[n] = measure_memory(n)
        print(f"streaming accumulator, 2 models x 12 layers x 768-d, N={n:>5}: peak RSS "
              f"{peaks[n]:.0f} MB (growth after the first batch {peaks[n] - base:.1f} MB)")
    print(f"peak memory at N=16384 minus at N=1024: {peaks[16384] - peaks[1024]:+.1f} MB")


if __name__ == "__main__":
    main()
