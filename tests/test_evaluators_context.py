"""InMemoryContext, and every built-in evaluator run through the registry on it."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from repsim.errors import FeatureError, RecipeError
from repsim.evaluators import evaluate
from repsim.evaluators.context import InMemoryContext
from repsim.evaluators.knn import knn_accuracy
from repsim.evaluators.path import PathEfficiencyEvaluator
from repsim.layers import reduce_output
from repsim.plugins import registry

BUILTIN = ["cka_vs_depth", "knn", "linear_probe", "mlp_probe", "path_efficiency",
           "prediction_agreement"]


def test_registry_import_stays_light():
    code = ("import sys, repsim.plugins as p; reg = p.get_host().registry('evaluator'); "
            f"assert all(n in reg for n in {BUILTIN!r}); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_validates_parameters():
    with pytest.raises(RecipeError, match="temprature"):
        registry("evaluator").get("knn").create({"temprature": 0.1})
    with pytest.raises(RecipeError, match="warmup"):
        registry("evaluator").get("linear_probe").create({"epochs": [10], "warmup_epochs": [10]})


def tokens(n, seed, signal=None):
    """[N, 1 + 4, 6] tokens; the CLS token carries `signal` (class centres), patches are noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, 5, 6, generator=g)
    if signal is not None:
        t[:, 0] += signal
    return t


@pytest.fixture(scope="module")
def ctx():
    g = torch.Generator().manual_seed(0)
    y_train = torch.randint(0, 3, (240,), generator=g)
    y_eval = torch.randint(0, 3, (120,), generator=g)
    centres = torch.randn(3, 6, generator=g) * 6
    feats = {
        "vit": {split: {"blocks.0": tokens(len(y), s),
                        "blocks.1": tokens(len(y), s + 1, centres[y])}
                for split, y, s in [("train", y_train, 1), ("eval", y_eval, 3)]},
        "cnn": {split: {"layer1": torch.randn(len(y), 4, 2, 2, generator=g),
                        "layer2": torch.randn(len(y), 4, 2, 2, generator=g)}
                for split, y in [("train", y_train), ("eval", y_eval)]},
    }
    eye = torch.eye(3)
    outputs = {"vit": {"eval": eye[y_eval] * 5 + torch.randn(120, 3, generator=g)},
               "cnn": {"eval": torch.randn(120, 3, generator=g)}}
    return InMemoryContext(features=feats, labels={"train": y_train, "eval": y_eval},
                           outputs=outputs, num_prefix_tokens={"vit": 1},
                           default_reduction={"vit": "cls", "cnn": "gap"},
                           groups={"vit": {"blocks": ["blocks.0", "blocks.1"]}},
                           model_info={"vit": {"family": "vit"}, "cnn": {"family": "cnn"}})


def test_context_reduces_tokens_like_the_run(ctx):
    raw = ctx._features["vit"]["eval"]["blocks.1"]
    for how in ("cls", "gap", "gap_no_cls"):
        expected = reduce_output(raw, how, 1, "")
        assert torch.equal(ctx.features("vit", "blocks.1", "eval", how), expected)
    assert torch.equal(ctx.features("vit", "blocks.1", "eval"), raw[:, 0])  # default: cls
    assert ctx.layers("vit") == ["blocks.0", "blocks.1"] and ctx.models == ["vit", "cnn"]
    with pytest.raises(FeatureError, match="CLS"):
        ctx.features("cnn", "layer1", "eval", "cls")
    with pytest.raises(KeyError, match="available"):
        ctx.features("vit", "blocks.9")


def test_context_reduced_features_and_mappings():
    x = torch.randn(4, 3)
    c = InMemoryContext(features={"m": {"eval": {"a": x, "b": {"cls": x, "gap": 2 * x}}}})
    assert torch.equal(c.features("m", "a"), x)
    assert torch.equal(c.features("m", "b", reduction="gap"), 2 * x)
    with pytest.raises(FeatureError, match="reduced"):
        c.features("m", "a", reduction="cls")


def jsonable(result):
    json.dumps({"protocol": result.protocol, "tables": result.tables, "data": result.data},
               allow_nan=False)
    for build in result.figures.values():
        build().savefig(io.BytesIO(), format="png")


def test_knn_evaluator(ctx):
    out = evaluate("knn", ctx, k=5)
    jsonable(out)
    assert out.protocol["k"] == 5 and out.protocol["temperature"] == 0.07
    acc = out.tensors["accuracy/vit"]  # [layer, reduction]
    expected = knn_accuracy(ctx.features("vit", "blocks.1", "train", "cls"), ctx.labels("train"),
                            ctx.features("vit", "blocks.1", "eval", "cls"), ctx.labels("eval"), k=5)
    assert acc[1, 0].item() == expected == 1.0  # the CLS token of block 1 carries the class
    assert acc[0, 0].item() < 0.6  # block 0 is noise
    # A CNN has no CLS token: those cells are skipped and said so, GAP is computed.
    cnn = out.tensors["accuracy/cnn"]
    assert math.isnan(cnn[0, 0].item()) and not math.isnan(cnn[0, 1].item())
    assert any("cnn layer1 cls: skipped" in n for n in out.protocol["notes"])


def test_group_restricts_layers_and_the_cache(ctx):
    part = registry("evaluator").get("knn")
    ev = part.create({"group": "blocks", "k": 5, "reductions": ["cls"]})
    assert ev.needs.layers == ("blocks",) and ev.needs.splits == ("train", "eval")
    out = ev.evaluate(ctx)
    assert out.data["layers"] == {"vit": ["blocks.0", "blocks.1"]}
    assert "cnn: skipped, no layer group 'blocks'" in out.protocol["notes"]
    probe = registry("evaluator").get("linear_probe").create(
        {"layers": [["blocks.1", "blocks"]], "group": "ignored-for-explicit-layers"})
    assert probe.needs.layers == ("blocks.1", "blocks")


def test_probe_evaluators(ctx):
    grid = dict(models=["vit"], reduction="cls", epochs=[20], warmup_epochs=[2], batch_size=32,
                base_lrs=[0.1], weight_decays=[0.0, 1e-4], top=2)
    out = evaluate("linear_probe", ctx, layers=["blocks", ["blocks.0", "blocks.1"]], **grid)
    jsonable(out)
    rows = {r[1]: r for r in out.tables["accuracy"][1]}
    assert set(rows) == {"blocks.0", "blocks.1", "blocks.0+blocks.1"}
    assert rows["blocks.0+blocks.1"][3] == 12  # concatenated width
    assert rows["blocks.1"][5] == 1.0 and rows["blocks.0+blocks.1"][5] == 1.0
    assert out.data["inputs"]["vit"] == ["blocks.0", "blocks.1", "blocks.0+blocks.1"]
    stats = out.tensors["accuracy/vit"]  # [input, depth, (mean, std)]
    assert stats.shape == (3, 1, 2) and stats[1, 0, 0].item() == 1.0
    assert out.protocol["grid"]["weight_decay"] == [0.0, 1e-4] and out.protocol["top"] == 2
    mlp = evaluate("mlp_probe", ctx, depths=[0, 1], hidden=8, **grid)
    jsonable(mlp)
    assert [r[4] for r in mlp.tables["accuracy"][1]] == [0, 1]


def test_agreement_evaluator(ctx):
    out = evaluate("prediction_agreement", ctx, ks=[2, 5])
    jsonable(out)
    assert out.protocol["reference"] == "symmetric"
    assert {r[2] for r in out.tables["kendall_tau"][1]} == {2, 3}  # 5 capped at 3 classes
    per_example = out.tensors["tau/vit vs cnn/top2"]
    assert per_example.shape == (120,)
    all_row = next(r for r in out.tables["kendall_tau"][1] if r[2] == 2 and r[3] == "all")
    assert all_row[4] == pytest.approx(per_example.nanmean().item())
    f1_row = out.tables["top1_f1"][1][0]
    assert f1_row[:2] == ["vit", "cnn"] and 0.0 <= f1_row[2] <= 1.0


def test_agreement_on_linear_probe_scores(ctx):
    out = evaluate("prediction_agreement", ctx, models=["vit"], pairs=[("vit", "vit")], ks=[3],
                   scores="linear_probe", layer="blocks", reduction="cls",
                   probe={"epochs": [20], "warmup_epochs": [2], "base_lrs": [0.1],
                          "weight_decays": [0.0]})
    jsonable(out)
    assert out.protocol["probes"]["vit"]["layer"] == "blocks.1"
    f1, agreement, acc_a = out.tables["top1_f1"][1][0][2:5]
    assert acc_a == 1.0 and f1 == 1.0 and agreement == 1.0
    with pytest.raises(RecipeError, match="unknown keys"):
        registry("evaluator").get("prediction_agreement").create({"probe": {"lr": 1}})


def test_path_efficiency_evaluator_from_files_and_memory(tmp_path, ctx):
    states = [{"blocks.0.attn.qkv.weight": torch.tensor(p), "head.weight": torch.randn(2)}
              for p in ([0.0, 0.0], [1.0, 0.0], [1.0, 1.0])]
    for i, s in enumerate(states):
        save_file(s, tmp_path / f"step{i}.safetensors")
    out = evaluate("path_efficiency", ctx, runs={"ft": str(tmp_path)})
    jsonable(out)
    assert out.data["ft"]["efficiency"]["all"] == pytest.approx(1 / math.sqrt(2))
    assert out.protocol["runs"]["ft"]["excluded"] == ["head.weight"]
    assert out.tensors["per_block/ft"].shape == (1, 2)  # block 0: all, attention
    mem = PathEfficiencyEvaluator(runs={"mem": states}).evaluate(ctx)
    assert mem.data["mem"]["efficiency"] == out.data["ft"]["efficiency"]
