"""Model-level reuse: adding a model to a run extracts that model alone, removing one recomputes
nothing, and either way the result files are those of a fresh run of the final recipe."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import recipe_text, tiny_vit  # noqa: E402
from test_distributed import EXTRA as DISTRIBUTED_EXTRA  # noqa: E402
from test_stages import digest, execute  # noqa: E402

# test_distributed's metric and evaluators, and one that reads model outputs
EXTRA = DISTRIBUTED_EXTRA + textwrap.dedent("""
    [[evaluators]]
    name = "prediction_agreement"
    """)


def write(tmp_path: Path, models: str, name: str) -> Path:
    """The tiny recipe with models a, b, c (their order as given) and a metric and evaluators
    of every kind: streaming (bootstrap), full-batch, cache readers, a streaming observer."""
    text = recipe_text(tmp_path / "unused", extra=EXTRA,
                       run="bootstrap = 20\ntrain_examples = 24")
    text = text.split("[models.a]")[0] + "[layers]" + text.split("[layers]", 1)[1]
    seeds = {"a": 0, "b": 1, "c": 2}
    text += "".join(f'\n[models.{m}]\nmodel = "timm"\nparams = {tiny_vit(seeds[m])}\n'
                    for m in models)
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def forwarded(monkeypatch) -> list[list[str]]:
    """The models each pass forwards."""
    from repsim.run import features

    calls: list[list[str]] = []
    original = features.FeaturePass.__init__

    def record(self, models, *args, **kwargs):
        calls.append(list(models))
        original(self, models, *args, **kwargs)

    monkeypatch.setattr(features.FeaturePass, "__init__", record)
    return calls


def kernel_files(run: Path, model: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns
            for p in (run / "cache/eval/kernels").glob(f"*/{model}/*.safetensors")}


def max_relative_difference(run: Path, other: Path) -> float:
    worst = 0.0
    for path in sorted((run / "similarity").rglob("*.safetensors")):
        a, b = load_file(str(path)), load_file(str(other / path.relative_to(run)))
        for key in a:
            diff = (a[key] - b[key]).abs() / b[key].abs().clamp_min(1e-300)
            worst = max(worst, float(diff.nan_to_num(0).max()))
    return worst


def test_adding_a_model_extracts_only_that_model(tmp_path: Path, forwarded) -> None:
    fresh = execute(write(tmp_path, "abc", "abc.toml"), tmp_path / "fresh")
    assert forwarded == [["a", "b", "c"], ["a", "b", "c"]]  # eval and train passes
    forwarded.clear()

    run = execute(write(tmp_path, "ab", "ab.toml"), tmp_path / "run")
    kept = kernel_files(run, "a") | kernel_files(run, "b")
    assert kept
    forwarded.clear()
    execute(write(tmp_path, "abc", "abc.toml"), run)
    assert forwarded == [["c"], ["c"]]
    assert kernel_files(run, "a") | kernel_files(run, "b") == kept  # not written again
    assert max_relative_difference(run, fresh) <= 1e-12
    assert digest(run) == digest(fresh)  # every result file, byte for byte


def test_removing_a_model_recomputes_nothing(tmp_path: Path, forwarded) -> None:
    fresh = execute(write(tmp_path, "ac", "ac.toml"), tmp_path / "fresh")
    run = execute(write(tmp_path, "abc", "abc.toml"), tmp_path / "run")
    forwarded.clear()
    execute(write(tmp_path, "ac", "ac.toml"), run)
    assert forwarded == []
    assert not kernel_files(run, "b") and not (run / "cache/eval/rank0/models/b").exists()
    assert digest(run) == digest(fresh)


def test_kernels_are_stored_as_upper_triangles(tmp_path: Path) -> None:
    run = execute(write(tmp_path, "ab", "ab.toml"), tmp_path / "run")
    files = sorted((run / "cache/eval/kernels/minibatch_cka/a").glob("*.safetensors"))
    kernels = torch.cat([load_file(str(p))["kernels"] for p in files], dim=1)
    # 3 blocks, 40 examples in minibatches of 8, 8·7/2 float64 values each: 224 bytes a layer
    # and minibatch (the full 8×8 matrix would be 512).
    assert kernels.shape == (3, 5, 28) and kernels.dtype == torch.float64


def test_changing_pairs_or_bootstrap_forwards_nothing(tmp_path: Path, forwarded) -> None:
    run = execute(write(tmp_path, "ab", "ab.toml"), tmp_path / "run")
    changed = write(tmp_path, "ab", "changed.toml")
    changed.write_text(changed.read_text().replace("bootstrap = 20", 'bootstrap = 10\n'
                                                   'pairs = "cross"'))
    fresh = execute(changed, tmp_path / "fresh")
    forwarded.clear()
    execute(changed, run)
    assert forwarded == []
    assert digest(run) == digest(fresh)


def test_a_run_adding_a_model_killed_mid_pass_resumes_to_the_fresh_files(tmp_path: Path) -> None:
    from test_run_device import KILLER

    abc = write(tmp_path, "abc", "abc.toml")
    abc.write_text(abc.read_text().replace("bootstrap = 20",
                                           "bootstrap = 20\ncheckpoint_every = 1"))
    fresh = execute(abc, tmp_path / "fresh")
    run = execute(write(tmp_path, "ab", "ab.toml"), tmp_path / "run")
    killed = subprocess.run([sys.executable, KILLER, str(abc), str(run), "2"],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert (run / "cache/eval/rank0/models/c/progress.json").exists()  # c's pass half done
    execute(abc, run)
    assert digest(run) == digest(fresh)


def test_two_ranks_add_a_model_to_the_fresh_run_files(tmp_path: Path) -> None:
    from test_distributed import launch, wait

    ab, abc = write(tmp_path, "ab", "ab.toml"), write(tmp_path, "abc", "abc.toml")
    fresh, run = tmp_path / "fresh", tmp_path / "run"
    for recipe, out, store in ((abc, fresh, "s0"), (ab, run, "s1")):
        assert all(rc == 0 for rc, _ in wait(launch(recipe, out, 2, tmp_path / store))), out
    kept = kernel_files(run, "a") | kernel_files(run, "b")
    assert {p.name[:3] for p in kept} == {"000", "001"}  # both ranks' kernels
    results = wait(launch(abc, run, 2, tmp_path / "s2"))
    assert all(rc == 0 for rc, _ in results), results
    assert kernel_files(run, "a") | kernel_files(run, "b") == kept
    same = {k: v for k, v in digest(run).items() if k.startswith(("similarity", "tables"))}
    assert same and same == {k: v for k, v in digest(fresh).items()
                             if k.startswith(("similarity", "tables"))}
