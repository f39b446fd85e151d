"""Reading checkpoints safely, clear errors for bad files, and `repsim convert`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from repsim import build_model
from repsim.errors import CheckpointError
from repsim.models import zoo
from repsim.models.checkpoints import read_checkpoint
from repsim.models.official import convert_checkpoint

sys.path.insert(0, str(Path(__file__).parent))  # importlib mode: reach the shared reference module
from test_zoo_reference import IMG, save, vit_case  # noqa: E402

SMALL = {"arch_overrides": {"depth": 2, "img_size": IMG}}


def dino_s16(tmp_path: Path, layout: str = "bare") -> tuple[torch.nn.Module, Path, dict]:
    ref, path, params, _ = vit_case("dino_vit_s16", layout, tmp_path)
    return ref, path, params


# ------------------------------------------------------------------ safe reading


def test_full_dino_checkpoint_with_namespace_is_read_through_the_allow_list(tmp_path: Path) -> None:
    _, path, _ = dino_s16(tmp_path, "full")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, weights_only=True)  # what plain safe loading says about this file
    ckpt = read_checkpoint(path)
    assert ckpt.data["args"].arch == "vit_small"


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint does: call os.system on load
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_not_run(tmp_path: Path) -> None:
    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": payload}, path)
    with pytest.raises(CheckpointError, match="will not load.*system"):
        build_model("dino_vit_s16", checkpoint=path)
    assert not payload.marker.exists()


def test_truncated_file(tmp_path: Path) -> None:
    _, path, params = dino_s16(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*download it again") as err:
        build_model("dino_vit_s16", checkpoint=path, **params)
    assert str(path) in str(err.value)


def test_truncated_safetensors(tmp_path: Path) -> None:
    _, path, params = dino_s16(tmp_path)
    out = convert_checkpoint("dino_vit_s16", path, tmp_path / "c.safetensors", **params).path
    out.write_bytes(out.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*truncated"):
        build_model("dino_vit_s16", checkpoint=out)


def test_not_a_dict(tmp_path: Path) -> None:
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        build_model("dino_vit_s16", checkpoint=tmp_path / "list.pth")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("mae_vit_b16", checkpoint=tmp_path / "mae_pretrain_vit_base.pth")


# ------------------------------------------------------------------ files that do not fit


def test_wrong_width_names_the_entries_that_fit(tmp_path: Path) -> None:
    _, path, _, _ = vit_case("dino_vit_b16", "bare", tmp_path, depth=2)
    with pytest.raises(CheckpointError) as err:
        build_model("dino_vit_s16", checkpoint=path, **SMALL)
    msg = str(err.value)
    assert f"checkpoint '{path}' does not fit model 'dino_vit_s16'" in msg
    assert "'cls_token': [1, 1, 768] in the file, [1, 1, 384] in the network" in msg
    assert "The file holds a ViT (embed 768, depth 2, patch 16)." in msg
    assert "Entries of that size: dino_vit_b16, mocov3_vit_b16, mae_vit_b16, " in msg


def test_wrong_patch_size(tmp_path: Path) -> None:
    _, path, params, _ = vit_case("dino_vit_s8", "bare", tmp_path)
    with pytest.raises(CheckpointError, match=r"patch 8\)\.\nEntries of that size: dino_vit_s8\."):
        build_model("dino_vit_s16", checkpoint=path, **params)


def test_pretrained_mae_into_finetuned_entry(tmp_path: Path) -> None:
    _, path, params, _ = vit_case("mae_vit_b16", "pretrain", tmp_path)
    with pytest.raises(CheckpointError, match="pre-trained MAE encoder .*use mae_vit_b16"):
        build_model("mae_vit_b16_ft", checkpoint=path, **params)


def test_unexpected_keys_are_an_error_not_a_silent_loss(tmp_path: Path) -> None:
    ref, _, params = dino_s16(tmp_path)
    sd = {**ref.state_dict(), "blocks.0.ls1.gamma": torch.ones(384)}
    with pytest.raises(CheckpointError) as err:
        build_model("dino_vit_s16", checkpoint=save(sd, tmp_path / "x.pth"), **params)
    msg = str(err.value)
    assert "1 file tensors have no place in the network (loading would lose them): " \
           "blocks.0.ls1.gamma" in msg
    assert "not part of this method's published layout" in msg


def test_missing_keys(tmp_path: Path) -> None:
    ref, _, params = dino_s16(tmp_path)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("norm.")}
    with pytest.raises(CheckpointError, match="2 network tensors are not in the file: norm.weight"):
        build_model("dino_vit_s16", checkpoint=save(sd, tmp_path / "x.pth"), **params)


def test_file_of_another_method(tmp_path: Path) -> None:
    ref, _, params, _ = vit_case("mocov3_vit_s16", "deit", tmp_path)
    moco = save(ref.state_dict(), tmp_path / "moco_bare.pth")
    with pytest.raises(CheckpointError, match="looks like a MoCo-v3 checkpoint.*mocov3_vit_s16"):
        build_model("dino_vit_s16", checkpoint=moco, **params)  # same shapes, 12 heads not 6
    _, dino, params = dino_s16(tmp_path)
    with pytest.raises(CheckpointError, match="not MoCo-v3's fixed 2-D sin-cos"):
        build_model("mocov3_vit_s16", checkpoint=dino, **params)
    with pytest.raises(CheckpointError, match="none of the entries \\['target_encoder'\\]"):
        build_model("msn_vit_s16", checkpoint=vit_case("dino_vit_s16", "full", tmp_path)[1],
                    **params)


def test_branch_needs_a_training_checkpoint(tmp_path: Path) -> None:
    _, path, params = dino_s16(tmp_path)
    with pytest.raises(CheckpointError, match="branch 'student' was requested.*bare backbone"):
        build_model("dino_vit_s16", checkpoint=path, branch="student", **params)


def test_broken_sparse_kernel(tmp_path: Path) -> None:
    model = {"encoder.downsample_layers.1.1.kernel": torch.zeros(5, 16, 32)}
    with pytest.raises(CheckpointError, match="sparse kernel .* \\[5, 16, 32\\]"):
        build_model("convnextv2_base_fcmae", checkpoint=save({"model": model}, tmp_path / "f.pt"))


# ------------------------------------------------------------------ repsim convert


@pytest.fixture
def cli() -> click.Group:
    group = click.Group("repsim")
    zoo.register_commands(cli=group)
    return group


def test_convert_command_round_trip(cli: click.Group, tmp_path: Path) -> None:
    student, path, _, _ = vit_case("dino_vit_s16", "full_student", tmp_path)
    out = tmp_path / "dino_s16_student.safetensors"
    result = CliRunner().invoke(cli, [
        "convert", str(path), "--model", "dino_vit_s16", "--out", str(out), "-p", "branch=student",
        "-p", 'arch_overrides={"depth": 2, "img_size": 32}'])
    assert result.exit_code == 0, result.output
    assert "for model 'dino_vit_s16'; dropped 8 keys" in result.output
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["repsim_model"] == "dino_vit_s16"
        assert "head.mlp.0.weight" not in f.keys()  # noqa: SIM118

    model = build_model("dino_vit_s16", checkpoint=out)  # size and branch come from the file
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), student(x), rtol=1e-4, atol=1e-5)
    assert model.provenance["layout"].startswith("repsim convert output, from 'dino_vit_s16-full")
    assert model.provenance["branch"] == "student"

    with pytest.raises(CheckpointError,
                       match="converted for model 'dino_vit_s16', not 'msn_vit_s16'"):
        build_model("msn_vit_s16", checkpoint=out)
    with pytest.raises(CheckpointError, match="holds the 'student' network only"):
        build_model("dino_vit_s16", checkpoint=out, branch="teacher")


def test_convert_command_reports_errors(cli: click.Group, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["convert", str(bad), "--model", "dino_vit_s16", "--out",
                                      str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and "could not be read" in result.output
    assert not (tmp_path / "o.safetensors").exists()
    result = CliRunner().invoke(cli, ["convert", str(bad), "--model", "dino_vit_s16", "--out",
                                      str(tmp_path / "o.pth")])
    assert "must end in .safetensors" in result.output


def test_generic_timm_entry_reads_a_converted_file(tmp_path: Path) -> None:
    _, path, params = dino_s16(tmp_path)
    out = convert_checkpoint("dino_vit_s16", path, tmp_path / "d.safetensors", **params).path
    timm_model = build_model("timm", arch="vit_small_patch16_224", checkpoint=out,
                             kwargs={"depth": 2, "img_size": IMG, "num_classes": 0})
    zoo_model = build_model("dino_vit_s16", checkpoint=path, **params)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.module(x), zoo_model.module(x))
