"""What the commands tell: parameters, layer shapes, labels, summary, plugin clashes, progress."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from repsim import hookimpl
from repsim.cli import cli

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_vit  # noqa: E402
from test_cli_errors import assert_user_error  # noqa: E402

TINY_ARGS = ["-p", "arch=vit_tiny_patch16_224", "-p",
             "kwargs={img_size = 16, patch_size = 4, depth = 3, embed_dim = 32, num_heads = 2}"]


@pytest.mark.parametrize(("kind", "name", "needles"), [
    ("models", "timm", ["arch", "str", "required", "timm architecture name",
                        "checkpoint", "Path | None", "preprocess.crop", "int | None"]),
    ("models", "dino_vit_s16", ["branch", "'teacher' | 'student'", "teacher",
                                "which network of a full training checkpoint"]),
    ("metrics", "linear_cka", ["debiased", "bool", "False"]),
    ("datasets", "synthetic", ["examples", "int"]),
    ("layer_selectors", "index", ["indices", "list[int] | int", "required", "container"]),
    ("evaluators", "knn", ["k", "int (>= 1)", "20", "reductions", "['cls', 'gap', 'gap_no_cls']"]),
])
def test_list_one_part_shows_its_parameters(runner, kind: str, name: str,
                                            needles: list[str]) -> None:
    result = runner.invoke(cli, ["list", kind, name])
    assert result.exit_code == 0, result.output
    assert "parameter" in result.output and "default" in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_list_of_many_parts_says_how_to_see_parameters(runner) -> None:
    result = runner.invoke(cli, ["list", "models", "dino_*"])
    assert result.exit_code == 0 and "dino_vit_b16" in result.output
    assert "repsim list models NAME" in result.output


def test_layers_shows_output_shapes_of_a_structure_without_weights(runner, monkeypatch) -> None:
    import timm

    create = timm.create_model

    def on_meta_only(*args, **kwargs):
        assert torch.get_default_device().type == "meta", "`repsim layers` built weights"
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", on_meta_only)
    result = runner.invoke(cli, ["layers", "timm", *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert re.search(r"^blocks\.0 +\(Block\) +\[B, 17, 32\]$", result.output, re.M), result.output
    assert re.search(r"^blocks\.0\.attn\.qkv +\(Linear\) +\[B, 17, 96\]$", result.output, re.M)
    assert "16x16 inputs" in result.output


def test_layers_of_a_zoo_entry_needs_no_checkpoint(runner) -> None:
    result = runner.invoke(cli, ["layers", "resnet50_dino", "--pattern", "layer4.*"])
    assert result.exit_code == 0, result.output
    assert [re.sub(" +", " ", ln) for ln in result.output.splitlines()[:3]] == [
        f"layer4.{i} (Bottleneck) [B, 2048, 7, 7]" for i in range(3)]


def test_layers_is_fast() -> None:
    """A ViT-L's layers and shapes in well under 3 s once torch and timm are imported (a real
    build initialised 304 M parameters: 13 s on 2 cores)."""
    code = ("import time, torch, timm\n"
            "from click.testing import CliRunner\n"
            "from repsim.cli import cli\n"
            "start = time.perf_counter()\n"
            "r = CliRunner().invoke(cli, ['layers', 'timm', '-p', 'arch=vit_large_patch16_224'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(time.perf_counter() - start)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert float(out.stdout) < 3.0, out.stdout


def test_tables_and_heatmaps_use_full_layer_names() -> None:
    from repsim.report import heatmap, matrix_table

    names = ["blocks.0", "blocks.0.norm1", "blocks.1", "blocks.1.norm1"]
    table = matrix_table(torch.eye(4), names, names)
    header = table.splitlines()[0]
    assert all(f" {n} " in header for n in names), header
    fig = heatmap(torch.eye(4), names, names, "t", "x", "y")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names


def test_summary_states_n_data_reduction_and_why_a_cell_is_empty(runner, write_recipe,
                                                                 tmp_path: Path) -> None:
    text = write_recipe(layers='blocks = "blocks.*"\nqkv = { selector = "attn_qkv", '
                        'reduce = "flatten" }').read_text()
    b_params = f"params = {tiny_vit(1)}\n"
    text = text.replace(b_params, b_params + 'layers = { blocks = ["blocks.0", "blocks.1"], '
                        "qkv = [] }\n")
    result = runner.invoke(cli, ["run", str(write_recipe(text)), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert re.search(r"^\| minibatch_cka +\| a +\| b +\| 40 +\|", summary, re.M), summary
    assert "split 'val' of dataset 'synthetic'" in summary and "column N" in summary
    assert "reduction 'cls'" in summary and "qkv: 'flatten'" in summary
    assert "- (3 vs 2 layers)" in summary and "- (b: no layers)" in summary
    assert "`-`" in summary  # the legend


def test_similarity_table_names_the_files_of_rows_and_columns(runner, tmp_path: Path) -> None:
    save_file({"l1": torch.randn(32, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"m1": torch.randn(32, 4)}, str(tmp_path / "b.safetensors"))
    result = runner.invoke(cli, ["similarity", str(tmp_path / "a.safetensors"),
                                 str(tmp_path / "b.safetensors")])
    assert result.exit_code == 0, result.output
    assert f"rows: layers of {tmp_path / 'a.safetensors'}" in result.output
    assert f"columns: layers of {tmp_path / 'b.safetensors'}" in result.output


def test_plugin_name_clash_is_shown_by_plugins_and_refused_elsewhere(runner, write_recipe,
                                                                     register_plugin) -> None:
    @hookimpl
    def register_metrics(register):
        register("minibatch_cka", lambda p: None)

    register_plugin(types.SimpleNamespace(register_metrics=register_metrics), "clashing-plugin")
    shown = runner.invoke(cli, ["plugins"])
    assert shown.exit_code == 0, shown.output
    assert "metric 'minibatch_cka' is registered twice" in shown.output
    assert "clashing-plugin" in shown.output and "repsim.metrics.builtin" in shown.output
    for args in (["list", "metrics"], ["validate", str(write_recipe())]):
        assert_user_error(runner.invoke(cli, args), "registered twice", "clashing-plugin")


def test_zoo_loader_says_what_it_loads(tmp_path: Path, caplog) -> None:
    from test_zoo_reference import vit_case

    from repsim import build_model

    _, path, params, _ = vit_case("dino_vit_s16", "full", tmp_path)
    with caplog.at_level(logging.INFO, logger="repsim"):
        build_model("dino_vit_s16", checkpoint=path, **params)
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"dino_vit_s16: reading {path}" in said and "MiB" in said
    assert "'teacher'" in said and "loaded" in said


def test_run_shows_model_loading_unless_quiet(runner, tmp_path: Path) -> None:
    from test_zoo_reference import vit_case

    _, path, params, _ = vit_case("dino_vit_s16", "bare", tmp_path)
    recipe = tmp_path / "zoo.toml"
    overrides = json.dumps(params["arch_overrides"]).replace(":", " =").replace('"', "")
    recipe.write_text(
        f'[run]\nexamples = 8\nbatch_size = 4\noutput = "{tmp_path / "run"}"\n'
        '[data]\ndataset = "synthetic"\nparams = { examples = 40, classes = 4, size = 32 }\n'
        f'[models.dino]\nmodel = "dino_vit_s16"\n'
        f'params = {{ checkpoint = "{path}", arch_overrides = {overrides} }}\n'
        '[layers]\nblocks = "blocks.*"\n[[metrics]]\nname = "minibatch_cka"\n')
    loud = runner.invoke(cli, ["run", str(recipe)])
    assert loud.exit_code == 0, loud.output
    assert f"dino_vit_s16: reading {path}" in loud.output
    quiet = runner.invoke(cli, ["run", str(recipe), "--quiet", "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0 and "reading" not in quiet.output
