"""Benchmark: examples/s of one recipe on 1 and on 2 processes (one thread each), the time of
the final merge and of the k-NN stage.

Not part of the test run::

    .venv/bin/python benchmarks/bench_distributed.py                 # CPU, gloo
    .venv/bin/python benchmarks/bench_distributed.py --device cuda --nproc 1 2 4 8

The recipe is ``recipes/mini.toml``'s model set replaced by random timm ViTs (no training, no
cache), so the figure is the pass itself: 4 ViT-Ti/16 at 64 px, 12 blocks + 3 layer types, CLS,
minibatch CKA of every pair. The k-NN stage (20-NN of the eval examples against a memory bank of
``--knn-train`` train examples, CLS of the 12 blocks of every model) runs with its memory bank
spread over the processes; its train split is a second pass, not counted in examples/s. Each
process count runs in a fresh directory through ``torch.distributed.run`` (standalone
rendezvous); times come from the run's provenance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RECIPE = """\
[run]
name = "bench-distributed"
seed = 0
batch_size = 32
examples = {examples}
train_examples = {train}
threads = 1
device = "{device}"
checkpoint_every = 1000

[data]
dataset = "synthetic"
split = "val"
params = {{ examples = {generated}, classes = 10, size = 64 }}

[layers]
blocks = {{ selector = "blocks" }}
norm1 = {{ selector = "norm1" }}
attn_qkv = {{ selector = "attn_qkv" }}
mlp_fc1 = {{ selector = "mlp_fc1" }}

[[metrics]]
name = "minibatch_cka"

[[evaluators]]
name = "knn"
params = {{ group = "blocks", reductions = ["cls"] }}
"""
MODEL = """
[models.m{i}]
model = "timm"
params = {{ arch = "vit_tiny_patch16_224", seed = {i}, kwargs = {{ img_size = 64 }} }}
"""


def run(nproc: int, recipe: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "repsim", "run", str(recipe), "--out", str(out),
           "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / "provenance.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--knn-train", type=int, default=1024,
                    help="train examples in the k-NN memory bank")
    args = ap.parse_args()
    from tabulate import tabulate

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.toml"
        # The synthetic data set keeps 25 % of its images in 'val' (the split measured) and the
        # rest in 'train' (the k-NN memory bank).
        generated = max(4 * args.examples, -(-4 * args.knn_train // 3) + 10)
        recipe.write_text(RECIPE.format(examples=args.examples, train=args.knn_train,
                                        generated=generated, device=args.device) + "".join(
            textwrap.dedent(MODEL.format(i=i)) for i in range(args.models)))
        rows, base = [], None
        for n in args.nproc:
            prov = run(n, recipe, Path(tmp) / f"run{n}")
            seconds = prov["timing"]["pass eval"]
            base = base or seconds
            rows.append([n, f"{seconds:.2f}", f"{args.examples / seconds:.1f}",
                         f"{base / seconds:.2f}×", f"{prov['timing'].get('merge eval', 0):.4f}",
                         f"{prov['timing']['evaluator knn']:.2f}"])
    print(f"# {args.models} × ViT-Ti/16 (64 px), {args.examples} examples, 1 thread per process, "
          f"{args.device}; k-NN: {args.knn_train} train examples\n")
    print(tabulate(rows, headers=["processes", "pass s", "examples/s", "speed-up", "merge s",
                                  "k-NN s"], tablefmt="github"))


if __name__ == "__main__":
    main()
