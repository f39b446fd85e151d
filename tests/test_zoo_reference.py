"""Reference networks and official checkpoint layouts for the zoo tests (no tests here).

The reference networks are written after the authors' own code (DINO/MSN/MAE ``VisionTransformer``,
ConvNeXt-V2 ``convnextv2.py``), not timm, so comparing outputs checks the architecture flags timm
is given (heads, qkv bias, LayerNorm eps, pooling) as well as the key conversion. The writers lay
weights out exactly as each method's training script saves them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from repsim.models.zoo import BY_NAME

WIDTH = {"small": 384, "base": 768, "large": 1024}
IMG = 32  # 2x2 patches at /16, 4x4 at /8: small, but a real 2-D grid


def heads(entry_name: str, width: int) -> int:
    """Heads as the authors use them: MoCo-v3 ViT-S has 12, every other ViT-S 6."""
    if width == 384:
        return 12 if entry_name.startswith("mocov3") else 6
    return {768: 12, 1024: 16}[width]


class RefAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class RefViT(nn.Module):
    """DINO/MSN/MAE-style ViT: CLS after the final norm, or (MAE fine-tuned) the mean of the patch
    tokens through ``fc_norm`` and ``head``."""

    def __init__(self, dim: int, depth: int, num_heads: int, patch: int, img: int = IMG,
                 global_pool: bool = False, classes: int = 0) -> None:
        super().__init__()
        self.global_pool = global_pool
        self.patch_embed = RefPatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img // patch) ** 2, dim))
        self.blocks = nn.ModuleList(RefBlock(dim, num_heads) for _ in range(depth))
        if global_pool:
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes) if classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        out = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else self.norm(x)[:, 0]
        return self.head(out) if self.head is not None else out


def moco_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Transcribed from moco-v3 vits.py ``build_2d_sincos_position_embedding``."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], 1)
    return torch.cat([torch.zeros(1, 1, dim), pos[None]], dim=1)


class RefLayerNormCF(nn.Module):
    """ConvNeXt-V2's channels-first LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RefGRN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class RefCNBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = RefGRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class RefConvNeXtV2(nn.Module):
    """The dense ConvNeXt-V2 of the authors' convnextv2.py; returns the pooled stage-4 map."""

    def __init__(self, depths: list[int], dims: list[int]) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), RefLayerNormCF(dims[0]))]
            + [nn.Sequential(RefLayerNormCF(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
               for i in range(3)]
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*[RefCNBlock(dims[i]) for _ in range(depths[i])]) for i in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x.mean(dim=(2, 3))


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Distinct, non-trivial values everywhere (LayerNorm/BN affine and running stats included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.dtype == torch.long:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
    return module.eval()


def _randn(*shape: int) -> torch.Tensor:
    return 0.05 * torch.randn(*shape)


def projector(prefix: str, dims: list[int]) -> dict[str, torch.Tensor]:
    """MoCo-v3 ``_build_mlp``: Linear(no bias)/BN/ReLU ..., last BN without affine."""
    out: dict[str, torch.Tensor] = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"{prefix}{3 * i}.weight"] = _randn(b, a)
        bn = f"{prefix}{3 * i + 1}."
        if i < len(dims) - 2:
            out[bn + "weight"], out[bn + "bias"] = torch.ones(b), torch.zeros(b)
        out[bn + "running_mean"], out[bn + "running_var"] = torch.zeros(b), torch.ones(b)
        out[bn + "num_batches_tracked"] = torch.tensor(7)
    return out


def optimizer_state() -> dict:
    return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
            "param_groups": [{"lr": 1e-4, "params": [0]}]}


def mocov3_pretrain(base: dict, momentum: dict, head: str, width: int) -> dict:
    """``main_moco.py``'s save_checkpoint: encoders with a projector head, and a predictor."""
    sd: dict[str, torch.Tensor] = {}
    for name, enc in (("base_encoder", base), ("momentum_encoder", momentum)):
        sd.update({f"module.{name}.{k}": v for k, v in enc.items()})
        sd.update(projector(f"module.{name}.{head}.", [width, 64, 16]))
    sd.update(projector("module.predictor.", [16, 64, 16]))
    return {"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": optimizer_state(),
            "scaler": {"scale": 1024.0}}


def mocov3_linear(model: dict) -> dict:
    """``main_lincls.py``'s checkpoint: the DDP-wrapped classifier network."""
    return {"epoch": 90, "arch": "vit_small", "best_acc1": torch.tensor(73.2),
            "state_dict": {f"module.{k}": v for k, v in model.items()},
            "optimizer": optimizer_state()}


def dino_head(prefix: str, width: int) -> dict[str, torch.Tensor]:
    """DINOHead: mlp.0/2/4 and a weight-normed last layer."""
    return {f"{prefix}mlp.0.weight": _randn(64, width), f"{prefix}mlp.0.bias": _randn(64),
            f"{prefix}mlp.2.weight": _randn(64, 64), f"{prefix}mlp.2.bias": _randn(64),
            f"{prefix}mlp.4.weight": _randn(16, 64), f"{prefix}mlp.4.bias": _randn(16),
            f"{prefix}last_layer.weight_g": torch.ones(32, 1),
            f"{prefix}last_layer.weight_v": _randn(32, 16)}


def dino_full(teacher: dict, student: dict, width: int, teacher_ddp: bool = False) -> dict:
    """``main_dino.py``'s checkpoint.pth; a ViT teacher is not DDP-wrapped, a ResNet one is."""
    t = "module." if teacher_ddp else ""
    return {
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    **dino_head("module.head.", width)},
        "teacher": {**{f"{t}backbone.{k}": v for k, v in teacher.items()},
                    **dino_head(f"{t}head.", width)},
        "optimizer": optimizer_state(),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005,
                                   data_path="/path/to/imagenet/train",
                                   local_crops_scale=(0.05, 0.4)),
        "dino_loss": {"center": torch.zeros(1, 32)},
    }


def mae_pretrain(encoder: dict, width: int, patches: int) -> dict:
    """MAE ``models_mae.py`` state: encoder + ``decoder_*`` + ``mask_token``, under ``model``."""
    sd = dict(encoder)
    sd.update({"mask_token": _randn(1, 1, 32), "decoder_embed.weight": _randn(32, width),
               "decoder_embed.bias": _randn(32), "decoder_pos_embed": _randn(1, patches + 1, 32),
               "decoder_blocks.0.norm1.weight": torch.ones(32),
               "decoder_blocks.0.norm1.bias": torch.zeros(32),
               "decoder_norm.weight": torch.ones(32), "decoder_norm.bias": torch.zeros(32),
               "decoder_pred.weight": _randn(16 * 16 * 3, 32), "decoder_pred.bias": _randn(768)})
    return {"model": sd}


def msn_ckpt(target: dict, encoder: dict, width: int) -> dict:
    """``msn_train.py``'s save_checkpoint: DDP encoders with an ``fc`` projector, prototypes."""
    def wrap(enc: dict) -> dict:
        out = {f"module.{k}": v for k, v in enc.items()}
        out.update({"module.fc.fc1.weight": _randn(64, width), "module.fc.fc1.bias": _randn(64),
                    "module.fc.bn1.weight": torch.ones(64), "module.fc.bn1.bias": torch.zeros(64),
                    "module.fc.bn1.running_mean": torch.zeros(64),
                    "module.fc.bn1.running_var": torch.ones(64),
                    "module.fc.bn1.num_batches_tracked": torch.tensor(5),
                    "module.fc.fc2.weight": _randn(64, 64), "module.fc.fc2.bias": _randn(64),
                    "module.fc.fc3.weight": _randn(16, 64), "module.fc.fc3.bias": _randn(16)})
        return out

    return {"encoder": wrap(encoder), "opt": optimizer_state(), "prototypes": _randn(32, 16),
            "target_encoder": wrap(target), "epoch": 800, "loss": 2.5, "batch_size": 64,
            "world_size": 32, "lr": 0.001, "temperature": 0.1}


def fcmae_ckpt(dense: dict) -> dict:
    """An FCMAE checkpoint: the dense ConvNeXt-V2 weights laid out as the MinkowskiEngine encoder
    stores them (inverse of the authors' ``remap_checkpoint_keys``), plus decoder parts."""
    sparse: dict[str, torch.Tensor] = {}
    for key, v in dense.items():
        parts = key.split(".")
        first_down = key.startswith("downsample_layers.0.")
        if parts[-2] == "dwconv" and parts[-1] == "weight":  # [C, 1, k, k] → [k*k, C]
            sparse[".".join(parts[:-1] + ["kernel"])] = v.transpose(3, 2).reshape(v.shape[0], -1).T
        elif parts[-2] == "dwconv":
            sparse[key] = v.reshape(1, -1)
        elif parts[0] == "downsample_layers" and not first_down and parts[2] == "1":  # conv
            if parts[-1] == "weight":  # [out, in, k, k] → [k*k, in, out]
                w = v.transpose(3, 2).reshape(v.shape[0], v.shape[1], -1).permute(2, 1, 0)
                sparse[".".join(parts[:-1] + ["kernel"])] = w
            else:
                sparse[key] = v.reshape(1, -1)
        elif (parts[0] == "downsample_layers" and not first_down) or parts[-2] == "norm":
            sparse[".".join(parts[:-1] + ["ln", parts[-1]])] = v
        elif parts[-2] in ("pwconv1", "pwconv2"):
            sparse[".".join(parts[:-1] + ["linear", parts[-1]])] = v
        elif parts[-2] == "grn":
            sparse[key] = v.reshape(1, -1)
        else:
            sparse[key] = v
    model = {f"encoder.{k}": v for k, v in sparse.items()}
    model.update({"proj.weight": _randn(32, dense["stages.3.0.pwconv2.weight"].shape[0], 1, 1),
                  "proj.bias": _randn(32), "mask_token": _randn(1, 32, 1, 1),
                  "decoder.0.dwconv.weight": _randn(32, 1, 7, 7),
                  "decoder.0.grn.gamma": _randn(1, 1, 1, 128),
                  "pred.weight": _randn(32 * 32 * 3, 32, 1, 1), "pred.bias": _randn(3072)})
    return {"model": model, "epoch": 1600, "args": argparse.Namespace(model="convnextv2_base")}


def save(obj: dict, path: Path) -> Path:
    torch.save(obj, path)
    return path


def vit_case(name: str, layout: str, tmp_path: Path, depth: int | None = None, img: int = IMG
             ) -> tuple[RefViT, Path, dict, dict]:
    """Reference network, file in ``layout``, extra build params, expected provenance entries."""
    e = BY_NAME[name]
    depth = depth or (2 if e.width == 384 else 1)  # full width and heads; shallow to stay fast
    classes = 10 if layout in ("linear", "ft") else 0

    def net(seed: int) -> RefViT:
        ref = randomize(RefViT(e.width, depth, heads(name, e.width), e.patch, img,
                               global_pool=e.method == "mae_ft", classes=classes), seed)
        if e.method == "mocov3":
            with torch.no_grad():
                ref.pos_embed.copy_(moco_sincos(img // e.patch, img // e.patch, e.width))
        return ref

    ref, other = net(0), net(1)
    sd, osd = ref.state_dict(), other.state_dict()
    params: dict = {}
    expect: dict = {"dropped": [], "ignored": []}
    if layout == "pretrain" and e.method == "mocov3":
        obj = mocov3_pretrain(sd, osd, "head", e.width)
        expect = {"dropped": ["module.momentum_encoder.cls_token", "module.predictor.0.weight",
                              "module.base_encoder.head.0.weight"],
                  "ignored": ["optimizer", "epoch", "arch"], "branch": "base_encoder"}
    elif layout == "linear":
        obj = mocov3_linear(sd)
        expect["ignored"] = ["optimizer", "best_acc1"]
    elif layout in ("deit", "ft"):
        obj = {"model": sd}
    elif layout == "bare":
        obj = sd
    elif layout == "full":
        obj = dino_full(sd, osd, e.width)
        expect = {"dropped": ["head.mlp.0.weight", "head.last_layer.weight_v"],
                  "ignored": ["student", "args", "optimizer", "dino_loss"], "branch": "teacher"}
    elif layout == "full_student":
        obj, params = dino_full(osd, sd, e.width), {"branch": "student"}
        expect = {"dropped": ["module.head.mlp.0.weight"], "ignored": ["teacher", "args"],
                  "branch": "student"}
    elif layout == "pretrain":
        obj = mae_pretrain(sd, e.width, (img // e.patch) ** 2)
        expect["dropped"] = ["mask_token", "decoder_embed.weight", "decoder_pred.bias"]
    elif layout in ("target", "encoder"):
        branch = "target_encoder" if layout == "target" else "encoder"
        obj = msn_ckpt(sd, osd, e.width) if layout == "target" else msn_ckpt(osd, sd, e.width)
        params = {"branch": "encoder"} if layout == "encoder" else {}
        expect = {"dropped": ["prototypes", "module.fc.fc1.weight", "module.fc.bn1.running_var"],
                  "ignored": ["opt", "epoch", "loss", "target_encoder" if layout == "encoder"
                              else "encoder"], "branch": branch}
    else:
        raise AssertionError(layout)
    params["arch_overrides"] = {"depth": depth, "img_size": img}
    suffix = ".pth.tar" if e.checkpoint.endswith(".tar") else ".pth"
    return ref, save(obj, tmp_path / f"{name}-{layout}{suffix}"), params, expect


def small_resnet(seed: int, classes: int = 0) -> ResNet:
    net = ResNet(Bottleneck, [1, 1, 1, 1])
    net.fc = nn.Linear(2048, classes) if classes else nn.Identity()
    return randomize(net, seed)
