"""Scale-out: ranks as separate processes (gloo, a file store), the numbers of one process.

Each rank is a `python -m repsim run` process with the environment torchrun would give it
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and a file:// rendezvous; the evaluators' own
distributed functions run in ranks that are this file run as a script (``worker``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
PROBE = textwrap.dedent("""
    [[evaluators]]
    name = "linear_probe"
    [evaluators.params]
    layers = "all"
    base_lrs = [0.1, 0.01]
    weight_decays = [0.0]
    epochs = [4]
    warmup_epochs = [1]
    batch_size = 8
    top = 1

    [[evaluators]]
    name = "prediction_agreement"
    label = "agreement_probe"
    [evaluators.params]
    scores = "linear_probe"
    ks = [2, 3]
    [evaluators.params.probe]
    base_lrs = [0.1, 0.01]
    weight_decays = [0.0]
    epochs = [4]
    warmup_epochs = [1]
    batch_size = 8

    [[evaluators]]
    name = "prediction_agreement"
    params = { ks = [2, 3] }
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


@pytest.mark.parametrize("n,batch", [(61, 16), (10, 4), (7, 7)])
def test_each_training_step_takes_the_single_process_minibatch_across_ranks(n: int,
                                                                           batch: int) -> None:
    from repsim.training import GlobalBatchSampler, Shard

    def epoch(shard: Shard) -> list[torch.Tensor]:
        return list(GlobalBatchSampler(shard, batch)(torch.Generator().manual_seed(3)))

    single = epoch(Shard.whole(n))
    assert len(single) == n // batch and all(len(b) == batch for b in single)
    for size in range(2, 5):
        shares = [torch.tensor(rank_positions(n, 3, World(r, size)), dtype=torch.long)
                  for r in range(size)]
        steps = [epoch(Shard(share, n)) for share in shares]
        assert all(len(s) == len(single) for s in steps)  # every rank takes every step
        for i, rows in enumerate(single):  # the ranks' rows of a step: that minibatch, no repeat
            union = torch.cat([shares[r][steps[r][i]] for r in range(size)])
            assert sorted(union.tolist()) == sorted(rows.tolist())


def test_the_unit_is_whole_minibatches_of_every_metric() -> None:
    assert batch_unit([32, 48], 256) == 96 and batch_unit([], 20) == 20


def launch(recipe: Path, out: Path, size: int, store: Path, killer: str | None = None,
           kill_rank: int | None = None, recipes: dict[int, Path] | None = None,
           quiet: bool = True) -> list[subprocess.Popen]:
    procs = []
    for rank in range(size):
        env = os.environ | {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                            "LOCAL_WORLD_SIZE": str(size), "REPSIM_DIST_INIT": f"file://{store}",
                            "OMP_NUM_THREADS": "1"}
        path = (recipes or {}).get(rank, recipe)
        if killer is not None and rank == kill_rank:
            cmd = [sys.executable, killer, str(path), str(out), "2"]
        else:
            cmd = [sys.executable, "-m", "repsim", "run", str(path), "--out", str(out),
                   *(["--quiet"] if quiet else [])]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def evaluator_data(run: Path, name: str) -> dict:
    return json.loads((run / f"evaluators/{name}/result.json").read_text())["data"]


def linear_probe_pairs(one: Path, many: Path) -> list[tuple[dict, dict]]:
    """The linear probe's results (depth 0) of every model and input in two runs, paired."""
    pa, pb = (evaluator_data(r, "linear_probe")["results"] for r in (one, many))
    return [(depths["0"], pb[model][label]["0"])
            for model, inputs in pa.items() for label, depths in inputs.items()]


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
                                                examples: int, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    recipe.write_text(recipe.read_text().replace("examples = 40", f"examples = {examples}")
                      + PROBE)
    from repsim.evaluators.base import Progress
    from repsim.run import run_recipe

    quiet = size == 3  # the first case shows the evaluators' progress; the others are --quiet
    monkeypatch.setattr(Progress, "every", 0.0)  # a progress line after every step
    one = run_recipe(recipe, tmp_path / "one", progress=False, quiet=quiet)
    shown = capsys.readouterr().err
    results = wait(launch(recipe, tmp_path / "many", size, tmp_path / "store", quiet=quiet))
    assert all(code == 0 for code, _ in results), results
    if quiet:
        assert "evaluator" not in shown + "".join(err for _, err in results)
    else:  # a line saying what each evaluator does; for k-NN, steps with an estimate; rank 0
        assert "evaluator 'knn': weighted 5-NN (T = 0.07) of 'eval' against the 'train'" in shown
        assert "evaluator 'attention_distance': " in shown
        assert re.search(r"evaluator 'knn': 1/18 layer × reduction items \(5 %\), [0-9.]+ s so "
                         r"far, about [0-9.]+ s left", shown), shown
        assert "evaluator 'knn': 18 layer × reduction items done in" in shown
        assert "evaluator 'knn' on 2 processes: weighted 5-NN" in results[0][1]
        assert "evaluator" not in results[1][1]
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
    # k-NN reads the feature cache every rank wrote: in global order, the same numbers
    assert evaluator_data(one, "knn") == evaluator_data(tmp_path / "many", "knn")
    # probes trained under DDP: the same accuracies, losses to float32 rounding
    for a, b in linear_probe_pairs(one, tmp_path / "many"):
        assert (a["mean"], a["std"], a["best"]) == (b["mean"], b["std"], b["best"])
        for ra, rb in zip(a["runs"], b["runs"], strict=True):
            assert ra["eval_accuracy"] == rb["eval_accuracy"]
            assert ra["selection_loss"] == pytest.approx(rb["selection_loss"], rel=1e-5)
    # agreement of the probes' scores: each process trains its share of the DDP probes and
    # scores its share of the eval split, rank 0 puts the scores in the split's order. The same
    # runs are chosen and their scores differ by float32 rounding only, so every class ranking
    # and top-1, hence every tau and F1, is equal; the models' own outputs: rank 0 alone
    for name in ("agreement_probe", "prediction_agreement"):
        da, db = (evaluator_data(r, name) for r in (one, tmp_path / "many"))
        assert da == db and da["a vs b"]["n"]["all"] == examples
        ta, tb = ((r / f"evaluators/{name}/tensors.safetensors").read_bytes()
                  for r in (one, tmp_path / "many"))
        assert ta == tb  # the per-example taus
    qa, qb = (json.loads((r / "evaluators/agreement_probe/result.json").read_text())["protocol"]
              for r in (one, tmp_path / "many"))
    assert qa["notes"] == qb["notes"] == [] and qa["probes"].keys() == {"a", "b"}
    for model, info in qa["probes"].items():
        ra, rb = info["best_run"], qb["probes"][model]["best_run"]
        assert ra["selection_loss"] == pytest.approx(rb["selection_loss"], rel=1e-5)
        assert {**ra, "selection_loss": 0} == {**rb, "selection_loss": 0}
    # attention statistics are sums merged across ranks: equal up to the order of the sums
    da, db = (evaluator_data(r, "attention_distance") for r in (one, tmp_path / "many"))
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


def knn_cases() -> list[dict]:
    """k-NN problems, each split over the ranks in units as the batch plan splits a run. ``tied``
    features are ±1 in 16-d: every cosine a multiple of 1/8, computed exactly, most of them tied
    (the tie-break decides the lists); the last case leaves a rank of 3 with no example and one
    with fewer than k."""
    g = torch.Generator().manual_seed(0)

    def tied(n: int) -> torch.Tensor:
        return torch.randint(0, 2, (n, 16), generator=g).float() * 2 - 1

    cases = [dict(train=tied(61), test=tied(23), k=7, unit=4, memory_mb=256.0),
             dict(train=tied(61), test=tied(23), k=20, unit=5, memory_mb=0.0005),
             dict(train=torch.randn(80, 32, generator=g), test=torch.randn(30, 32, generator=g),
                  k=5, unit=8, memory_mb=256.0),
             dict(train=tied(12), test=tied(9), k=5, unit=8, memory_mb=256.0)]
    for case in cases:
        case["labels"] = torch.randint(0, 4, (case["train"].shape[0],), generator=g)
        case["test_labels"] = torch.randint(0, 4, (case["test"].shape[0],), generator=g)
    return cases


def knn_of_one_process(case: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    from repsim.evaluators.knn import knn_neighbours, knn_vote

    sims, idx = knn_neighbours(case["train"], case["test"], case["k"],
                               memory_mb=case["memory_mb"])
    pred = knn_vote(sims, case["labels"][idx], 4)
    return sims, idx, float((pred == case["test_labels"]).double().mean())


def probe_data() -> dict[str, torch.Tensor]:
    """Three overlapping classes in 12-d: 61 train, 29 test examples."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 12, generator=g)
    y, yt = torch.randint(0, 3, (61,), generator=g), torch.randint(0, 3, (29,), generator=g)
    return {"x": centres[y] + torch.randn(61, 12, generator=g), "y": y,
            "xt": centres[yt] + torch.randn(29, 12, generator=g), "yt": yt}


# Train examples go to the ranks in units of 4, or of 32 (with 3 ranks, one gets none).
PROBE_GRIDS = [dict(depth=d, selection=sel, base_lrs=(0.1, 0.01), weight_decays=(0.0, 1e-3),
                    epochs=(6,), warmup_epochs=(1,), batch_size=16, top=2, num_classes=3,
                    keep_best=True, unit=unit)
               for d, sel, unit in ((0, "holdout", 4), (2, "holdout", 4), (1, "eval", 4),
                                    (1, "holdout", 32))]


def worker(tasks: str, out: str) -> None:
    """One rank (RANK, WORLD_SIZE and REPSIM_DIST_INIT from the environment): each of the
    comma-separated ``tasks`` on its share of the data; it saves what it got to ``out.rankR``."""
    import torch.distributed as dist

    from repsim.evaluators.agreement import gather_rows
    from repsim.evaluators.knn import knn_neighbours, knn_vote
    from repsim.evaluators.probes import ProbeShard, probe_grid

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["REPSIM_DIST_INIT"], rank=rank,
                            world_size=size)
    got: dict[str, list] = {"knn": [], "probe": [], "gather": []}
    for task in tasks.split(","):
        if task == "knn":
            for case in knn_cases():
                mine = torch.tensor(rank_positions(case["train"].shape[0], case["unit"],
                                                   World(rank, size)), dtype=torch.long)
                sims, idx = knn_neighbours(case["train"][mine],
                                           case["test"] if rank == 0 else None, case["k"],
                                           index=mine, memory_mb=case["memory_mb"],
                                           group=dist.group.WORLD)
                if rank == 0:
                    pred = knn_vote(sims, case["labels"][idx], 4)
                    got["knn"].append((sims, idx,
                                       float((pred == case["test_labels"]).double().mean())))
                else:
                    assert sims is None and idx is None
        if task == "probe":
            data = probe_data()
            sync = dist.new_group(backend="gloo")
            mine_test = torch.tensor(rank_positions(29, 5, World(rank, size)), dtype=torch.long)
            for grid in PROBE_GRIDS:
                kw = {k: v for k, v in grid.items() if k != "unit"}
                mine = torch.tensor(rank_positions(61, grid["unit"], World(rank, size)),
                                    dtype=torch.long)
                shard = ProbeShard(mine, data["y"], dist.group.WORLD, sync)
                res = probe_grid(data["x"][mine], data["y"][mine], data["xt"][mine_test],
                                 data["yt"][mine_test], shard=shard, **kw)
                got["probe"].append((res.runs, res.best, res.protocol,
                                     {k: v.clone() for k, v in res.model.state_dict().items()}))
        if task == "gather":  # rows by units of 3 of 10 (of 3 ranks, one holds 3 rows), then
            # a share with a row of another rank, then one without its last row: both refused
            mine = torch.tensor(rank_positions(10, 3, World(rank, size)), dtype=torch.long)
            for where in (mine, torch.cat([mine, torch.tensor([(rank + 1) * 3 % 9])]),
                          mine[:-1] if rank == size - 1 else mine):
                try:
                    got["gather"].append(gather_rows(where[:, None] * torch.ones(1, 2), where,
                                                     10, dist.group.WORLD, rank == 0))
                except RuntimeError as exc:
                    got["gather"].append(str(exc))
        if task == "fail":  # rank 1 fails before the search its peers wait in
            if rank == 1:
                raise RuntimeError("rank 1 fails on purpose")
            case = knn_cases()[0]
            knn_neighbours(case["train"], case["test"] if rank == 0 else None, 3,
                           group=dist.group.WORLD)
    torch.save(got, f"{out}.rank{rank}")
    dist.destroy_process_group()


def start_workers(tasks: str, size: int, tmp_path: Path) -> list[subprocess.Popen]:
    procs = []
    for rank in range(size):
        env = os.environ | {"RANK": str(rank), "WORLD_SIZE": str(size), "OMP_NUM_THREADS": "1",
                            "REPSIM_DIST_INIT": f"file://{tmp_path / 'store'}"}
        procs.append(subprocess.Popen([sys.executable, __file__, tasks, str(tmp_path / "out")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[int, list[dict[str, list]]]:
    """The k-NN, probe and gather tasks on W = 2 and 3 ranks (one start of the ranks for both): W and
    what every rank got."""
    size = request.param
    tmp = tmp_path_factory.mktemp(f"ranks{size}")
    results = wait(start_workers("knn,probe,gather", size, tmp), timeout=180)
    assert all(code == 0 for code, _ in results), results
    return size, [torch.load(tmp / f"out.rank{r}", weights_only=True) for r in range(size)]


def test_a_rank_that_fails_in_an_evaluator_takes_the_others_down(tmp_path: Path) -> None:
    started = time.time()
    results = wait(start_workers("fail", 2, tmp_path), timeout=120)
    assert time.time() - started < 100  # rank 0 does not wait for ever for the failed one
    assert results[1][0] != 0 and "rank 1 fails on purpose" in results[1][1]
    assert results[0][0] != 0


def test_sharded_knn_finds_the_neighbours_of_one_process(ranks) -> None:
    cases = knn_cases()
    got = ranks[1][0]["knn"]
    assert len(got) == len(cases)
    for case, (sims, idx, acc) in zip(cases, got):
        one_sims, one_idx, one_acc = knn_of_one_process(case)
        assert torch.equal(idx, one_idx)  # the same neighbours, in the same order
        assert torch.equal(sims, one_sims)
        assert acc == one_acc
    # the data ties: equal similarities inside the lists, so the tie-break decides their order
    tied = knn_of_one_process(cases[0])[0]
    assert (tied[:, :-1] == tied[:, 1:]).any()


def test_rank_0_gathers_every_rows_share_in_the_split_order(ranks) -> None:
    size, per_rank = ranks
    whole, repeated, dropped = per_rank[0]["gather"]
    assert torch.equal(whole, torch.arange(10.0)[:, None].expand(10, 2))
    assert repeated == f"the ranks hold {10 + size} rows at positions that are not the 10 " \
        "examples of the split, each once"
    assert dropped.startswith("the ranks hold 9 rows at positions")
    assert all(r["gather"] == [None] * 3 for r in per_rank[1:])


def test_ddp_probes_train_the_probes_of_one_process(ranks) -> None:
    """Every step's global minibatch is the single-process one and BatchNorm sees its statistics,
    so the DDP gradient is the single-process gradient up to the order of float sums: weights
    and losses agree to float32 rounding (measured max |Δweight| 2.4e-7), accuracies and every
    count exactly."""
    from repsim.evaluators.probes import probe_grid

    _, per_rank = ranks
    got = per_rank[0]["probe"]
    data = probe_data()
    worst = 0.0
    for grid, (runs, best, protocol, state) in zip(PROBE_GRIDS, got, strict=True):
        kw = {k: v for k, v in grid.items() if k != "unit"}
        one = probe_grid(data["x"], data["y"], data["xt"], data["yt"], **kw)
        assert protocol == one.protocol  # n_fit, n_selection, n_eval: every example once
        assert protocol["n_eval"] == 29 and protocol["n_fit"] + (
            protocol["n_selection"] if kw["selection"] == "holdout" else 0) == 61
        assert best == one.best
        for a, b in zip(runs, one.runs, strict=True):
            assert a["selection_accuracy"] == b["selection_accuracy"]
            assert a["eval_accuracy"] == b["eval_accuracy"]
            assert a["selection_loss"] == pytest.approx(b["selection_loss"], rel=1e-5)
        for key, value in one.model.state_dict().items():
            if value.is_floating_point():
                worst = max(worst, float((state[key] - value).abs().max()))
            else:
                assert torch.equal(state[key], value)
    assert worst < 1e-5, worst
    for rank_got in per_rank[1:]:  # every rank ends with the same result
        for (runs, best, protocol, state), (r0, b0, p0, s0) in zip(rank_got["probe"], got):
            assert (runs, best, protocol) == (r0, b0, p0)
            assert all(torch.equal(state[k], s0[k]) for k in s0)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_write_the_numbers_of_one(recipe: Path, tmp_path: Path) -> None:
    """nccl for the run, gloo for the host-side exchanges, each rank on its own GPU: the
    similarities and k-NN of two GPUs are one GPU's, the probes' accuracies too."""
    from repsim.run import run_recipe

    recipe.write_text(recipe.read_text().replace("threads = 1", 'threads = 1\ndevice = "cuda"')
                      + PROBE)
    one = run_recipe(recipe, tmp_path / "one", progress=False, quiet=True)
    results = wait(launch(recipe, tmp_path / "many", 2, tmp_path / "store"))
    assert all(code == 0 for code, _ in results), results
    a, b = similarity(one), similarity(tmp_path / "many")
    assert a.keys() == b.keys() and a
    for key in a:  # a forward of a batch on another GPU of the same kind: the same kernels
        x, y = (torch.tensor(r[key]["values"], dtype=torch.float64) for r in (a, b))
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-9, equal_nan=True)

    assert evaluator_data(one, "knn") == evaluator_data(tmp_path / "many", "knn")
    for a, b in linear_probe_pairs(one, tmp_path / "many"):
        assert [r["eval_accuracy"] for r in a["runs"]] == [r["eval_accuracy"] for r in b["runs"]]
    assert json.loads((tmp_path / "many/provenance.json").read_text())["world_size"] == 2
