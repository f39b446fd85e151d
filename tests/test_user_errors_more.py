"""User errors that used to end in a traceback: each exits 2 and names the offending thing."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from repsim.cli import cli
from repsim.models.checkpoints import read_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from conftest import recipe_text  # noqa: E402
from test_cli_errors import assert_user_error  # noqa: E402

TINY = {"patch_size": 4, "depth": 3, "embed_dim": 32, "num_heads": 2, "num_classes": 4}


def tiny_state(img_size: int) -> dict[str, torch.Tensor]:
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, **TINY).state_dict()


def timm_recipe(tmp_path: Path, checkpoint: Path | None = None, img_size: int = 16,
                preprocess: str = "") -> Path:
    """The tiny recipe with model 'a' built for ``img_size`` (and its checkpoint)."""
    text = recipe_text(tmp_path / "run")
    old = "kwargs = { img_size = 16,"
    ckpt = f'checkpoint = "{checkpoint}", ' if checkpoint else ""
    start = text.index("[models.a]")
    end = text.index("[models.b]")
    model_a = text[start:end].replace(old, f"{ckpt}kwargs = {{ img_size = {img_size},")
    if preprocess:
        model_a = model_a.replace("preprocess = {", f"preprocess = {{ {preprocess},")
    path = tmp_path / "recipe.toml"
    path.write_text(text[:start] + model_a + text[end:])
    return path


def test_checkpoint_of_other_shapes_names_keys_shapes_and_cause(runner, tmp_path: Path) -> None:
    ckpt = tmp_path / "vit32.pth"
    torch.save(tiny_state(32), ckpt)  # trained at 32 px, the recipe builds the model for 16
    result = runner.invoke(cli, ["run", str(timm_recipe(tmp_path, ckpt)), "--quiet"])
    assert_user_error(result, "vit32.pth", "pos_embed", "[1, 65, 32] in the file",
                      "[1, 17, 32] in the network", "img_size = 32")


def test_checkpoint_of_other_width_names_keys_and_shapes(runner, tmp_path: Path) -> None:
    state = timm.create_model("vit_tiny_patch16_224", img_size=16,
                              **{**TINY, "embed_dim": 64}).state_dict()
    save_file(state, str(tmp_path / "wide.safetensors"))
    path = timm_recipe(tmp_path, tmp_path / "wide.safetensors")
    assert_user_error(runner.invoke(cli, ["run", str(path), "--quiet"]), "wide.safetensors",
                      "cls_token", "[1, 1, 64] in the file", "embed_dim")


def test_preprocess_crop_other_than_the_models_input_size(runner, tmp_path: Path) -> None:
    path = timm_recipe(tmp_path, img_size=32, preprocess="crop = 16")
    for args in (["validate", str(path)], ["run", str(path), "--quiet"]):
        assert_user_error(runner.invoke(cli, args), "models.a", "32x32", "crop 16",
                          "preprocess.crop = 32")


def test_zoo_input_size_follows_arch_overrides(tmp_path: Path) -> None:
    from test_zoo_reference import vit_case

    from repsim import build_model
    from repsim.errors import RecipeError

    _, path, params, _ = vit_case("dino_vit_s16", "bare", tmp_path)  # built for 32 px
    assert build_model("dino_vit_s16", checkpoint=path, **params).preprocess.crop == 32
    with pytest.raises(RecipeError, match=r"dino_vit_s16.*32x32.*crop 224"):
        build_model("dino_vit_s16", checkpoint=path, **params, preprocess={"crop": 224})


def test_out_naming_a_file(runner, write_recipe, tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("not a directory")
    assert_user_error(runner.invoke(cli, ["run", str(write_recipe()), "--out", str(target)]),
                      "--out", "notes.txt", "is a file")
    assert_user_error(runner.invoke(cli, ["run", str(write_recipe()), "--out",
                                          str(target / "run")]), "notes.txt", "is a file")
    assert target.read_text() == "not a directory"


def test_out_holding_other_files_needs_force(runner, write_recipe, tmp_path: Path) -> None:
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "draft.tex").write_text("")
    args = ["run", str(write_recipe()), "--quiet", "--out", str(folder)]
    assert_user_error(runner.invoke(cli, args), "draft.tex", "--force")
    assert runner.invoke(cli, [*args, "--force"]).exit_code == 0
    assert (folder / "summary.md").is_file() and (folder / "draft.tex").is_file()


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create anything in (root ignores file modes)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir(mode=0o500)
        return folder
    if not Path("/sys").is_dir():
        pytest.skip("needs a non-root user or Linux's /sys")
    return Path("/sys")


def test_out_on_an_unwritable_path(runner, write_recipe, tmp_path: Path) -> None:
    folder = _unwritable(tmp_path)
    result = runner.invoke(cli, ["run", str(write_recipe()), "--out", str(folder / "run")])
    assert_user_error(result, "--out", str(folder), "cannot write")


def test_recipe_output_naming_a_file_is_reported_by_validate(runner, write_recipe,
                                                             tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    assert_user_error(runner.invoke(cli, ["validate", str(write_recipe())]),
                      "run.output", "is a file")


def test_raw_pickle_of_torch_save_loads(tmp_path: Path) -> None:
    state = tiny_state(16)
    torch.save(state, tmp_path / "raw.pth", _use_new_zipfile_serialization=False)
    loaded = read_checkpoint(tmp_path / "raw.pth").data
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_protocol_torch_cannot_read_safely_is_not_called_corrupt(tmp_path: Path,
                                                                        zip_format: bool) -> None:
    from repsim.errors import CheckpointError

    path = tmp_path / "p4.pth"
    torch.save(tiny_state(16), path, pickle_protocol=4,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "p4.pth" in message and "protocol 4" in message and "corrupt" not in message
    assert "torch.save(" in message


def test_plain_pickle_is_named_as_such(tmp_path: Path) -> None:
    from repsim.errors import CheckpointError

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(CheckpointError, match=r"plain\.pkl.*pickle\.dump.*not torch\.save"):
        read_checkpoint(path)


def test_convert_user_errors_exit_2(runner, tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pth"
    torch.save(tiny_state(16), ckpt)
    assert_user_error(runner.invoke(cli, ["convert", str(ckpt), "--model", "dino_vit_s16",
                                          "--out", str(tmp_path / "w.pth2")]),
                      "w.pth2", ".safetensors")
    assert_user_error(runner.invoke(cli, ["convert", str(ckpt), "--model", "dino_vit_s16",
                                          "--out", str(tmp_path / "w.safetensors")]),
                      "w.pth", "does not fit model 'dino_vit_s16'")


def test_interrupted_run_exits_130_and_says_a_rerun_resumes(runner, write_recipe,
                                                           monkeypatch) -> None:
    from repsim.run.sinks import MetricSink

    original = MetricSink.update
    calls = {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return original(self, batch)

    path = write_recipe(run="checkpoint_every = 1")
    monkeypatch.setattr(MetricSink, "update", interrupted)
    result = runner.invoke(cli, ["run", str(path), "--quiet"])
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and "Aborted!" not in result.output
    assert "Interrupted" in result.output and "resume" in result.output
    assert f"repsim run {path}" in result.output
    monkeypatch.setattr(MetricSink, "update", original)
    rerun = runner.invoke(cli, ["run", str(path)])
    assert rerun.exit_code == 0, rerun.output
    assert "resuming after 2 saved batches" in rerun.output
