"""`repsim validate` finds what it can without weights: architectures, targets, layers, groups."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from repsim import hookimpl
from repsim.cli import cli

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_errors import assert_user_error  # noqa: E402

RECIPES = Path(__file__).parents[1] / "recipes"


def test_unknown_timm_architecture(runner, write_recipe) -> None:
    text = write_recipe().read_text().replace('arch = "vit_tiny_patch16_224", seed = 1',
                                              'arch = "vit_tiny_patch16_22", seed = 1')
    assert_user_error(runner.invoke(cli, ["validate", str(write_recipe(text))]),
                      "models.b", "no architecture 'vit_tiny_patch16_22'",
                      "'vit_tiny_patch16_224'")


def test_a_mistyped_architecture_is_a_problem_not_a_missing_file(runner, write_recipe) -> None:
    # The preflight lists absent files apart; a part's error that merely quotes a parameter
    # (the unknown name) is not one of them.
    text = write_recipe().read_text().replace('arch = "vit_tiny_patch16_224", seed = 1',
                                              'arch = "vit_tiny_patch16_22", seed = 1')
    res = runner.invoke(cli, ["validate", str(write_recipe(text))])
    assert res.exit_code == 2 and "1 problem(s)" in res.output, res.output
    assert "missing" not in res.output


def test_timm_kwargs_the_architecture_does_not_take(runner, write_recipe) -> None:
    text = write_recipe().read_text().replace("depth = 3,", "depht = 3,", 1)
    assert_user_error(runner.invoke(cli, ["validate", str(write_recipe(text))]),
                      "models.a", "vit_tiny_patch16_224", "depht")


def _with_model_b(write_recipe, model_b: str) -> str:
    text = write_recipe().read_text()
    start, end = text.index("[models.b]"), text.index("[layers]")
    return text[:start] + model_b + "\n" + text[end:]


def test_callable_whose_module_is_not_importable(runner, write_recipe) -> None:
    text = _with_model_b(write_recipe, '[models.b]\nmodel = "callable"\n'
                         'params = { target = "my_nets_nowhere:build" }\n')
    assert_user_error(runner.invoke(cli, ["validate", str(write_recipe(text))]),
                      "models.b", "my_nets_nowhere:build", "No module named 'my_nets_nowhere'",
                      "PYTHONPATH", "current directory")


def test_callable_that_cannot_be_built_on_meta_is_noted_not_refused(runner, write_recipe,
                                                                    tmp_path: Path,
                                                                    monkeypatch) -> None:
    (tmp_path / "net_needs_data.py").write_text(
        "import torch\n\n"
        "def build():\n"
        "    net = torch.nn.Linear(4, 4)\n"
        "    print(float(net.weight.sum()))  # needs data: fails on the meta device\n"
        "    return net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = _with_model_b(write_recipe, '[models.b]\nmodel = "callable"\n'
                         'params = { target = "net_needs_data:build" }\n'
                         'layers = { blocks = "output" }\n')
    result = runner.invoke(cli, ["validate", str(write_recipe(text))])
    assert result.exit_code == 0, result.output
    assert "models.b" in result.output and "not checked" in result.output


def test_layer_pattern_that_matches_nothing(runner, write_recipe) -> None:
    path = write_recipe(layers='blocks = "blocks.*"\nqkv = "blocks.*.attn.qkvv"')
    assert_user_error(runner.invoke(cli, ["validate", str(path)]),
                      "models.a, layer group 'qkv'", "blocks.*.attn.qkvv", "matches nothing",
                      "there are: attn_drop", "q_norm, qkv.")


def test_zoo_layers_are_checked_without_the_checkpoint_file(runner, write_recipe,
                                                            tmp_path: Path) -> None:
    text = _with_model_b(write_recipe, '[models.b]\nmodel = "resnet50_dino"\nreduce = "gap"\n'
                         f'params = {{ checkpoint = "{tmp_path / "r50.pth"}" }}\n')
    result = runner.invoke(cli, ["validate", str(write_recipe(text))])
    assert_user_error(result, "r50.pth' does not exist", "models.b, layer group 'blocks'",
                      "'blocks.*' matches nothing", "layer1")


def test_evaluator_naming_a_layer_group_that_does_not_exist(runner, write_recipe) -> None:
    extra = ('\n[[evaluators]]\nname = "knn"\nparams = { group = "block" }\n'
             '\n[[evaluators]]\nname = "linear_probe"\n'
             'params = { layers = [["blocks.1", "blocks.7"]], epochs = [2], warmup_epochs = [1] }\n'
             '\n[[evaluators]]\nname = "prediction_agreement"\n'
             'params = { layer = "blocks", models = ["a", "c"] }\n')
    result = runner.invoke(cli, ["validate", str(write_recipe(extra=extra))])
    assert_user_error(result, "evaluators[0] (knn).params.group: 'block' is not a layer group",
                      "(blocks)", "evaluators[1] (linear_probe).params.layers: 'blocks.7'",
                      "evaluators[2] (prediction_agreement).params.models: 'c' is not a model")
    assert "'blocks.1'" not in result.output  # a layer the models select is fine


def test_validate_reports_plugins_that_failed(runner, write_recipe, register_plugin) -> None:
    @hookimpl
    def register_metrics(register):
        raise RuntimeError("boom in the plugin")

    register_plugin(types.SimpleNamespace(register_metrics=register_metrics), "broken-plugin")
    result = runner.invoke(cli, ["validate", str(write_recipe())])
    assert result.exit_code == 0, result.output
    assert "plugin 'broken-plugin'" in result.output and "boom in the plugin" in result.output


def test_shipped_recipes_validate_with_their_layers_checked(runner) -> None:
    result = runner.invoke(cli, ["validate", str(RECIPES / "paper.toml")])
    problems = [ln for ln in result.output.splitlines() if ln.startswith("- ")]
    assert problems and all("does not exist" in p for p in problems), result.output
    assert runner.invoke(cli, ["validate", str(RECIPES / "mini.toml")]).exit_code == 0
