"""Why does the miniature not show the seeds' layer-type finding (Fig. 2)? The candidates, measured.

The seeds find the CKA between MoCo-v3 and MAE lowest in attention (MHSA-QKV) and LayerNorm-1
layers and highest in MLP-FC-1. This script measures, on the digits val split, the JE–MAE and
JE–JE same-depth CKA of each layer type under each candidate explanation:

- ``reduction``: the token reduction of the layer outputs (flatten — all tokens, as the minibatch
  CKA the seeds adapt (Nguyen et al.) reshapes every activation to ``[n, -1]`` —, CLS, GAP, GAP
  without CLS), on the study's zoo;
- ``init``: independent initialisations (the zoo trains every objective from one shared
  initialisation; the seeds compared checkpoints trained from their own);
- ``length``: twice the training steps for MoCo-v3 and MAE;
- ``attention``: the mean attention distance per block (Park et al.), which at a 4×4 patch grid
  has little room to differ between local (MAE) and global (JE) attention.

Models are trained into ``$REPSIM_CACHE`` on first use (seed 1 and the longer schedules are extra
entries). Prints markdown tables (plugins/repsim-minizoo/README.md, "The layer-type finding").

    python plugins/repsim-minizoo/scripts/layer_type_study.py [--only reduction,init,...]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from itertools import combinations

import torch

from repsim.api import compare
from repsim.evaluators.attention import attention_distance
from repsim.models import LoadedModel
from repsim_minizoo import zoo
from repsim_minizoo.config import DEFAULT, Preset
from repsim_minizoo.data import digits, normalize
from repsim_minizoo.train import deterministic, pretrain
from repsim_minizoo.vit import build_vit

TYPES = {"norm1": "norm1", "attn_qkv": "attn.qkv", "mlp_fc1": "mlp.fc1"}
JE = ("mocov3", "dino", "msn")
BATCH = 32


def val_batches() -> list[torch.Tensor]:
    """The val split as whole minibatches of 32 (352 of 360 images), normalised model inputs."""
    images, _ = digits("val", DEFAULT.arch.img_size)
    n = len(images) // BATCH * BATCH
    return list(normalize(images[:n]).split(BATCH))


def zoo_model(objective: str, seed: int = 0) -> LoadedModel:
    return zoo.build(f"minizoo_{objective}", objective, False, "default", seed, progress=False)


def longer_model(objective: str, factor: int) -> LoadedModel:
    """``objective`` trained ``factor`` times as many steps (same initialisation, not cached)."""
    sched = DEFAULT.schedules[objective]
    preset: Preset = dataclasses.replace(DEFAULT, schedules={
        objective: dataclasses.replace(sched, steps=sched.steps * factor)})
    state, record = pretrain(objective, preset, 0, progress=False)
    print(f"  {objective} ×{factor}: {record['steps']} steps, loss {record['loss_final']:.3f}, "
          f"{record['train_seconds']:.0f} s", flush=True)
    vit = build_vit(DEFAULT.arch, 0, num_classes=0)
    vit.load_state_dict(state)
    base = zoo_model(objective)
    return LoadedModel(vit.eval(), base.preprocess, name=f"{objective}x{factor}",
                       num_prefix_tokens=1, family="vit")


def same_depth(a: LoadedModel, b: LoadedModel, kind: str, reduction: str,
               batches: Sequence[torch.Tensor]) -> float:
    """Mean minibatch CKA of same-depth layers of one type (``blocks`` for whole blocks)."""
    depth = len(a.module.blocks)
    layers = [f"blocks.{i}" if kind == "blocks" else f"blocks.{i}.{TYPES[kind]}"
              for i in range(depth)]
    with deterministic():
        res = compare(a, b, batches, layers, layers, reduce=reduction, batch_size=BATCH)
    return res.diag_mean()


def type_row(label: str, pairs_je_mae: list[tuple[LoadedModel, LoadedModel]],
             pairs_je_je: list[tuple[LoadedModel, LoadedModel]], reduction: str,
             batches: Sequence[torch.Tensor]) -> list[str]:
    """One table row: JE–MAE (and JE–JE) CKA per layer type, and whether the finding holds."""
    cells, je_mae = [label], {}
    for kind in TYPES:
        je_mae[kind] = sum(same_depth(a, b, kind, reduction, batches)
                           for a, b in pairs_je_mae) / len(pairs_je_mae)
        je_je = (sum(same_depth(a, b, kind, reduction, batches) for a, b in pairs_je_je)
                 / len(pairs_je_je)) if pairs_je_je else float("nan")
        cells.append(f"{je_mae[kind]:.3f} / {je_je:.3f}")
    holds = je_mae["norm1"] < je_mae["mlp_fc1"] and je_mae["attn_qkv"] < je_mae["mlp_fc1"]
    cells.append("holds" if holds else "does not hold")
    return cells


def table(rows: list[list[str]]) -> None:
    from tabulate import tabulate

    headers = ["candidate", *(f"{k} JE–MAE / JE–JE" for k in TYPES), "finding"]
    print(tabulate(rows, headers, tablefmt="github"), flush=True)


def mean_attention_distance(model: LoadedModel, batches: Sequence[torch.Tensor]) -> list[float]:
    """Mean attention distance (patches) of each block, over heads, queries and the val split."""
    from repsim.layers import LayerTap

    vit = model.module
    layers = [f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks))]
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tap = LayerTap(model, layers)
    with tap.attached():
        for x in batches:
            for i, (layer, qkv) in enumerate(tap.run(x).items()):
                attn_mod = vit.blocks[i].attn
                b, t, _ = qkv.shape
                q, k, _v = qkv.reshape(b, t, 3, attn_mod.num_heads, -1).permute(2, 0, 3, 1, 4)
                attn = (q @ k.transpose(-2, -1) * attn_mod.scale).softmax(-1)
                sums[i] += attention_distance(attn, 1).double().mean(1).sum()
    n = sum(len(x) for x in batches)
    return [float(s / n) for s in sums]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="reduction,init,length,attention")
    which = set(ap.parse_args(argv).only.split(","))
    torch.set_num_threads(1)
    batches = val_batches()
    models = {o: zoo_model(o) for o in (*JE, "mae", "untrained")}
    je_mae = [(models[j], models["mae"]) for j in JE]
    je_je = [(models[a], models[b]) for a, b in combinations(JE, 2)]

    if "reduction" in which:
        print("\n### Token reduction (the study's zoo: shared initialisation)\n", flush=True)
        table([type_row(r, je_mae, je_je, r, batches)
               for r in ("flatten", "cls", "gap", "gap_no_cls")])
        rows = [[r, f"{sum(same_depth(a, b, 'blocks', r, batches) for a, b in je_mae) / 3:.3f}",
                 f"{sum(same_depth(a, b, 'blocks', r, batches) for a, b in je_je) / 3:.3f}"]
                for r in ("flatten", "cls")]
        from tabulate import tabulate

        print("\nWhole blocks (Fig. 1):\n")
        print(tabulate(rows, ["reduction", "blocks JE–MAE", "blocks JE–JE"], tablefmt="github"))
        untrained = [(models[j], models["untrained"]) for j in (*JE, "mae")]
        print("\nEach trained model against the untrained initialisation (flatten):\n")
        table([type_row("trained vs untrained", untrained, [], "flatten", batches)])

    if "init" in which:
        print("\n### Independent initialisations (MoCo-v3 and MAE from seed 1; flatten)\n",
              flush=True)
        m1, a1 = zoo_model("mocov3", 1), zoo_model("mae", 1)
        table([type_row("shared init (seed 0)", [(models["mocov3"], models["mae"])],
                        [(models["mocov3"], models["dino"])], "flatten", batches),
               type_row("independent inits", [(models["mocov3"], a1), (m1, models["mae"])],
                        [(m1, models["dino"]), (m1, models["msn"])], "flatten", batches),
               type_row("MoCo-v3 seed 0 vs seed 1", [(models["mocov3"], m1)], [], "flatten",
                        batches)])

    if "length" in which:
        print("\n### Training length (MoCo-v3 and MAE, twice the steps; flatten)\n", flush=True)
        m2, a2 = longer_model("mocov3", 2), longer_model("mae", 2)
        table([type_row("study's steps", [(models["mocov3"], models["mae"])], [], "flatten",
                        batches),
               type_row("twice the steps", [(m2, a2)], [], "flatten", batches)])

    if "attention" in which:
        from tabulate import tabulate

        print("\n### Mean attention distance per block (patches; 4×4 grid)\n", flush=True)
        rows = [[o, *(f"{d:.2f}" for d in mean_attention_distance(models[o], batches))]
                for o in (*JE, "mae", "untrained")]
        depth = len(rows[0]) - 1
        print(tabulate(rows, ["model", *(f"block {i}" for i in range(depth))],
                       tablefmt="github"), flush=True)


if __name__ == "__main__":
    main()
