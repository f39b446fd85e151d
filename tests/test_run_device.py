"""Devices, precision, threads, forward batch apart from the estimator's minibatch, and a run
killed with SIGKILL that resumes to byte-identical files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from repsim.cli import cli
from repsim.recipe import check_recipe
from repsim.run import Run


def values(run_dir: Path, metric: str = "minibatch_cka", pair: str = "a__b") -> torch.Tensor:
    data = json.loads((run_dir / f"similarity/{metric}/{pair}.json").read_text())
    return torch.tensor(data["values"], dtype=torch.float64)


def execute(path: Path, out: Path, **overrides: object) -> Path:
    return Run(check_recipe(path, run_overrides=overrides or None), out, progress=False,
               quiet=True).execute()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_that_is_absent_is_a_clear_error(runner, write_recipe) -> None:
    result = runner.invoke(cli, ["run", str(write_recipe()), "--device", "cuda", "--quiet"])
    assert result.exit_code == 2
    assert "run.device = 'cuda'" in result.output and "no CUDA device" in result.output
    assert "Traceback" not in result.output


def test_fp16_on_the_cpu_and_a_bad_device_name_are_refused(runner, write_recipe) -> None:
    path = str(write_recipe())
    result = runner.invoke(cli, ["run", path, "--device", "cpu", "--precision", "fp16"])
    assert result.exit_code == 2 and "bf16" in result.output
    result = runner.invoke(cli, ["run", path, "--device", "tpu"])
    assert result.exit_code == 2 and "'tpu'" in result.output


def test_provenance_records_device_precision_and_threads(write_recipe, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    run = execute(write_recipe(), tmp_path / "run", device="cpu", threads=1)
    device = json.loads((run / "provenance.json").read_text())["device"]
    assert device == {"device": "cpu", "precision": "fp32", "tf32": False,
                      "cache_dtype": "float32", "threads": 1, "engine_device": "cpu"}
    assert torch.get_num_threads() == before  # restored after the run


def test_bf16_forwards_stay_close_to_fp32(write_recipe, tmp_path: Path) -> None:
    path = write_recipe()
    fp32 = values(execute(path, tmp_path / "fp32", device="cpu"))
    bf16 = values(execute(path, tmp_path / "bf16", device="cpu", precision="bf16"))
    # bfloat16 keeps 8 bits of mantissa; on these 3-block ViTs CKA moved by about 1e-3.
    assert float((fp32 - bf16).abs().max()) < 2e-2
    assert not torch.equal(fp32, bf16)  # the forwards really ran in bf16


def test_the_forward_batch_is_not_the_estimator_minibatch(write_recipe, tmp_path: Path) -> None:
    """batch_size = 8 (both) against forward batches of 20 with the metric's own batch_size = 8:
    the same minibatches of the same examples; only the model's kernels may round differently
    at another batch size."""
    same = write_recipe(name="same.toml")
    apart = write_recipe(name="apart.toml", run="", metrics=(
        'name = "minibatch_cka"\nparams = { batch_size = 8 }'))
    apart.write_text(apart.read_text().replace("batch_size = 8\n", "batch_size = 20\n", 1))
    ref = values(execute(same, tmp_path / "same"))
    got = execute(apart, tmp_path / "apart")
    desc = json.loads((got / "similarity/minibatch_cka/a__b.json").read_text())["description"]
    assert desc["batch_size"] == 8 and desc["batches"] == 5 and desc["examples"] == 40
    assert float((values(got) - ref).abs().max()) < 1e-6


KILLER = str(Path(__file__).parent / "kill_after_saves.py")  # run as a script


def digest(run_dir: Path) -> dict[str, str]:
    """sha256 of every result file; timing lives in provenance.json, state in cache/."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.parts[len(run_dir.parts)] != "cache" and p.name != "provenance.json"}


def test_a_run_killed_between_checkpoints_resumes_to_byte_identical_files(
        write_recipe, tmp_path: Path) -> None:
    path = write_recipe(run="checkpoint_every = 2\nbootstrap = 50", extra=textwrap.dedent("""
        [[metrics]]
        name = "linear_cka"

        [[evaluators]]
        name = "knn"
        params = { k = 5 }
        """))
    path.write_text(path.read_text().replace("examples = 40", "examples = 40\ntrain_examples = 24"))
    reference = execute(path, tmp_path / "reference")
    killed = subprocess.run([sys.executable, KILLER, str(path), str(tmp_path / "resumed"),
                             "2"], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    progress = json.loads((tmp_path / "resumed/cache/eval/rank0/progress.json").read_text())
    assert (progress["batches"], progress["done"]) == (4, False)  # 2nd save of 5 batches
    resumed = execute(path, tmp_path / "resumed")
    assert digest(resumed) == digest(reference)


@pytest.mark.cuda
def test_cuda_and_cpu_agree_in_fp32(write_recipe, tmp_path: Path) -> None:
    path = write_recipe()
    cpu = values(execute(path, tmp_path / "cpu", device="cpu"))
    gpu_dir = execute(path, tmp_path / "cuda", device="cuda")
    assert float((values(gpu_dir) - cpu).abs().max()) < 1e-5
    device = json.loads((gpu_dir / "provenance.json").read_text())["device"]
    assert device["device"] == "cuda" and device["gpu"]


@pytest.mark.cuda
def test_cuda_bf16_forwards(write_recipe, tmp_path: Path) -> None:
    path = write_recipe()
    fp32 = values(execute(path, tmp_path / "fp32", device="cuda"))
    bf16 = values(execute(path, tmp_path / "bf16", device="cuda", precision="bf16"))
    diff = float((fp32 - bf16).abs().max())
    print(f"cuda bf16 vs fp32: max |ΔCKA| = {diff:.2e}")
    assert diff < 2e-2


@pytest.mark.cuda
def test_metric_sink_on_cuda_equals_the_cpu() -> None:
    import repsim
    from repsim.plugins import build_part
    from repsim.run.sinks import MetricSink

    g = torch.Generator().manual_seed(0)
    feats = {f"l{i}": torch.randn(200, 64, generator=g) for i in range(4)}
    sink = MetricSink("cka", build_part("metric", "minibatch_cka"), {"a": list(feats)},
                      [("a", "a")], 32, device="cuda")
    for lo in range(0, 200, 50):
        sink.update_features({"a": {k: v[lo:lo + 50].cuda() for k, v in feats.items()}})
    expected = repsim.similarity(feats, feats, batch_size=32).values
    torch.testing.assert_close(sink.compute()[("a", "a")].values, expected, rtol=0, atol=1e-6)


EVALUATORS_ON = """
[[evaluators]]
name = "knn"
params = {{ k = 5, device = "{device}" }}

[[evaluators]]
name = "linear_probe"
params = {{ layers = "last", base_lrs = [0.1, 0.01], weight_decays = [0.0], epochs = [4], \
warmup_epochs = [1], batch_size = 8, top = 1, device = "{device}" }}
"""


@pytest.mark.cuda
def test_knn_and_probes_on_cuda_agree_with_the_cpu(write_recipe, tmp_path: Path) -> None:
    """The evaluators' own device: the same features (cached by one CPU pass) searched and
    probed on the GPU give the CPU's neighbours' accuracies and probes within float rounding."""
    runs = {}
    for device in ("cpu", "cuda"):
        path = write_recipe(run="train_examples = 20", extra=EVALUATORS_ON.format(device=device),
                            name=f"{device}.toml")
        runs[device] = execute(path, tmp_path / device, device="cpu")

    def data(run: Path, name: str) -> dict:
        return json.loads((run / f"evaluators/{name}/result.json").read_text())["data"]

    knn_cpu, knn_gpu = (data(runs[d], "knn")["accuracy"] for d in ("cpu", "cuda"))
    flat = [(a, b) for m in knn_cpu for r in knn_cpu[m] for a, b in
            zip(knn_cpu[m][r].values(), knn_gpu[m][r].values(), strict=True)]
    assert flat and all(abs(a - b) <= 1 / 40 for a, b in flat)  # at most a near-tie flips
    pa, pb = (data(runs[d], "linear_probe")["results"] for d in ("cpu", "cuda"))
    for model, inputs in pa.items():
        for label, depths in inputs.items():
            a, b = depths["0"], pb[model][label]["0"]
            for ra, rb in zip(a["runs"], b["runs"], strict=True):
                assert abs(ra["eval_accuracy"] - rb["eval_accuracy"]) <= 1 / 40
                assert ra["selection_loss"] == pytest.approx(rb["selection_loss"], rel=1e-3)
