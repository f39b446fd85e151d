"""The orchestrator: run directory contents, values equal an independent extraction, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import repsim
from repsim import hookimpl, store
from repsim.cli import cli
from repsim.errors import RecipeError
from repsim.plugins import registry
from repsim.recipe import check_recipe
from repsim.run import Run


def independent_features(recipe_path: Path, label: str, split: str | None = None,
                         limit: int | None = None) -> dict[str, torch.Tensor]:
    """Rebuild the run's inputs by hand and take CLS tokens from timm's forward_intermediates."""
    checked = check_recipe(recipe_path)
    r = checked.recipe
    split = split or r.data.split
    ds = registry("dataset").get(r.data.dataset).create({**r.data.params, "split": split})
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(r.run.seed))
    order = order[: limit or r.run.examples].tolist()
    model = repsim.build_model(r.models[label].model, **r.models[label].params)
    x = torch.stack([model.preprocess(ds[i][0]) for i in order])
    with torch.inference_mode():
        outs = model.module.forward_intermediates(x, norm=False, intermediates_only=True,
                                                  return_prefix_tokens=True)
    return {f"blocks.{i}": o[1][:, 0] for i, o in enumerate(outs)} | {"labels": torch.tensor(
        [ds[i][1] for i in order])}


def test_run_writes_results_equal_to_an_independent_computation(runner, write_recipe,
                                                                  tmp_path: Path) -> None:
    path = write_recipe(metrics='name = "minibatch_cka"\n\n[[metrics]]\nname = "linear_cka"')
    result = runner.invoke(cli, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for f in ("recipe.toml", "resolved.json", "provenance.json", "summary.md",
              "similarity/minibatch_cka/a__b.safetensors", "similarity/minibatch_cka/a__b.json",
              "tables/minibatch_cka/a__b__blocks.md", "figures/minibatch_cka/a__b__blocks.png",
              "figures/linear_cka/a__a__blocks.png"):
        assert (run / f).is_file(), f
    fa, fb = independent_features(path, "a"), independent_features(path, "b")
    fa.pop("labels"), fb.pop("labels")
    for metric in ("minibatch_cka", "linear_cka"):
        data = json.loads((run / f"similarity/{metric}/a__b.json").read_text())
        expected = repsim.similarity(fa, fb, metric=metric, batch_size=8)
        got = torch.tensor(data["values"], dtype=torch.float64)
        torch.testing.assert_close(got, expected.values, atol=1e-5, rtol=0)
        assert data["rows"] == expected.rows
        tensors = load_file(str(run / f"similarity/{metric}/a__b.safetensors"))
        torch.testing.assert_close(tensors["values"], got)
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["seed"] == 0 and torch.__version__.startswith(prov["versions"]["torch"])
    assert prov["models"]["a"]["groups"]["blocks"] == ["blocks.0", "blocks.1", "blocks.2"]
    desc = json.loads((run / "similarity/minibatch_cka/a__b.json").read_text())["description"]
    assert "HSIC_1" in desc["estimator"] and desc["batch_size"] == 8 and desc["examples"] == 40


def run_interrupted_then_resumed(path: Path, out: Path, monkeypatch) -> Path:
    """Stop a run (checkpoint_every = 1) while it feeds its third batch, then rerun it."""
    from repsim.run.sinks import MetricSink

    original = MetricSink.update
    calls = {"n": 0}

    def failing_update(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(MetricSink, "update", failing_update)
    with pytest.raises(KeyboardInterrupt):
        Run(check_recipe(path), out, progress=False, quiet=True).execute()
    progress = store.read_json(out / "cache/eval/rank0/progress.json")
    assert (progress["batches"], progress["done"], progress["world_size"]) == (2, False, 1)
    monkeypatch.setattr(MetricSink, "update", original)
    return Run(check_recipe(path), out, progress=False, quiet=True).execute()


def test_interrupted_run_resumes_to_the_same_values(write_recipe, tmp_path: Path,
                                                    monkeypatch) -> None:
    path = write_recipe(run="checkpoint_every = 1")
    reference = Run(check_recipe(path), tmp_path / "ref", progress=False, quiet=True).execute()

    run_interrupted_then_resumed(path, tmp_path / "resumed", monkeypatch)
    a = load_file(str(reference / "similarity/minibatch_cka/a__b.safetensors"))
    b = load_file(str(tmp_path / "resumed/similarity/minibatch_cka/a__b.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-12, rtol=0)


def test_run_directory_of_another_recipe_is_not_overwritten(write_recipe, tmp_path: Path) -> None:
    path = write_recipe()
    Run(check_recipe(path), tmp_path / "run", progress=False, quiet=True).execute()
    other = write_recipe(run="checkpoint_every = 7\nseed = 3".replace("seed = 3", ""),
                         name="other.toml")
    text = other.read_text().replace("seed = 0", "seed = 5")
    other.write_text(text)
    with pytest.raises(RecipeError, match="different recipe"):
        Run(check_recipe(other), tmp_path / "run", progress=False, quiet=True).execute()


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        store.write_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_validate_builds_models_on_the_meta_device_only(runner, write_recipe,
                                                      monkeypatch) -> None:
    import timm

    create, built = timm.create_model, []

    def on_meta_only(*args, **kwargs):
        assert torch.get_default_device().type == "meta", "validate must not build weights"
        built.append(args[0])
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", on_meta_only)
    result = runner.invoke(cli, ["validate", str(write_recipe())])
    assert result.exit_code == 0 and "valid" in result.output and "Note" not in result.output
    assert built == ["vit_tiny_patch16_224"] * 2  # structures only, for the layer check


def test_evaluators_read_the_features_of_the_right_examples(write_recipe, tmp_path: Path) -> None:
    extra = ('\n[[evaluators]]\nname = "knn"\nparams = { k = 5, reductions = ["cls"] }\n'
             '\n[[evaluators]]\nname = "cka_vs_depth"\n')
    path = write_recipe(extra=extra, run="train_examples = 64")
    run = Run(check_recipe(path), tmp_path / "run", progress=False, quiet=True).execute()
    result = json.loads((run / "evaluators/knn/result.json").read_text())
    train = independent_features(path, "b", "train", 64)
    test = independent_features(path, "b", "val")
    expected = repsim.functional.knn_accuracy(train["blocks.2"], train["labels"],
                                              test["blocks.2"], test["labels"], k=5)
    rows = result["tables"]["knn"]
    header = rows["headers"]
    got = [r for r in rows["rows"] if r[header.index("model")] == "b"
           and r[header.index("layer")] == "blocks.2"]
    assert len(got) == 1
    assert got[0][header.index("accuracy")] == pytest.approx(expected, abs=1e-9)
    assert (run / "evaluators/knn/accuracy_per_block.png").is_file()
    assert (run / "evaluators/cka_vs_depth/result.json").is_file()


class TokenMean:
    """A toy streaming evaluator: the mean of each block's raw token outputs over all examples."""

    def __init__(self) -> None:
        from repsim.evaluators.base import FeatureNeeds, ObserveSpec, StreamingEvaluator

        class _TokenMean(StreamingEvaluator):
            needs = FeatureNeeds(splits=())
            observes = ObserveSpec("blocks")

            def __init__(self, params=None, name=None):
                super().__init__(params, name)
                self.sums: dict[str, torch.Tensor] = {}

            def observe(self, split, model, layer, raw, labels, info):
                assert info["num_prefix_tokens"] == 1 and info["grid_size"] == (4, 4)
                key = f"{model}|{layer}"
                total = raw.double().sum((0, 1))
                count = torch.tensor([raw.shape[0] * raw.shape[1]], dtype=torch.float64)
                prev = self.sums.get(key)
                self.sums[key] = torch.cat([total, count]) if prev is None else \
                    prev + torch.cat([total, count])

            def state(self):
                return dict(self.sums)

            def load_state(self, state):
                self.sums = dict(state)

            def evaluate(self, ctx):
                from repsim.evaluators.base import EvalResult

                return EvalResult(protocol={}, tensors={
                    k.replace("|", "/"): v[:-1] / v[-1] for k, v in self.sums.items()})

        self.cls = _TokenMean

    @hookimpl
    def register_evaluators(self, register):
        register("token_mean", lambda p: self.cls(p, "token_mean"))


def test_streaming_evaluator_sees_raw_outputs_and_resumes(write_recipe, tmp_path: Path,
                                                          register_plugin, monkeypatch) -> None:
    register_plugin(TokenMean(), "token-mean-plugin")
    path = write_recipe(extra='\n[[evaluators]]\nname = "token_mean"\n', run="checkpoint_every = 1")
    run = run_interrupted_then_resumed(path, tmp_path / "run", monkeypatch)
    got = load_file(str(run / "evaluators/token_mean/tensors.safetensors"))

    checked = check_recipe(path)
    r = checked.recipe
    ds = registry("dataset").get("synthetic").create({**r.data.params, "split": "val"})
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:40].tolist()
    model = repsim.build_model("timm", **r.models["a"].params)
    x = torch.stack([model.preprocess(ds[i][0]) for i in order])
    with torch.inference_mode():
        outs = model.module.forward_intermediates(x, norm=False, intermediates_only=True,
                                                  return_prefix_tokens=True, output_fmt="NLC")
    for i, (spatial, prefix) in enumerate(outs):
        expected = torch.cat([prefix, spatial], dim=1).double().mean((0, 1))
        torch.testing.assert_close(got[f"a/blocks.{i}"], expected, atol=1e-5, rtol=0)


def test_bootstrap_intervals_are_written_and_equal_the_api(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(run="bootstrap = 300\nconfidence = 0.9")
    run = Run(check_recipe(path), tmp_path / "run", progress=False, quiet=True).execute()
    data = json.loads((run / "similarity/minibatch_cka/a__b.json").read_text())
    assert data["description"]["bootstrap"]["confidence"] == 0.9
    fa, fb = independent_features(path, "a"), independent_features(path, "b")
    fa.pop("labels"), fb.pop("labels")
    expected = repsim.similarity(fa, fb, batch_size=8, keep_batches=True)
    low, high = expected.confidence_interval(n_resamples=300, confidence=0.9, seed=0)
    torch.testing.assert_close(torch.tensor(data["ci_low"], dtype=torch.float64), low,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(data["ci_high"], dtype=torch.float64), high,
                               atol=1e-5, rtol=0)
    assert "bootstrap intervals" in (run / "tables/minibatch_cka/a__b__blocks.md").read_text()


def test_a_layer_group_can_have_its_own_reduction(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(layers='blocks = "blocks.*"\nqkv = { patterns = ["blocks.*.attn.qkv"], '
                               'reduce = "flatten" }',
                        metrics='name = "linear_cka"')
    run = Run(check_recipe(path), tmp_path / "run", progress=False, quiet=True).execute()
    data = json.loads((run / "similarity/linear_cka/a__b.json").read_text())
    assert data["description"]["reduce"]["a"] == {
        "model": "cls", "layers": {f"blocks.{i}.attn.qkv": "flatten" for i in range(3)}}
    checked = check_recipe(path)
    r = checked.recipe
    ds = registry("dataset").get("synthetic").create({**r.data.params, "split": "val"})
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:40].tolist()
    feats = {}
    for label in ("a", "b"):
        model = repsim.build_model("timm", **r.models[label].params)
        x = torch.stack([model.preprocess(ds[i][0]) for i in order])
        with torch.inference_mode():
            blk = model.module.blocks[0]
            h = model.module.norm_pre(model.module._pos_embed(model.module.patch_embed(x)))
            feats[label] = blk.attn.qkv(blk.norm1(h)).flatten(1)
    i, j = data["rows"].index("blocks.0.attn.qkv"), data["cols"].index("blocks.0.attn.qkv")
    expected = repsim.functional.linear_cka(feats["a"], feats["b"])
    assert data["values"][i][j] == pytest.approx(expected, abs=1e-5)


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        store.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_heatmaps_can_be_left_to_the_report(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(run="heatmaps = false")
    run = Run(check_recipe(path), tmp_path / "run", progress=False, quiet=True).execute()
    assert not (run / "figures").exists()
    assert (run / "tables/minibatch_cka/a__b__blocks.md").is_file()
    assert "data:image/png;base64," in (run / "report/index.html").read_text()
