"""Fourier analysis of token maps: known spectra, Park et al.'s reference, streaming, run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import repsim
from repsim.evaluators.context import InMemoryContext
from repsim.evaluators.fourier import (FourierEvaluator, fourier_features, fourier_profile,
                                       token_spectrum)
from repsim.evaluators.params import FourierParams
from repsim.plugins import registry
from repsim.recipe import check_recipe
from repsim.run import Run

EPS = 1e-6


def tokens_from_grid(grid: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """``[B, h, w, D]`` → ``[B, prefix + h·w, D]`` tokens; the prefix tokens are random (and
    dropped)."""
    b, h, w, d = grid.shape
    return torch.cat([torch.randn(b, prefix, d, dtype=grid.dtype), grid.reshape(b, h * w, d)], 1)


def test_a_constant_map_has_no_amplitude_above_frequency_zero():
    values = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    tokens = tokens_from_grid(values.expand(2, 4, 4, 3))
    amp = token_spectrum(tokens, 1, (4, 4), average="amplitude")
    assert amp[:, 0, 0].tolist() == pytest.approx([16 * values.abs().mean().item()] * 2)
    amp[:, 0, 0] = 0
    assert amp.abs().max() < 1e-12
    out = fourier_features(tokens, 1, (4, 4), average="amplitude")
    dc = 16 * values.abs().mean().item()
    assert out["frequency"].tolist() == [0.0, 0.5, 1.0]
    assert out["delta_log_amplitude"][1:].tolist() == pytest.approx(
        [math.log(EPS) - math.log(dc + EPS)] * 2)
    log_out = fourier_features(tokens, 1, (4, 4))  # mean of log(|F| + eps) over channels
    level0 = torch.log(16 * values.abs() + EPS).mean().item()
    assert log_out["delta_log_amplitude"][-1].item() == pytest.approx(math.log(EPS) - level0)


@pytest.mark.parametrize("profile", ["diagonal", "ring"])
@pytest.mark.parametrize("average", ["log_amplitude", "amplitude"])
def test_a_checkerboard_puts_everything_at_the_highest_frequency(profile, average):
    signs = torch.tensor([[(-1.0) ** (i + j) for j in range(6)] for i in range(6)],
                         dtype=torch.float64)
    grid = signs[None, :, :, None] * torch.tensor([1.0, -3.0], dtype=torch.float64)
    out = fourier_features(tokens_from_grid(grid.expand(3, 6, 6, 2)), 1, (6, 6), average,
                           profile)
    delta = out["delta_log_amplitude"]
    assert out["frequency"][-1].item() == 1.0  # the Nyquist frequency of an even grid
    assert int(delta.argmax()) == len(delta) - 1
    torch.testing.assert_close(delta[:-1], torch.zeros(len(delta) - 1, dtype=torch.float64))
    # |F| = 36 |c| at (3, 3) only (c = 1, -3); the ring of frequency 3 has 11 frequencies.
    share = 1 if profile == "diagonal" else 1 / 11
    if average == "log_amplitude":
        level = (math.log(36 + EPS) + math.log(108 + EPS)) / 2
        want = share * level + (1 - share) * math.log(EPS) - math.log(EPS)
    else:
        want = math.log(share * 72 + EPS) - math.log(EPS)
    assert delta[-1].item() == pytest.approx(want)


def test_hand_worked_ring_and_diagonal_profiles_of_a_cosine():
    # 1 + cos(2π x / 4) on a 4x4 grid: |F| = 16 at (0, 0) and 8 at (0, ±1), zero elsewhere.
    x = torch.arange(4, dtype=torch.float64)
    grid = (1 + torch.cos(2 * math.pi * x / 4)).expand(4, 4)[None, :, :, None]
    tokens = tokens_from_grid(grid, prefix=0)
    ring = fourier_features(tokens, 0, (4, 4), average="amplitude", profile="ring")
    # ring 1 = the 8 frequencies with max(|ky|, |kx|) = 1, two of them at 8: mean 2
    assert ring["delta_log_amplitude"].tolist() == pytest.approx(
        [0.0, math.log(2 + EPS) - math.log(16 + EPS), math.log(EPS) - math.log(16 + EPS)])
    diag = fourier_features(tokens, 0, (4, 4), average="amplitude", profile="diagonal")
    assert diag["delta_log_amplitude"][1].item() == pytest.approx(
        math.log(EPS) - math.log(16 + EPS))  # (1, 1) is empty


def park_reference(tokens: torch.Tensor) -> torch.Tensor:
    """Park et al.'s notebook procedure, written out: drop CLS, [B, C, h, w], log(|FFT| + 1e-6),
    shift frequency 0 to the centre, mean over examples and channels, the half diagonal from the
    centre, minus its first entry."""
    z = tokens[:, 1:]
    b, n, c = z.shape
    side = math.isqrt(n)
    z = z.reshape(b, side, side, c).permute(0, 3, 1, 2)
    f = (torch.fft.fft2(z).abs() + 1e-6).log()
    f = torch.roll(f, shifts=(side // 2, side // 2), dims=(2, 3)).mean(dim=(0, 1))
    half = f.diagonal()[side // 2:]
    return half - half[0]


@pytest.mark.parametrize("side", [5, 6])
def test_diagonal_profile_matches_park_et_al_on_random_tokens(side):
    g = torch.Generator().manual_seed(side)
    tokens = torch.randn(3, 1 + side * side, 7, generator=g, dtype=torch.float64)
    ref = park_reference(tokens)
    got = fourier_features(tokens, 1)["delta_log_amplitude"]  # grid inferred
    # Park et al.'s half diagonal stops below the Nyquist frequency of an even grid.
    assert len(got) == len(ref) + (1 if side % 2 == 0 else 0)
    torch.testing.assert_close(got[: len(ref)], ref, atol=1e-10, rtol=0)


def test_non_square_grids_and_non_token_outputs_are_skipped_with_a_note():
    with pytest.raises(repsim.errors.FeatureError, match="square"):
        fourier_profile(torch.ones(2, 4))
    ev = FourierEvaluator()
    info = {"num_prefix_tokens": 0, "grid_size": (2, 4), "family": "vit"}
    ev.observe("eval", "m", "blocks.0", torch.randn(2, 8, 3), torch.zeros(2), info)
    ev.observe("eval", "m", "blocks.1", torch.randn(2, 3, 4, 4), torch.zeros(2), info)
    out = ev.evaluate(InMemoryContext(models=["m"], model_info={"m": {"family": "vit"}}))
    assert out.tensors == {} and out.tables["high_frequency"][1] == []
    notes = " ".join(out.protocol["notes"])
    assert "square patch grid" in notes and "[B, T, D]" in notes


def test_streaming_over_batches_and_a_resume_equals_the_one_shot_computation():
    g = torch.Generator().manual_seed(0)
    layers = ["blocks.1", "blocks.0", "blocks.0:in"]  # observed out of network order
    tokens = {la: torch.randn(9, 17, 5, generator=g) for la in layers}
    info = {"num_prefix_tokens": 1, "grid_size": (4, 4), "family": "vit"}
    params = FourierParams(average="amplitude", profile="ring")
    first = FourierEvaluator(params)
    for lo, hi in [(0, 2), (2, 6)]:
        for la in layers:
            first.observe("eval", "vit", la, tokens[la][lo:hi], torch.zeros(hi - lo), info)
    resumed = FourierEvaluator(params)
    resumed.load_state(first.state())
    for la in layers:
        resumed.observe("eval", "vit", la, tokens[la][6:], torch.zeros(3), info)
    out = resumed.evaluate(InMemoryContext(models=["vit"]))
    order = ["blocks.0:in", "blocks.0", "blocks.1"]
    assert out.data["layers"] == {"vit": order} and out.data["depth"] == {"vit": [0, 1, 2]}
    for i, la in enumerate(order):
        want = fourier_features(tokens[la], 1, (4, 4), "amplitude", "ring")
        torch.testing.assert_close(out.tensors["delta_log_amplitude/vit"][i],
                                   want["delta_log_amplitude"], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.tensors["spectrum/vit"][i], want["spectrum"], atol=1e-6,
                                   rtol=0)
    assert out.protocol["examples"] == {"vit": 9}
    assert out.figures["fourier_profile"]().axes and out.figures["high_frequency_vs_depth"]().axes


def test_run_writes_fourier_table_and_figures(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(extra='\n[[evaluators]]\nname = "fourier_features"\n')
    run = Run(check_recipe(path), tmp_path / "run", progress=False, quiet=True).execute()
    out = run / "evaluators/fourier_features"
    for f in ("high_frequency.md", "fourier_profile.png", "high_frequency_vs_depth.png",
              "result.json"):
        assert (out / f).is_file(), f
    # Independent tokens: the embedding by hand, the blocks from timm's forward_intermediates.
    r = check_recipe(path).recipe
    ds = registry("dataset").get(r.data.dataset).create({**r.data.params, "split": r.data.split})
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(r.run.seed))
    model = repsim.build_model("timm", **r.models["a"].params)
    x = torch.stack([model.preprocess(ds[i][0]) for i in order[: r.run.examples].tolist()])
    vit = model.module
    with torch.inference_mode():
        embedded = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        blocks = vit.forward_intermediates(x, norm=False, intermediates_only=True,
                                           return_prefix_tokens=True, output_fmt="NLC")
    maps = [embedded] + [torch.cat([prefix, spatial], 1) for spatial, prefix in blocks]
    want = torch.stack([fourier_features(t, 1, (4, 4))["delta_log_amplitude"] for t in maps])
    got = load_file(str(out / "tensors.safetensors"))
    torch.testing.assert_close(got["delta_log_amplitude/a"], want, atol=1e-4, rtol=0)
    result = json.loads((out / "result.json").read_text())
    rows = result["tables"]["high_frequency"]["rows"]
    assert [row[:3] for row in rows[:4]] == [["a", "blocks.0:in", 0], ["a", "blocks.0", 1],
                                             ["a", "blocks.1", 2], ["a", "blocks.2", 3]]
    assert result["protocol"]["examples"] == {"a": 40, "b": 40}
