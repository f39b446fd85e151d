"""Stage-level reuse and the checks a rerun makes: what changed is recomputed, nothing else;
replaced input files are never resumed into; a run directory is held by one run at a time."""

from __future__ import annotations

import fcntl
import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from repsim.errors import RecipeError
from repsim.plugins import build_part
from repsim.recipe import check_recipe
from repsim.run import Run

KNN = textwrap.dedent("""
    [[evaluators]]
    name = "knn"
    params = { k = K }

    [[evaluators]]
    name = "prediction_agreement"
    """)


def execute(path: Path, out: Path, force: bool = False) -> Path:
    return Run(check_recipe(path), out, progress=False, quiet=True, force=force).execute()


def digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()
            and p.parts[len(run.parts)] != "cache" and p.name != "provenance.json"}


def values(run: Path) -> torch.Tensor:
    data = json.loads((run / "similarity/minibatch_cka/a__b.json").read_text())
    return torch.tensor(data["values"], dtype=torch.float64)


def test_changing_an_evaluator_reruns_that_evaluator_only(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(run="train_examples = 24", extra=KNN.replace("K", "5"))
    run = execute(path, tmp_path / "run")
    shards = {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*.safetensors")}
    kept = (run / "evaluators/prediction_agreement/result.json").stat().st_mtime_ns
    before = json.loads((run / "evaluators/knn/result.json").read_text())["protocol"]
    path.write_text(path.read_text().replace("k = 5", "k = 3"))
    execute(path, run)  # accepted: the same study, one evaluator changed
    after = json.loads((run / "evaluators/knn/result.json").read_text())["protocol"]
    assert (before["k"], after["k"]) == (5, 3)
    assert {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*.safetensors")} == shards
    assert (run / "evaluators/prediction_agreement/result.json").stat().st_mtime_ns == kept


def test_a_replaced_checkpoint_is_never_resumed_into(write_recipe, tmp_path: Path,
                                                     monkeypatch) -> None:
    """Kill a run, replace a model's weights, rerun: the pass is computed again with the new
    weights (before, the first batches used the old weights and the rest the new ones)."""
    from repsim.run.sinks import MetricSink

    weights = tmp_path / "b.safetensors"

    def write_weights(seed: int) -> None:
        model = build_part("model", "timm", arch="vit_tiny_patch16_224", seed=seed, kwargs={
            "img_size": 16, "patch_size": 4, "depth": 3, "embed_dim": 32, "num_heads": 2,
            "num_classes": 4})
        save_file({k: v.contiguous() for k, v in model.module.state_dict().items()},
                  str(weights))

    write_weights(1)
    path = write_recipe(run="checkpoint_every = 1")
    text = path.read_text()
    start = text.index("[models.b]")
    end = text.index("[layers]")
    block = text[start:end].replace("seed = 1,", f'checkpoint = "{weights}",')
    path.write_text(text[:start] + block + text[end:])
    original, calls = MetricSink.update, {"n": 0}

    def interrupt(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(MetricSink, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        execute(path, tmp_path / "run")
    monkeypatch.setattr(MetricSink, "update", original)
    write_weights(7)
    resumed = execute(path, tmp_path / "run")
    fresh = execute(path, tmp_path / "fresh")
    torch.testing.assert_close(values(resumed), values(fresh), rtol=0, atol=1e-12)
    inputs = json.loads((resumed / "provenance.json").read_text())["inputs"]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert inputs["models.b.params.checkpoint"]["sha256"] == sha


def test_a_directory_in_use_is_refused(write_recipe, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "fingerprint").write_text("x\n")
    with open(run / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("12345")
        fh.flush()
        with pytest.raises(RecipeError, match="in use by another repsim run .process 12345"):
            execute(write_recipe(), run)


def test_a_folder_of_other_files_is_written_into_only_with_force(write_recipe,
                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("...")
    with pytest.raises(RecipeError, match="folder of other files .thesis.tex.*--force"):
        execute(write_recipe(), folder)
    execute(write_recipe(), folder, force=True)
    assert (folder / "thesis.tex").read_text() == "..." and (folder / "summary.md").exists()
    with pytest.raises(RecipeError, match="is a file"):
        execute(write_recipe(), folder / "thesis.tex")


def test_the_same_recipe_writes_byte_identical_files(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(run="bootstrap = 20", extra="\n[[metrics]]\nname = \"linear_cka\"\n")
    assert digest(execute(path, tmp_path / "one")) == digest(execute(path, tmp_path / "two"))
