"""Scale-out: ranks as separate processes (gloo, a file store), the numbers of one process.

Each rank is a `python -m repsim run` process with the environment torchrun would give it
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and a file:// rendezvous.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from repsim.run.distributed import (World, batch_unit, global_batch_order, plan_counts,
                                    rank_positions)

EXTRA = textwrap.dedent("""
    [[metrics]]
    name = "linear_cka"

    [[evaluators]]
    name = "knn"
    params = { k = 5 }

    [[evaluators]]
    name = "attention_distance"
    """)


@pytest.mark.parametrize("n,unit", [(40, 8), (37, 8), (12, 8), (5, 8), (100, 24)])
def test_the_batch_plan_gives_every_example_to_exactly_one_rank(n: int, unit: int) -> None:
    for size in range(1, 6):
        shares = [rank_positions(n, unit, World(r, size)) for r in range(size)]
        assert sorted(p for share in shares for p in share) == list(range(n))
        for r, share in enumerate(shares):  # whole units r::W, in order
            assert share == sorted(share)
            assert all((p // unit) % size == r for p in share)
        for mb in (4, 8):
            if unit % mb:
                continue
            order = global_batch_order(n, unit, mb, 4, size)
            assert sorted(order) == list(range(len(order)))
            assert len(order) == plan_counts(n, unit, mb, 4)[0]


def test_the_unit_is_whole_minibatches_of_every_metric() -> None:
    assert batch_unit([32, 48], 256) == 96 and batch_unit([], 20) == 20


def launch(recipe: Path, out: Path, size: int, store: Path, killer: str | None = None,
           kill_rank: int | None = None, recipes: dict[int, Path] | None = None
           ) -> list[subprocess.Popen]:
    procs = []
    for rank in range(size):
        env = os.environ | {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                            "LOCAL_WORLD_SIZE": str(size), "REPSIM_DIST_INIT": f"file://{store}",
                            "OMP_NUM_THREADS": "1"}
        path = (recipes or {}).get(rank, recipe)
        if killer is not None and rank == kill_rank:
            cmd = [sys.executable, killer, str(path), str(out), "2"]
        else:
            cmd = [sys.executable, "-m", "repsim", "run", str(path), "--out", str(out), "--quiet"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def similarity(run: Path) -> dict[str, dict]:
    return {str(f.relative_to(run)): json.loads(f.read_text())
            for f in sorted((run / "similarity").rglob("*.json"))}


def digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()
            and p.parts[len(run.parts)] != "cache" and p.name != "provenance.json"}


@pytest.fixture
def recipe(write_recipe) -> Path:
    path = write_recipe(run="bootstrap = 40\nthreads = 1\ntrain_examples = 20", extra=EXTRA)
    return path


@pytest.mark.parametrize("size,examples", [(2, 40), (3, 36), (3, 12)])
def test_ranks_write_the_numbers_of_one_process(recipe: Path, tmp_path: Path, size: int,
                                                examples: int) -> None:
    recipe.write_text(recipe.read_text().replace("examples = 40", f"examples = {examples}"))
    from repsim.run import run_recipe

    one = run_recipe(recipe, tmp_path / "one", progress=False, quiet=True)
    results = wait(launch(recipe, tmp_path / "many", size, tmp_path / "store"))
    assert all(code == 0 for code, _ in results), results
    a, b = similarity(one), similarity(tmp_path / "many")
    assert a.keys() == b.keys() and a
    worst = 0.0
    for key in a:
        for field in ("values", "ci_low", "ci_high"):
            if field not in a[key]:
                continue
            x = torch.tensor(a[key][field], dtype=torch.float64)
            y = torch.tensor(b[key][field], dtype=torch.float64)
            assert torch.equal(x.isnan(), y.isnan())
            rel = ((x - y).abs() / x.abs().clamp_min(1e-300)).nan_to_num(0)
            worst = max(worst, float(rel.max()))
    assert worst < 1e-12, worst
    def data(run: Path, name: str) -> dict:
        return json.loads((run / f"evaluators/{name}/result.json").read_text())["data"]

    # k-NN reads the feature cache every rank wrote: in global order, the same numbers
    assert data(one, "knn") == data(tmp_path / "many", "knn")
    # attention statistics are sums merged across ranks: equal up to the order of the sums
    da, db = (data(r, "attention_distance") for r in (one, tmp_path / "many"))
    for model in da["distance"]:
        torch.testing.assert_close(torch.tensor(db["distance"][model]),
                                   torch.tensor(da["distance"][model]), rtol=1e-6, atol=0)
    prov = json.loads((tmp_path / "many/provenance.json").read_text())
    assert prov["world_size"] == size


KILLER = str(Path(__file__).parent / "kill_after_saves.py")  # run as a script


def test_a_rank_killed_mid_run_resumes_to_byte_identical_files(recipe: Path,
                                                               tmp_path: Path) -> None:
    recipe.write_text(recipe.read_text().replace("threads = 1", "threads = 1\ncheckpoint_every = 1"))
    reference = tmp_path / "reference"
    assert all(c == 0 for c, _ in wait(launch(recipe, reference, 2, tmp_path / "s0")))
    procs = launch(recipe, tmp_path / "run", 2, tmp_path / "s1", KILLER, kill_rank=1)
    procs[1].wait(timeout=240)
    assert procs[1].returncode == -9
    deadline = time.time() + 120  # rank 0 finishes its share, then waits for rank 1: stop it
    progress = tmp_path / "run/cache/eval/rank0/progress.json"
    while time.time() < deadline and not (progress.exists() and
                                          json.loads(progress.read_text())["done"]):
        time.sleep(0.5)
    procs[0].kill()
    procs[0].communicate()
    assert not (tmp_path / "run/summary.md").exists()
    rerun = wait(launch(recipe, tmp_path / "run", 2, tmp_path / "s2"))
    assert all(c == 0 for c, _ in rerun), rerun
    assert digest(tmp_path / "run") == digest(reference)


def test_ranks_with_different_recipes_are_refused(recipe: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(recipe.read_text().replace("seed = 0", "seed = 1"))
    results = wait(launch(recipe, tmp_path / "run", 2, tmp_path / "store", recipes={1: other}))
    assert [c for c, _ in results] == [2, 2]
    assert all("different recipes" in err and "Traceback" not in err for _, err in results)


def test_ranks_come_from_torchrun_or_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    from repsim.run.distributed import world_from_env

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert world_from_env() == World(5, 8, 1, 4)
    monkeypatch.setenv("RANK", "2")  # torchrun inside srun: torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert world_from_env() == World(2, 3, 0, 3)
