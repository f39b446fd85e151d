"""The preflight: every missing file of a recipe listed at once, with where it is published and
which location points at it, an estimate of the compute per figure, exit code 2 — before any
weights load. And `repsim report RUN_DIR`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repsim.cli import cli
from repsim.preflight import model_costs, preflight
from repsim.recipe import check_recipe

RECIPES = Path(__file__).parents[1] / "recipes"
REPO = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def no_data_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine without ImageNet, COCO or checkpoints: an empty working directory, no paths
    file, none of the variables."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    for name in ("REPSIM_IMAGENET", "REPSIM_COCO", "REPSIM_CHECKPOINTS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_run_lists_every_missing_file_with_its_source_and_the_estimate(runner) -> None:
    result = runner.invoke(cli, ["run", str(RECIPES / "paper.toml")])
    assert result.exit_code == 2, result.output
    out = result.output
    missing = [ln for ln in out.splitlines() if ln.startswith("- ")]
    # ImageNet, 8 official checkpoints, COCO for both detector evaluators, 4 fine-tuning runs
    assert len(missing) == 15, out
    assert all("does not exist" in ln for ln in missing)
    checkpoints = [ln for ln in missing if ".params.checkpoint" in ln]
    assert len(checkpoints) == 8 and all("https://dl.fbaipublicfiles.com/" in ln
                                         for ln in checkpoints)
    assert "repsim finetune" in out
    for variable in ("REPSIM_IMAGENET", "REPSIM_COCO", "REPSIM_CHECKPOINTS"):
        assert f"export {variable}=" in out
    for figure in ("fig1", "fig2", "fig3", "fig2a", "fig2c", "fig4", "fig5", "fig7_tables6_7",
                   "fig11", "fig14_path_efficiency", "park", "paper.toml (all)"):
        assert any(ln.startswith(figure + " ") for ln in out.splitlines()), figure
    assert "CPU hours" in out and "GPU hours" in out and "FlopCounterMode" in out
    assert "nothing was loaded or run" in out and "Traceback" not in out
    assert not Path("runs").exists()  # nothing created


def test_run_of_the_paper_recipe_refuses_in_under_ten_seconds(no_data_here: Path) -> None:
    """The whole command, as a user runs it (a fresh interpreter: imports counted)."""
    env = {**os.environ, "REPSIM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "repsim", "run", str(RECIPES / "paper.toml")],
                          capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "15 file(s) missing" in proc.stderr and "Traceback" not in proc.stderr
    # 4-5 s on an idle 2-core machine; the bound leaves room for a busy one
    assert seconds < 30, seconds


def test_validate_lists_the_same_and_the_estimate(runner) -> None:
    result = runner.invoke(cli, ["validate", str(RECIPES / "paper/fig3.toml")])
    assert result.exit_code == 2
    missing = [ln for ln in result.output.splitlines() if ln.startswith("- ")]
    assert len(missing) == 5  # ImageNet and the four ViTs
    assert any(ln.startswith("fig3 ") for ln in result.output.splitlines())


def test_files_inside_dataset_folders_are_checked(tmp_path: Path) -> None:
    """ImageNet with val but no train (the probes read train); COCO without annotations."""
    (tmp_path / "in1k/val/n01440764").mkdir(parents=True)
    (tmp_path / "coco/val2017").mkdir(parents=True)
    os.environ["REPSIM_IMAGENET"] = str(tmp_path / "in1k")
    os.environ["REPSIM_COCO"] = str(tmp_path / "coco")
    try:
        pf = preflight(RECIPES / "paper.toml", estimate="if_missing")
    finally:
        del os.environ["REPSIM_IMAGENET"], os.environ["REPSIM_COCO"]
    paths = {m.path for m in pf.missing}
    assert str(tmp_path / "in1k/train") in paths
    assert str(tmp_path / "in1k") not in paths and str(tmp_path / "coco") not in paths
    assert str(tmp_path / "coco/train2017") in paths
    assert str(tmp_path / "coco/annotations/instances_val2017.json") in paths
    assert str(tmp_path / "coco/annotations/instances_train2017.json") in paths
    assert str(tmp_path / "coco/val2017") not in paths


def test_agreement_of_the_models_outputs_reads_no_train_split(tmp_path: Path) -> None:
    """prediction_agreement on the models' own outputs (its default) neither needs the train
    folder nor counts probe training in the estimate."""
    (tmp_path / "in1k/val/n01440764").mkdir(parents=True)
    recipe = tmp_path / "agree.toml"
    recipe.write_text(f"""
[run]
output = "{tmp_path / 'run'}"
[data]
dataset = "imagefolder"
split = "val"
params = {{ root = "{tmp_path / 'in1k'}" }}
[models.a]
model = "timm"
params = {{ arch = "vit_tiny_patch16_224" }}
[models.b]
model = "timm"
params = {{ arch = "vit_tiny_patch16_224", seed = 1 }}
[layers]
blocks = {{ selector = "blocks" }}
[[metrics]]
name = "minibatch_cka"
[[evaluators]]
name = "prediction_agreement"
""")
    pf = preflight(recipe, estimate="always")
    assert str(tmp_path / "in1k/train") not in {m.path for m in pf.missing}
    assert "prediction_agreement" not in pf.estimate_text()


def test_flops_are_counted_on_the_meta_device() -> None:
    """ViT-B/16 at 224: 17.6 GMACs (timm's and the papers' figure), ResNet-50 4.1 GMACs."""
    checked = check_recipe(RECIPES / "paper/fig11.toml", missing_ok=True)
    costs = model_costs(checked)
    assert costs["mocov3"].flops == pytest.approx(2 * 17.56e9, rel=0.01)
    assert costs["resnet50_dino"].flops == pytest.approx(2 * 4.09e9, rel=0.01)
    assert costs["mocov3"].tokens == 197 and costs["mocov3"].width == 768
    assert costs["mocov3"].dims["blocks.11"] == 768  # CLS token width


def test_fine_tuning_runs_yet_to_be_made_are_counted_from_their_recipes() -> None:
    """Fig. 14 compares runs of recipes/paper/finetune_*.toml: their Table 5 training (100
    epochs of ImageNet-1k train, 3 forwards a step) is in the figure's estimate."""
    pf = preflight(RECIPES / "paper/fig14_path_efficiency.toml")
    fig = pf.figures[0]
    vit_b = 2 * 17.56e9
    assert fig.training == pytest.approx(4 * 100 * 1_281_167 * 3 * vit_b, rel=0.01)
    assert fig.forward == pytest.approx(8 * 1024 * vit_b, rel=0.01)  # 4 pretrained + 4 fine-tuned
    assert sum("finetune_mae.toml" in n for n in fig.notes) == 1


def test_the_estimate_scales_with_the_images(tmp_path: Path) -> None:
    small = preflight(RECIPES / "paper/fig1.toml").figures[0]
    big = preflight(RECIPES / "paper/fig1.toml", run_overrides={"examples": 4096}).figures[0]
    assert small.images == 1024 and big.images == 4096
    assert big.forward == pytest.approx(4 * small.forward)
    assert small.forward == pytest.approx(1024 * 4 * 2 * 17.56e9, rel=0.01)


def test_a_measured_cpu_throughput_is_used(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache/cpu_throughput.json").write_text(json.dumps(
        {"flops": 1e12, "how": "test", "when": "today"}))
    pf = preflight(RECIPES / "paper/fig1.toml")
    assert pf.cpu_flops == 1e12 and "measured on this machine" in pf.cpu_basis


def test_report_rebuilds_from_a_run_directory(runner, write_recipe, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["run", str(write_recipe()), "--quiet"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    (run_dir / "report/index.html").unlink()
    result = runner.invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report/index.html").read_text()
    assert "Fig. 1" in page and "data:image/png;base64," in page
    assert (run_dir / "report/report.md").is_file()


@pytest.mark.parametrize("case", ["absent", "not a run", "a file"])
def test_report_of_something_that_is_not_a_run(runner, tmp_path: Path, case: str) -> None:
    target = tmp_path / "x"
    if case == "not a run":
        target.mkdir()
    elif case == "a file":
        target.write_text("")
    result = runner.invoke(cli, ["report", str(target)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(target) in result.output and "repsim run" in result.output


def test_an_unreadable_checkpoint_is_listed(tmp_path: Path, write_recipe,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that exists but cannot be read (permissions; root reads everything, so the
    permission check is stubbed) is listed like a missing one."""
    import repsim.preflight as pf

    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(b"")
    text = write_recipe().read_text().replace("seed = 1,", f'seed = 1, checkpoint = "{ckpt}",')
    recipe = write_recipe(text)
    monkeypatch.setattr(pf.os, "access", lambda p, mode: Path(p) != ckpt)
    found = preflight(recipe, estimate="if_missing").missing
    assert [m.line() for m in found] == [
        f"models.b.params.checkpoint: '{ckpt}' cannot be read (it exists: check its "
        "permissions)"]
