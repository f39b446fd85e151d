"""The model zoo: every entry loads its authors' checkpoint layouts exactly.

Checkpoints are written here in each official key layout (full width and heads, shallow depth,
32-px inputs), loaded through the registry, and compared with reference networks written after
the authors' code, built directly with the same weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from repsim import build_model
from repsim.models.base import Preprocess
from repsim.models.zoo import BY_NAME, ENTRIES
from repsim.plugins import registry

# pytest imports test files in importlib mode: make the shared reference module next to this file
# importable by name.
sys.path.insert(0, str(Path(__file__).parent))
from test_zoo_reference import (  # noqa: E402
    IMG,
    RefConvNeXtV2,
    RefViT,
    dino_full,
    fcmae_ckpt,
    heads,
    moco_sincos,
    mocov3_linear,
    mocov3_pretrain,
    randomize,
    save,
    small_resnet,
    vit_case,
)

NAMES = ["mocov3_vit_s16", "mocov3_vit_b16", "dino_vit_s16", "dino_vit_s8", "dino_vit_b16",
         "dino_vit_b8", "mae_vit_b16", "mae_vit_l16", "mae_vit_b16_ft", "msn_vit_s16",
         "msn_vit_b16", "msn_vit_l16", "convnextv2_base_fcmae", "resnet50_dino", "resnet50_mocov3"]


def test_registry_lists_every_entry_with_file_and_preprocessing() -> None:
    models = registry("model")
    assert sorted(e.name for e in ENTRIES) == sorted(NAMES)
    for name in NAMES:
        part = models.get(name)
        assert part.info["checkpoint"] == BY_NAME[name].checkpoint
        assert part.info["preprocess"] == "resize 256, centre-crop 224, ImageNet mean/std"
        assert "checkpoint" in part.params.model_fields


def test_registry_import_does_not_import_torch() -> None:
    code = ("import sys, repsim.plugins as p; r = p.get_host().registries; "
            "assert 'dino_vit_s16' in r['model'] and 'cnn_blocks' in r['layer_selector']; "
            "assert 'torch' not in sys.modules, 'torch imported at start-up'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ ViTs

VIT_CASES = [
    ("mocov3_vit_s16", "pretrain"), ("mocov3_vit_s16", "linear"), ("mocov3_vit_s16", "deit"),
    ("mocov3_vit_b16", "pretrain"),
    ("dino_vit_s16", "bare"), ("dino_vit_s16", "full"), ("dino_vit_s16", "full_student"),
    ("dino_vit_s8", "bare"), ("dino_vit_b16", "full"), ("dino_vit_b8", "bare"),
    ("mae_vit_b16", "pretrain"), ("mae_vit_l16", "pretrain"), ("mae_vit_b16_ft", "ft"),
    ("msn_vit_s16", "target"), ("msn_vit_s16", "encoder"), ("msn_vit_b16", "target"),
    ("msn_vit_l16", "target"),
]


def assert_vit_flags(model, name: str, ref: RefViT) -> None:
    e, module = BY_NAME[name], model.module
    norms = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert all(b.attn.qkv.bias is not None for b in module.blocks)
    assert all(b.attn.num_heads == heads(name, e.width) for b in module.blocks)
    if e.method == "mae_ft":
        assert module.global_pool == "avg" and isinstance(module.fc_norm, nn.LayerNorm)
        assert isinstance(module.norm, nn.Identity)
    else:
        assert module.global_pool == "token" and isinstance(module.norm, nn.LayerNorm)
        assert isinstance(module.fc_norm, nn.Identity)
    assert not module.training
    # the official transform (resize 256, crop 224) scaled to the network's 32-px inputs
    assert model.preprocess == Preprocess(resize=IMG * 256 // 224, crop=IMG)
    assert (model.num_prefix_tokens, model.family, model.name) == (1, "vit", name)


@pytest.mark.parametrize(("name", "layout"), VIT_CASES, ids=[f"{n}-{lay}" for n, lay in VIT_CASES])
def test_vit_entry_loads_official_layout_exactly(name: str, layout: str, tmp_path: Path) -> None:
    ref, path, params, expect = vit_case(name, layout, tmp_path)
    model = build_model(name, checkpoint=path, **params)

    sd = ref.state_dict()
    loaded = model.module.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd), "backbone weights differ from the file"
    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=1e-4, atol=1e-5)

    assert_vit_flags(model, name, ref)
    prov = model.provenance
    assert prov["checkpoint"] == str(path) and prov["loaded_keys"] == len(sd)
    assert prov["missing_keys"] == []
    assert set(expect["dropped"]) <= set(prov["dropped_keys"])
    assert set(expect["ignored"]) <= set(prov["ignored_entries"])
    assert prov["branch"] == expect.get("branch")


def test_mocov3_position_embedding_is_filled_when_absent(tmp_path: Path) -> None:
    ref, _, params, _ = vit_case("mocov3_vit_s16", "deit", tmp_path)
    sd = {k: v for k, v in ref.state_dict().items() if k != "pos_embed"}
    model = build_model("mocov3_vit_s16", checkpoint=save({"model": sd}, tmp_path / "np.pth"),
                        **params)
    assert torch.equal(model.module.pos_embed, moco_sincos(2, 2, 384))
    assert model.provenance["missing_keys"] == [
        "pos_embed (filled with MoCo-v3's fixed 2-D sin-cos embedding)"]
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=1e-4, atol=1e-5)


def test_preprocess_override(tmp_path: Path) -> None:
    _, path, params, _ = vit_case("dino_vit_s16", "bare", tmp_path, img=224)
    model = build_model("dino_vit_s16", checkpoint=path, **params,
                        preprocess={"resize": 256, "crop": 224, "interpolation": "bicubic"})
    assert model.preprocess == Preprocess(256, 224, interpolation="bicubic")
    assert model.provenance["preprocess"].startswith("resize 256 (bicubic), centre-crop 224")


# ------------------------------------------------------------------ CNNs


def test_convnextv2_fcmae_sparse_checkpoint(tmp_path: Path) -> None:
    depths, dims = [1, 1, 2, 1], [16, 32, 64, 128]
    ref = randomize(RefConvNeXtV2(depths, dims), 0)
    path = save(fcmae_ckpt(ref.state_dict()), tmp_path / "convnextv2_base_1k_224_fcmae.pt")
    model = build_model("convnextv2_base_fcmae", checkpoint=path,
                        arch_overrides={"depths": depths, "dims": dims})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=1e-4, atol=1e-5)

    m, r = model.module.state_dict(), ref.state_dict()
    assert torch.equal(m["stages.2.blocks.1.conv_dw.weight"], r["stages.2.1.dwconv.weight"])
    assert torch.equal(m["stages.1.downsample.1.weight"], r["downsample_layers.1.1.weight"])
    assert torch.equal(m["stages.3.blocks.0.mlp.grn.weight"], r["stages.3.0.grn.gamma"].flatten())
    assert isinstance(model.module.head.norm, nn.Identity)
    assert (model.family, model.num_prefix_tokens) == ("cnn", 0)
    prov = model.provenance
    assert {"proj.weight", "mask_token", "decoder.0.dwconv.weight", "pred.bias"} <= set(
        prov["dropped_keys"])
    assert {"epoch", "args"} <= set(prov["ignored_entries"])
    assert "sparse kernels made dense" in prov["layout"]


@pytest.mark.parametrize("layout", ["bare", "full", "full_student"])
def test_resnet50_dino(layout: str, tmp_path: Path) -> None:
    ref, other = small_resnet(0), small_resnet(1)
    sd, osd = ref.state_dict(), other.state_dict()
    obj, params = sd, {}
    if layout == "full":  # a ResNet teacher has BatchNorm, so main_dino wraps it in DDP
        obj = dino_full(sd, osd, 2048, teacher_ddp=True)
    elif layout == "full_student":
        obj, params = dino_full(osd, sd, 2048, teacher_ddp=True), {"branch": "student"}
    path = save(obj, tmp_path / "dino_resnet50_pretrain.pth")
    model = build_model("resnet50_dino", checkpoint=path, arch_overrides={"layers": [1, 1, 1, 1]},
                        **params)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=1e-4, atol=1e-5)
    assert isinstance(model.module.fc, nn.Identity) and model.family == "cnn"
    if layout != "bare":
        assert any(k.endswith("head.mlp.0.weight") for k in model.provenance["dropped_keys"])


@pytest.mark.parametrize("layout", ["pretrain", "linear"])
def test_resnet50_mocov3(layout: str, tmp_path: Path) -> None:
    classes = 10 if layout == "linear" else 0
    ref = small_resnet(0, classes)
    if layout == "pretrain":
        obj = mocov3_pretrain(ref.state_dict(), small_resnet(1).state_dict(), "fc", 2048)
    else:
        obj = mocov3_linear(ref.state_dict())
    path = save(obj, tmp_path / "r-50-1000ep.pth.tar")
    model = build_model("resnet50_mocov3", checkpoint=path, arch_overrides={"layers": [1, 1, 1, 1]})
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=1e-4, atol=1e-5)
    if layout == "pretrain":
        assert isinstance(model.module.fc, nn.Identity)
        assert {"module.base_encoder.fc.0.weight", "module.momentum_encoder.conv1.weight",
                "module.predictor.3.weight"} <= set(model.provenance["dropped_keys"])
    else:
        assert model.module.fc.out_features == 10
        assert "classifier kept" in model.provenance["layout"]


# ------------------------------------------------------------------ full size


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layout"), [("dino_vit_b16", "full"), ("mae_vit_b16_ft", "ft"),
                                              ("mocov3_vit_b16", "pretrain")])
def test_vit_b_full_size(name: str, layout: str, tmp_path: Path) -> None:
    ref, path, params, _ = vit_case(name, layout, tmp_path, depth=12, img=224)
    params.pop("arch_overrides")
    model = build_model(name, checkpoint=path, **params)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resnet50_full_size(tmp_path: Path) -> None:
    ref = randomize(ResNet(Bottleneck, [3, 4, 6, 3]), 0)
    ref.fc = nn.Identity()
    path = save(dino_full(ref.state_dict(), ref.state_dict(), 2048, teacher_ddp=True),
                tmp_path / "full.pth")
    model = build_model("resnet50_dino", checkpoint=path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=1e-4, atol=1e-4)
