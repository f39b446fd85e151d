"""Fine-tuning (repsim.finetune): tiny timm ViTs on the digits, on the CPU, a few steps each.

The loss falls; a run killed with SIGKILL resumes to the weights of an uninterrupted one, bit
for bit; two processes equal one accumulating; layer decay, mixup targets and path lengths are
what they should be; snapshots come back as `finetuned` models; the paper's fine-tuning and
Fig. 14 recipes run end to end at CPU size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from repsim.errors import DataError, RecipeError
from repsim.finetune.config import parse_finetune_recipe, preset
from repsim.finetune.plugin import finetune_command, finetune_recipe
from repsim.finetune.snapshots import PathMeter, read_path_lengths
from repsim.plugins import build_part
from repsim.store import read_tensors

RECIPES = Path(__file__).parents[1] / "recipes"
TINY = {"arch": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "depth": 2,
                                                   "embed_dim": 32, "num_heads": 2}}


def toml(value: Any) -> str:
    """A TOML value (inline tables and arrays; JSON strings are TOML basic strings)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(str(value) if isinstance(value, Path) else value)


def dumps(doc: dict[str, Any]) -> str:
    """A recipe as TOML: tables, [models.LABEL] tables, arrays of tables; None left out."""
    def body(d: dict[str, Any]) -> str:
        return "".join(f"{k} = {toml(v)}\n" for k, v in d.items() if v is not None)

    out = []
    for name, section in doc.items():
        if isinstance(section, list):
            out += [f"[[{name}]]\n" + body(item) for item in section]
        elif name == "models":
            out += [f"[models.{label}]\n" + body(m) for label, m in section.items()]
        else:
            out.append(f"[{name}]\n" + body(section))
    return "\n".join(out)


def recipe(tmp: Path, name: str = "ft.toml", seed: int = 0, model: dict | None = None,
           **finetune: Any) -> Path:
    """A fine-tuning recipe: a tiny ViT on 128 digits, 2 epochs of 4 steps of 32, Table 5
    otherwise (mixup, cutmix, RandAugment, drop path, layer decay)."""
    settings = {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "output": tmp / "run",
                **finetune}
    doc = {"model": model or {"model": "timm", "params": {**TINY, "seed": seed}},
           "data": {"dataset": "digits", "split": "train", "examples": 128},
           "finetune": settings, "run": {"device": "cpu", "threads": 1, "device_batch": 16}}
    path = tmp / name
    path.write_text(dumps(doc))
    return path


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run (Table 5's augmentation and regularisation, 2 epochs)."""
    tmp = tmp_path_factory.mktemp("ft")
    return finetune_recipe(recipe(tmp))


def test_the_plugin_imports_no_torch() -> None:
    code = ("import sys; from repsim.plugins import get_host; "
            "print('finetuned' in get_host().registry('model'), 'torch' in sys.modules, "
            "'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]  # a built-in part, registered lazily


def test_the_loss_falls(tmp_path: Path) -> None:
    # Table 5 without the mixing and RandAugment, which hide a tiny ViT's first steps; a ViT
    # from scratch leaves chance (ln 10 = 2.303) slowly: 64 steps, averaged pooling.
    model = {"model": "timm", "params": {**TINY, "kwargs": {**TINY["kwargs"],
                                                            "global_pool": "avg"}}}
    path = recipe(tmp_path, model=model, epochs=8, batch_size=16, lr=3e-3, mixup=0.0,
                  cutmix=0.0, auto_augment="none", hflip=0.0, crop_scale=[0.6, 1.0])
    run = finetune_recipe(path)
    loss = json.loads((run / "provenance.json").read_text())["loss"]
    assert len(loss) == 8 and loss[0] == pytest.approx(math.log(10), abs=0.01)
    assert max(loss[-2:]) < min(loss[:2]) - 0.05, loss


KILLER = textwrap.dedent("""\
    import os, signal, sys
    from repsim import training

    original = training._save

    def save_then_die(*args):
        original(*args)
        os.kill(os.getpid(), signal.SIGKILL)  # right after epoch 1's checkpoint

    training._save = save_then_die
    from repsim.finetune.plugin import finetune_recipe
    finetune_recipe(sys.argv[1])
    """)


def test_a_run_killed_with_sigkill_resumes_bit_identically(tmp_path: Path, done: Path) -> None:
    path = recipe(tmp_path, name="kill.toml", epochs=2)
    killed = subprocess.run([sys.executable, "-c", KILLER, str(path)], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "run"
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["status"] == "running" and prov["epochs_done"] == 1
    assert not (run / "final.safetensors").exists()
    finetune_recipe(path)
    for name in ("final.safetensors", "path_length.safetensors", "snapshots/epoch_000.safetensors",
                 "snapshots/epoch_001.safetensors", "snapshots/epoch_002.safetensors"):
        a, b = read_tensors(run / name), read_tensors(done / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    resumed = json.loads((run / "provenance.json").read_text())
    reference = json.loads((done / "provenance.json").read_text())
    assert resumed["loss"] == reference["loss"]
    assert resumed["path_efficiency"] == reference["path_efficiency"]


RANK = textwrap.dedent("""\
    import sys
    from repsim.finetune.plugin import finetune_recipe
    finetune_recipe(sys.argv[1])
    """)


def test_two_processes_compute_what_one_accumulating_does(tmp_path: Path, done: Path) -> None:
    # `done` runs 1 process × 2 micro-batches of 16; here 2 processes × 1 micro-batch of 16.
    path = recipe(tmp_path, name="ddp.toml")
    procs = [subprocess.Popen(
        [sys.executable, "-c", RANK, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=os.environ | {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                     "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
                                     "REPSIM_DIST_INIT": f"file://{tmp_path / 'store'}"})
        for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    prov = json.loads((tmp_path / "run/provenance.json").read_text())
    assert (prov["world_size"], prov["accumulate"], prov["device_batch"]) == (2, 1, 16)
    a = read_tensors(tmp_path / "run/final.safetensors")
    b = read_tensors(done / "final.safetensors")
    for k in a:  # the same micro-batches, augmentations, mixes and drop-path masks
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-6)


def test_layer_decay_gives_each_block_three_quarters_of_the_next() -> None:
    from repsim.finetune.runner import optimizer_and_schedule

    kwargs = {**TINY["kwargs"], "depth": 3, "num_classes": 10}
    model = build_part("model", "timm", arch=TINY["arch"], kwargs=kwargs).module
    settings = preset("table5", epochs=10, warmup_epochs=1, batch_size=512)
    opt, schedule = optimizer_and_schedule(model, settings, steps_per_epoch=5)
    assert settings.learning_rate == 1e-3 * 512 / 256
    schedule.step_update(5)  # the end of warm-up: the peak
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    of = {"embed": lr[id(named["pos_embed"])], "head": lr[id(named["head.weight"])],
          **{i: lr[id(named[f"blocks.{i}.attn.qkv.weight"])] for i in range(3)}}
    assert of["head"] == pytest.approx(settings.learning_rate)
    for lower, upper in [("embed", 0), (0, 1), (1, 2), (2, "head")]:
        assert of[lower] / of[upper] == pytest.approx(0.75)
    assert lr[id(named["blocks.1.norm1.weight"])] == of[1]  # one rate per block


def test_mixup_and_cutmix_targets_sum_to_one() -> None:
    from repsim.finetune.augment import seeded
    from repsim.finetune.runner import _mixup

    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    for switch in (0.0, 1.0):  # mixup only, cutmix only
        mix = _mixup(preset("table5", mixup_switch_prob=switch), 10)
        with seeded(int(switch)):
            mixed, target = mix(x.clone(), y)
        assert target.shape == (8, 10) and (target >= 0).all()
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        assert not torch.equal(mixed, x)
    assert _mixup(preset("table5", mixup=0.0, cutmix=0.0), 10) is None


def test_the_path_length_of_a_straight_line_is_its_displacement() -> None:
    line, detour = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    meters = PathMeter(line), PathMeter(detour)
    direction = torch.tensor([[1.0, -2.0, 0.5]])
    with torch.no_grad():
        start = line.weight.clone()
        for delta in (0.1, 0.4, 0.2, 0.3):  # steps of different lengths along one line
            line.weight += delta * direction
            meters[0].step()
        for delta in (1.0, 1.0, -1.0):  # +1, +1, -1: displacement 1, path length 3
            detour.weight += delta
            meters[1].step()
    disp = float(torch.linalg.vector_norm((line.weight - start).detach().double()))
    assert float(meters[0].tensor_path[0]) == pytest.approx(disp, rel=1e-6)
    assert float(meters[0].group_path[meters[0].groups.index("all")]) == pytest.approx(disp,
                                                                                        rel=1e-6)
    assert float(meters[1].tensor_path[0]) == 3.0


def test_path_lengths_are_step_level_and_per_group(done: Path) -> None:
    lengths = read_path_lengths(done / "path_length.safetensors")
    prov = json.loads((done / "provenance.json").read_text())
    assert lengths.steps == prov["steps"] == 2 * (128 // 32)
    assert {"all", "attention", "mlp", "norm", "embed", "blocks.1", "blocks.1/attention"} <= \
        lengths.groups.keys()
    assert "head.weight" in lengths.tensors and lengths.groups.keys() == \
        prov["path_efficiency"].keys()
    for disp, length in [*lengths.tensors.values(), *lengths.groups.values()]:
        assert 0 < disp <= length * (1 + 1e-12)  # never shorter than the straight line
    # Per step the path is longer than per epoch: the evaluator's figure from the snapshots.
    from repsim.evaluators.path import path_efficiency

    epochs = path_efficiency([done / "snapshots" / n for n in prov["snapshots"]])
    assert lengths.efficiency()["attention"] <= epochs["attention"] + 1e-9


def test_snapshots_load_back_into_a_model_entry(done: Path) -> None:
    from repsim.plugins import registry

    final = build_part("model", "finetuned", run=str(done))
    start = build_part("model", "finetuned", run=str(done), epoch=0)
    assert (final.family, final.num_prefix_tokens, final.name) == ("vit", 1, "timm (fine-tuned)")
    weights = read_tensors(done / "final.safetensors")
    assert all(torch.equal(final.module.state_dict()[k], v) for k, v in weights.items())
    base = build_part("model", "timm", **TINY, seed=0).module.state_dict()
    w = "blocks.1.attn.qkv.weight"
    assert torch.equal(start.module.state_dict()[w], base[w])  # θ_0 is the pretrained start
    assert not torch.equal(final.module.state_dict()[w], base[w])
    prov = final.provenance
    assert [Path(p).name for p in prov["snapshots"]] == [f"epoch_{e:03d}.safetensors"
                                                         for e in range(3)]
    assert prov["path_efficiency"]["attention"] > 0 and prov["base"]["model"] == "timm"
    assert final.module(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    part = registry("model").get("finetuned")
    skeleton = part.skeleton(part.validate({"run": str(done)}))  # what `repsim validate` checks
    assert next(skeleton.module.parameters()).is_meta
    with pytest.raises(RecipeError, match="no snapshot epoch_009"):
        build_part("model", "finetuned", run=str(done), epoch=9)
    with pytest.raises(RecipeError, match="does not exist.*repsim finetune"):
        build_part("model", "finetuned", run=str(done.parent / "missing"))


def test_step_snapshots(tmp_path: Path) -> None:
    run = finetune_recipe(recipe(tmp_path, snapshot_unit="step", snapshot_every=3, mixup=0.0,
                                 cutmix=0.0, auto_augment="none"))
    names = json.loads((run / "provenance.json").read_text())["snapshots"]
    assert names == [f"step_{u:07d}.safetensors" for u in (0, 3, 6, 8)]  # 8 steps: the end too
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == names
    assert build_part("model", "finetuned", run=str(run), step=6).provenance["step"] == 6


def test_a_directory_of_another_run_is_refused_and_a_finished_one_kept(done: Path) -> None:
    text = (done / "config.toml").read_text()
    stamp = (done / "final.safetensors").stat().st_mtime_ns
    other = done.parent / "other.toml"
    other.write_text(text)
    assert finetune_recipe(other) == done  # the same run: complete, nothing to do
    assert (done / "final.safetensors").stat().st_mtime_ns == stamp
    other.write_text(text.replace("epochs = 2", "epochs = 3"))
    with pytest.raises(RecipeError, match=r"holds another fine-tuning \(settings.epochs: 3 here"):
        finetune_recipe(other)


def test_recipe_mistakes_are_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="finetune.lrr: unknown field"):
        parse_finetune_recipe('[model]\nmodel = "timm"\n[data]\ndataset = "digits"\n'
                              '[finetune]\nlrr = 1\n')
    with pytest.raises(RecipeError, match="finetune: .*warmup_epochs = 5 must be below"):
        parse_finetune_recipe('[model]\nmodel = "timm"\n[data]\ndataset = "digits"\n'
                              '[finetune]\nepochs = 3\n')
    with pytest.raises(RecipeError, match="preset = 'table6' is not a preset"):
        parse_finetune_recipe('[model]\nmodel = "timm"\n[data]\ndataset = "digits"\n'
                              '[finetune]\npreset = "table6"\n')
    with pytest.raises(RecipeError, match="unknown model 'timmm'. Did you mean 'timm'"):
        parse_finetune_recipe('[model]\nmodel = "timmm"\n[data]\ndataset = "digits"\n')
    with pytest.raises(RecipeError, match="run.device_batch = 12 does not divide"):
        finetune_recipe(recipe(tmp_path), overrides={"device_batch": 12})
    with pytest.raises(RecipeError, match="need an even batch"):
        finetune_recipe(recipe(tmp_path, batch_size=30), overrides={"device_batch": 15})
    with pytest.raises(DataError, match="fewer than one batch"):
        finetune_recipe(recipe(tmp_path, batch_size=256))


def test_the_command(runner, tmp_path: Path) -> None:
    path = recipe(tmp_path, epochs=2, mixup=0.0, cutmix=0.0)
    result = runner.invoke(finetune_command, [str(path), "--out", str(tmp_path / "cli"),
                                              "--quiet"])
    assert result.exit_code == 0, result.output
    assert 'model = "finetuned"' in result.output
    assert (tmp_path / "cli/config.toml").read_text() == path.read_text()
    bad = runner.invoke(finetune_command, [str(path), "--device-batch", "7", "--quiet"])
    assert bad.exit_code == 2 and "run.device_batch = 7" in bad.output
    assert "Traceback" not in bad.output


def cpu_sized(doc: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """A paper fine-tuning recipe at CPU size: a stand-in tiny ViT on the digits, a few steps;
    the preset (Table 5) and its augmentation stay."""
    doc = dict(doc)
    seed = ["mocov3", "dino", "msn", "mae"].index(doc["finetune"]["output"].split("-")[-1])
    doc["model"] = {"model": "timm", "params": {**TINY, "seed": seed}}
    doc["data"] = {"dataset": "digits", "split": "train", "eval_split": "val", "examples": 64}
    doc["finetune"] = {**doc["finetune"], "epochs": 2, "warmup_epochs": 1, "batch_size": 32,
                       "output": tmp / Path(doc["finetune"]["output"]).name}
    doc["run"] = {**doc["run"], "device": "cpu", "precision": "fp32", "device_batch": 16,
                  "num_workers": 0, "threads": 1}
    return doc


def test_the_paper_recipes_run_end_to_end_at_cpu_size(tmp_path: Path) -> None:
    from repsim.recipe import load_recipe
    from repsim.run import run_recipe

    objectives = ["mocov3", "dino", "msn", "mae"]
    for objective in objectives:
        doc = tomllib.loads((RECIPES / f"paper/finetune_{objective}.toml").read_text())
        assert doc["finetune"]["preset"] == "table5" and "epochs" not in doc["finetune"]
        path = tmp_path / f"finetune_{objective}.toml"
        path.write_text(dumps(cpu_sized(doc, tmp_path)))
        finetune_recipe(path)
    # Fig. 14's recipe with its includes, at CPU size: the digits, stand-ins for the pretrained
    # models (the fine-tuned ones' starts), a few examples, Fig. 4's pairs rather than all 28
    # (each writes a figure per layer group), no bootstrap.
    fig = load_recipe(RECIPES / "paper/fig14_path_efficiency.toml").model_dump(
        mode="json", exclude_none=True)
    fig["run"].update(batch_size=8, examples=16, train_examples=16, num_workers=0, bootstrap=0,
                      output=str(tmp_path / "fig14"),
                      pairs=[["mae", "mae_finetuned"], ["mocov3", "mae_finetuned"],
                             ["mocov3_finetuned", "mae_finetuned"]])
    fig["data"] = {"dataset": "digits", "split": "val"}
    for label, model in fig["models"].items():
        if model["model"] == "finetuned":
            model["params"] = {"run": str(tmp_path / Path(model["params"]["run"]).name)}
        else:
            model.update(model="timm", params={**TINY, "seed": objectives.index(label)})
    assert set(fig["models"]) == {*objectives, *(f"{o}_finetuned" for o in objectives)}
    path = tmp_path / "fig14.toml"
    path.write_text(dumps(fig))
    run = run_recipe(path, progress=False, quiet=True)
    result = json.loads((run / "evaluators/path_efficiency/result.json").read_text())
    runs = result["data"]
    assert set(runs) == {f"{o}_finetuned" for o in objectives}
    for data in runs.values():
        assert 0 < data["efficiency"]["attention"] <= 1 and len(data["blocks"]) == 2
    assert (run / "figures/minibatch_cka/mae__mae_finetuned__attn_qkv.png").is_file()
    values = json.loads((run / "similarity/minibatch_cka/mae__mae_finetuned.json").read_text())
    assert math.isfinite(values["values"][0][0])


def test_the_paper_recipes_validate() -> None:
    from repsim.finetune.config import PRESETS, load_finetune_recipe
    from repsim.recipe import check_recipe

    for objective in ("mocov3", "dino", "msn", "mae"):
        r = load_finetune_recipe(RECIPES / f"paper/finetune_{objective}.toml")
        assert r.finetune.settings() == PRESETS["table5"] and r.model.model.startswith(objective)
    with pytest.raises(RecipeError) as info:  # nothing is there yet: data, checkpoints, runs
        check_recipe(RECIPES / "paper/fig14_path_efficiency.toml")
    problems = [ln for ln in str(info.value).splitlines() if ln.startswith("- ")]
    assert problems and all("does not exist" in p for p in problems), str(info.value)
    assert ("models.mae_finetuned: fine-tuning run 'runs/ft-mae' does not exist"
            in str(info.value)) and "repsim finetune" in str(info.value)


@pytest.mark.cuda
def test_bf16_on_cuda(tmp_path: Path) -> None:
    run = finetune_recipe(recipe(tmp_path), overrides={"device": "cuda", "precision": "bf16"})
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["device"]["device"].startswith("cuda") and prov["device"]["precision"] == "bf16"
    assert all(math.isfinite(v) for v in prov["loss"])
    assert 0 < prov["path_efficiency"]["all"] <= 1
