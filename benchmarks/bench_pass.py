"""Benchmark: the whole data pass against plain forwards of the same models, and thread pools.

Not part of the test run::

    .venv/bin/python benchmarks/bench_pass.py                 # CPU: 2 ViT-Ti/16, 128 images
    .venv/bin/python benchmarks/bench_pass.py --device cuda --precision bf16 \\
        --arch vit_base_patch16_224 --models 4 --examples 2048 --batch-size 256

Pass cases, each against plain forwards (``model(x)`` under inference mode and the same autocast)
of the same models on the same prepared batches, repeats interleaved in one process:

- ``cls``: 12 blocks, CLS token, minibatch CKA of every model pair;
- ``types``: 12 blocks + norm1, attn_qkv, mlp_fc1 (48 layers), CLS;
- ``flatten``: 12 blocks, flattened tokens.

The pass is what ``repsim run`` does per batch: the feature pass (taps, reductions) and the
metric sink (the engine: Grams, U-centring, one GEMM per model pair). Data loading is left out of
both sides (it is the same work). Also measured: the engine alone against its own floor (the
float32 Gram GEMMs of the same features), and the thread-pool settings of ``repsim.threads``.
Times are the minimum over repeats (the least disturbed run); ratios are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import repsim
from repsim.layers import GlobParams, GlobSelector
from repsim.models.base import LoadedModel
from repsim.plugins import build_part
from repsim.run.device import DeviceSettings, configured
from repsim.run.features import FeaturePass
from repsim.run.plan import ModelPlan
from repsim.run.sinks import MetricSink

CASES = {
    "cls": ({"blocks": ["blocks.*"]}, "cls"),
    "types": ({"blocks": ["blocks.*"], "norm1": ["blocks.*.norm1"],
               "attn_qkv": ["blocks.*.attn.qkv"], "mlp_fc1": ["blocks.*.mlp.fc1"]}, "cls"),
    "flatten": ({"blocks": ["blocks.*"]}, "flatten"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def models(args: argparse.Namespace, device: torch.device) -> list[LoadedModel]:
    out = []
    for i in range(args.models):
        m = build_part("model", "timm", arch=args.arch, seed=i)
        m.module.to(device).eval()
        out.append(m)
    return out


def plans(loaded: list[LoadedModel], groups: dict[str, list[str]], reduce: str
          ) -> dict[str, ModelPlan]:
    out = {}
    for i, m in enumerate(loaded):
        chosen = {g: GlobSelector(GlobParams(patterns=p)).select(m) for g, p in groups.items()}
        out[f"m{i}"] = ModelPlan(f"m{i}", "timm", m, chosen, reduce)
    return out


def bench_pass(args: argparse.Namespace, settings: DeviceSettings) -> list[list[str]]:
    device = settings.device
    loaded = models(args, device)
    crop = loaded[0].preprocess.crop or 224
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, crop, crop, generator=g).to(device)
               for _ in range(args.examples // args.batch_size)]
    metric = build_part("metric", "minibatch_cka")
    rows = []
    for case in args.cases:
        groups, reduce = CASES[case]
        mp = plans(loaded, groups, reduce)
        labels = list(mp)
        pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i:]]
        forward = FeaturePass(mp, [loaded[0].preprocess], {}, settings)

        def plain() -> None:
            with torch.inference_mode(), settings.autocast():
                for x in batches:
                    for m in loaded:
                        m.module(x)

        def full() -> None:
            sink = MetricSink("cka", metric, {k: p.layers for k, p in mp.items()}, pairs, 32,
                              device=settings.engine_device)
            with forward.attached():
                for b, x in enumerate(batches):
                    sink.update(forward("eval", b, [x], torch.zeros(len(x)), torch.arange(len(x))))
            sink.compute()

        plain(), full()  # warm-up: kernels, allocator, caches
        t_plain, t_pass = [], []
        for _ in range(args.repeats):
            t_plain.append(timed(plain, device))
            t_pass.append(timed(full, device))
        p, q = min(t_plain), min(t_pass)
        n = len(batches) * args.batch_size
        layers = len(next(iter(mp.values())).layers)
        rows.append([case, str(layers), f"{n / p:.1f}", f"{n / q:.1f}", f"{100 * (q / p - 1):+.1f} %",
                     f"{statistics.median(t_pass) / statistics.median(t_plain):.3f}"])
    return rows


def bench_engine(args: argparse.Namespace, settings: DeviceSettings) -> list[str]:
    """The engine on extracted features against its floor: the float32 Gram GEMMs alone."""
    device = settings.engine_device
    g = torch.Generator().manual_seed(1)
    layers, n, d = 12, args.engine_examples, args.engine_dim
    feats = {f"m{i}": {f"l{j}": torch.randn(n, d, generator=g).to(device) for j in range(layers)}
             for i in range(args.models)}
    labels = list(feats)
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i:]]
    metric = build_part("metric", "minibatch_cka")

    def engine() -> None:
        sink = MetricSink("cka", metric, {m: list(f) for m, f in feats.items()}, pairs, 32,
                          device=device)
        for lo in range(0, n, args.batch_size):
            sink.update_features({m: {k: v[lo:lo + args.batch_size] for k, v in f.items()}
                                  for m, f in feats.items()})
        sink.compute()

    def floor() -> None:
        for f in feats.values():
            for x in f.values():
                xb = x[: n // 32 * 32].reshape(-1, 32, d)
                xc = xb - xb.mean(1, keepdim=True)
                torch.bmm(xc, xc.transpose(1, 2))

    engine(), floor()
    te = min(timed(engine, device) for _ in range(args.repeats))
    tf = min(timed(floor, device) for _ in range(args.repeats))
    return [f"{args.models} models × {layers} layers, N={n}, {d}-d", f"{te:.4f}", f"{tf:.4f}",
            f"{te / tf:.2f}×"]


def bench_threads(args: argparse.Namespace) -> list[list[str]]:
    """numpy/scipy metrics right after torch work, under repsim's BLAS limit and with the BLAS
    pool at its default size (repsim's limit switched off)."""
    from threadpoolctl import threadpool_info

    import repsim.threads as threads

    default_size = max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    ours_size = threads.blas_threads()
    g = torch.Generator().manual_seed(2)
    xs = {f"l{i}": torch.randn(1024, 384, generator=g) for i in range(4)}
    a = torch.randn(512, 512, generator=g)

    def after_torch_work(metric: str) -> float:
        for _ in range(10):
            a @ a  # leaves torch's pool warm (spinning), as between the batches of a run
        t = time.perf_counter()
        repsim.similarity(xs, xs, metric=metric)
        return time.perf_counter() - t

    rows = []
    for metric in ("cca", "procrustes", "rsa"):
        ours, default = [], []
        for _ in range(args.repeats):  # interleaved
            ours.append(after_torch_work(metric))
            original = threads.blas_threads
            threads.blas_threads = lambda: default_size  # type: ignore[assignment]
            try:
                default.append(after_torch_work(metric))
            finally:
                threads.blas_threads = original  # type: ignore[assignment]
        rows.append([metric, f"{ours_size} / {default_size}", f"{min(ours):.3f}",
                     f"{min(default):.3f}", f"{min(default) / min(ours):.2f}×"])
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--engine-examples", type=int, default=1024)
    ap.add_argument("--engine-dim", type=int, default=768)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--skip-threads", action="store_true")
    args = ap.parse_args()
    from repsim.run.device import resolve_device
    from repsim.threads import available_cores

    settings = DeviceSettings(resolve_device(args.device), args.precision,
                              threads=args.threads or available_cores())
    with configured(settings):
        print(f"# bench_pass: {args.models} × {args.arch} on {settings.device} "
              f"({args.precision}), {args.examples} images, batch {args.batch_size}, "
              f"{torch.get_num_threads()} torch threads\n")
        print(table(["case", "layers/model", "plain img/s", "pass img/s", "overhead (min)",
                     "pass/plain (median)"], bench_pass(args, settings)))
        print()
        print(table(["engine case", "engine s", "Gram floor s", "engine/floor"],
                    [bench_engine(args, settings)]))
        if not args.skip_threads:
            print()
            print(table(["metric", "BLAS threads (repsim / default)", "repsim s",
                         "default pool s", "default/repsim"], bench_threads(args)))


if __name__ == "__main__":
    main()
