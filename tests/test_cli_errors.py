"""Every bad input ends with a message naming the offending thing, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from repsim.cli import cli


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_malformed_toml_gives_file_and_line(runner, write_recipe) -> None:
    path = write_recipe("[run]\nseed = 0\nbatch_size = = 3\n")
    assert_user_error(runner.invoke(cli, ["validate", str(path)]), f"{path}:3", "malformed TOML")


def test_unknown_field_gives_its_path(runner, write_recipe) -> None:
    path = write_recipe(run="batchsize = 16")
    assert_user_error(runner.invoke(cli, ["validate", str(path)]),
                      "run.batchsize", "unknown field")


def test_mistyped_field_gives_its_path(runner, write_recipe) -> None:
    path = write_recipe(run='checkpoint_every = "often"')
    assert_user_error(runner.invoke(cli, ["validate", str(path)]), "run.checkpoint_every")


def test_unknown_part_name_suggests(runner, write_recipe) -> None:
    path = write_recipe(metrics='name = "minibatch_ckaa"')
    assert_user_error(runner.invoke(cli, ["validate", str(path)]),
                      "unknown metric 'minibatch_ckaa'", "Did you mean 'minibatch_cka'")


def test_unknown_part_parameter(runner, write_recipe) -> None:
    path = write_recipe(metrics='name = "linear_cka"\nparams = { debaised = true }')
    assert_user_error(runner.invoke(cli, ["validate", str(path)]), "debaised", "debiased")


def test_batch_size_below_four(runner, write_recipe) -> None:
    path = write_recipe(run="batch_size = 3").read_text().replace("batch_size = 8\n", "")
    p = write_recipe(path, name="bs.toml")
    assert_user_error(runner.invoke(cli, ["validate", str(p)]), "batch_size = 3", ">= 4")


def test_missing_recipe_file(runner, tmp_path: Path) -> None:
    assert_user_error(runner.invoke(cli, ["run", str(tmp_path / "nope.toml")]),
                      "nope.toml", "does not exist")


def test_missing_image_folder(runner, write_recipe, tmp_path: Path) -> None:
    text = write_recipe().read_text().replace(
        'dataset = "synthetic"', 'dataset = "imagefolder"').replace(
        "params = { examples = 160, classes = 4, size = 16 }",
        f'params = {{ root = "{tmp_path / "no_such_folder"}" }}')
    path = write_recipe(text, name="folder.toml")
    assert_user_error(runner.invoke(cli, ["validate", str(path)]), "no_such_folder",
                      "does not exist")


def test_layer_selector_matching_nothing_shows_what_exists(runner, write_recipe) -> None:
    path = write_recipe(layers='blocks = "blocks.*.attention"')
    assert_user_error(runner.invoke(cli, ["run", str(path), "--quiet"]),
                      "blocks.*.attention", "matches nothing", "models.a", "there are: attn,")


def test_nan_features_name_model_and_layer(runner, write_recipe, tmp_path: Path) -> None:
    text = write_recipe().read_text()
    start, end = text.index("[models.b]"), text.index("[layers]")
    nan_model = (
        '[models.b]\nmodel = "callable"\nreduce = "flatten"\nlayers = { blocks = "output" }\n'
        'params = { target = "torch.nn:Threshold", kwargs = { threshold = 0.0, value = nan } }\n\n'
    )
    path = write_recipe(text[:start] + nan_model + text[end:], name="nan.toml")
    assert_user_error(runner.invoke(cli, ["run", str(path), "--quiet"]),
                      "model 'b'", "layer 'output'", "NaN")


def test_feature_files_with_different_n(runner, tmp_path: Path) -> None:
    save_file({"l1": torch.randn(32, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"l1": torch.randn(40, 4)}, str(tmp_path / "b.safetensors"))
    assert_user_error(
        runner.invoke(cli, ["similarity", str(tmp_path / "a.safetensors"),
                            str(tmp_path / "b.safetensors")]),
        "different numbers of examples", "32", "40")


def test_missing_feature_file(runner, tmp_path: Path) -> None:
    save_file({"l1": torch.randn(32, 4)}, str(tmp_path / "a.safetensors"))
    assert_user_error(
        runner.invoke(cli, ["similarity", str(tmp_path / "a.safetensors"),
                            str(tmp_path / "missing.safetensors")]),
        "missing.safetensors", "does not exist")


def test_similarity_batch_size_below_four(runner, tmp_path: Path) -> None:
    save_file({"l1": torch.randn(32, 4)}, str(tmp_path / "a.safetensors"))
    assert_user_error(
        runner.invoke(cli, ["similarity", str(tmp_path / "a.safetensors"),
                            str(tmp_path / "a.safetensors"), "--batch-size", "3"]),
        "batch size 3", "at least 4")


def test_nan_in_feature_file(runner, tmp_path: Path) -> None:
    x = torch.randn(32, 4)
    x[3, 1] = float("nan")
    save_file({"bad_layer": x}, str(tmp_path / "a.safetensors"))
    save_file({"l1": torch.randn(32, 4)}, str(tmp_path / "b.safetensors"))
    assert_user_error(
        runner.invoke(cli, ["similarity", str(tmp_path / "a.safetensors"),
                            str(tmp_path / "b.safetensors")]),
        "bad_layer", "NaN")


def test_constant_features_are_reported_undefined(runner, tmp_path: Path) -> None:
    save_file({"const": torch.ones(32, 4), "l2": torch.randn(32, 4)},
              str(tmp_path / "a.safetensors"))
    save_file({"l1": torch.randn(32, 4)}, str(tmp_path / "b.safetensors"))
    result = runner.invoke(cli, ["similarity", str(tmp_path / "a.safetensors"),
                                 str(tmp_path / "b.safetensors"), "--out",
                                 str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "undefined" in result.output and "'const' has constant features" in result.output
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["values"][0][0] is None and data["rows"] == ["const", "l2"]


@pytest.mark.parametrize("kind", ["models", "metrics", "datasets", "layer_selectors"])
def test_list_kinds(runner, kind: str) -> None:
    result = runner.invoke(cli, ["list", kind])
    assert result.exit_code == 0 and "name" in result.output


def test_list_unknown_kind(runner) -> None:
    assert_user_error(runner.invoke(cli, ["list", "gizmos"]), "gizmos")


def test_unknown_timm_architecture_suggests(runner) -> None:
    assert_user_error(runner.invoke(cli, ["layers", "timm", "-p", "arch=vit_tiny_patch16_22"]),
                      "no architecture 'vit_tiny_patch16_22'", "'vit_tiny_patch16_224'")
