"""`repsim minizoo train --nproc`: models dealt to processes, trained with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from repsim_minizoo import cache, zoo
from repsim_minizoo.plugin import _format_deal, _parse_deal, entries

ALL = [entries()[name] for name in entries()]


def test_chains_keep_pretraining_before_fine_tuning_and_skip_cached() -> None:
    chains = zoo.training_chains(ALL, "tiny")
    assert sorted(e for c in chains for e in c) == sorted(
        (o, ft) for o, ft in ALL if o != "untrained")
    for chain in chains:
        assert len({o for o, _ in chain}) == 1 and chain == sorted(chain, key=lambda e: e[1])
    costs = [sum(zoo.training_cost(*e, "tiny") for e in c) for c in chains]
    assert costs == sorted(costs, reverse=True)
    zoo.pretrained("supervised", "tiny", progress=False)
    left = [e for c in zoo.training_chains(ALL, "tiny") for e in c]
    assert ("supervised", False) not in left and len(left) == len(ALL) - 2


def test_deal_balances_whole_chains() -> None:
    chains = zoo.training_chains(ALL)
    for n in (1, 2, 3, 7):
        dealt = zoo.deal(chains, n)
        assert len(dealt) == n
        assert sorted(e for part in dealt for e in part) == sorted(e for c in chains for e in c)
        for chain in chains:  # a chain stays whole, in order, in one process
            holder = [part for part in dealt if chain[0] in part]
            assert len(holder) == 1
            i = holder[0].index(chain[0])
            assert holder[0][i:i + len(chain)] == chain
        assert _parse_deal(_format_deal(dealt)) == dealt
    loads = [sum(zoo.training_cost(*e) for e in part) for part in zoo.deal(chains, 2)]
    total = sum(loads)
    # LPT's bound: the busiest process carries at most 4/3 of the ideal share
    assert max(loads) <= 4 / 3 * total / 2


def _weights(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: cache.load_weights(p) or {} for p in sorted((root / "minizoo").glob(
        "*.safetensors"))}


def test_two_processes_train_the_same_weights_as_one(tmp_path: Path) -> None:
    only = ["--only", "minizoo_mae", "--only", "minizoo_supervised"]
    results = {}
    for nproc in (1, 2):
        env = {**os.environ, "REPSIM_CACHE": str(tmp_path / f"n{nproc}")}
        proc = subprocess.run([sys.executable, "-m", "repsim", "minizoo", "train", "--preset",
                               "tiny", "--nproc", str(nproc), *only],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "minizoo_supervised" in proc.stdout and "minizoo_mae" in proc.stdout
        assert ("in 2 processes" in proc.stderr) == (nproc == 2)
        results[nproc] = _weights(tmp_path / f"n{nproc}")
    assert results[1].keys() == results[2].keys() and len(results[1]) == 2
    for name, tensors in results[1].items():
        assert tensors.keys() == results[2][name].keys()
        assert all(torch.equal(t, results[2][name][k]) for k, t in tensors.items()), name


def test_unknown_model_is_a_usage_error() -> None:
    from click.testing import CliRunner

    from repsim.cli import cli

    res = CliRunner().invoke(cli, ["minizoo", "train", "--only", "minizoo_nope"])
    assert res.exit_code == 2 and "minizoo_nope" in res.output and "minizoo_mae" in res.output
