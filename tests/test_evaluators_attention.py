"""Attention distance and collapse: known maps, Park et al.'s reference, streaming, a run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import repsim
from repsim.evaluators.attention import (AttentionCollapseEvaluator, AttentionDistanceEvaluator,
                                         attention_collapse, attention_distance, attention_nmi,
                                         layer_depth)
from repsim.evaluators.context import InMemoryContext
from repsim.evaluators.params import AttentionDistanceParams
from repsim.plugins import registry
from repsim.recipe import check_recipe
from repsim.run import Run


def with_prefix(spatial: torch.Tensor, prefix_mass: float = 0.3) -> torch.Tensor:
    """``[B, H, Q, Q]`` spatial attention → ``[B, H, 1 + Q, 1 + Q]`` with one CLS token taking
    ``prefix_mass`` of every row (CLS's own row is arbitrary: it is never a query)."""
    b, h, q, _ = spatial.shape
    out = torch.zeros(b, h, q + 1, q + 1, dtype=torch.float64)
    out[..., 1:, 1:] = spatial * (1 - prefix_mass)
    out[..., 1:, 0] = prefix_mass
    out[..., 0, :] = 1 / (q + 1)
    return out


def shift_map(h: int, w: int) -> torch.Tensor:
    """Every patch attends to its right neighbour, wrapping around the row."""
    a = torch.zeros(h * w, h * w, dtype=torch.float64)
    for y, x in itertools.product(range(h), range(w)):
        a[y * w + x, y * w + (x + 1) % w] = 1
    return a


def mean_grid_distance(h: int, w: int) -> float:
    cells = list(itertools.product(range(h), range(w)))
    return sum(math.dist(p, q) for p in cells for q in cells) / len(cells) ** 2


@pytest.mark.parametrize(("h", "w", "expected"), [
    (1, 2, 0.5), (2, 2, (2 + math.sqrt(2)) / 4), (3, 3, mean_grid_distance(3, 3)),
    (2, 3, mean_grid_distance(2, 3)),
])
def test_uniform_attention_has_the_mean_grid_distance_and_is_fully_collapsed(h, w, expected):
    q = h * w
    attn = with_prefix(torch.full((2, 3, q, q), 1 / q, dtype=torch.float64))
    dist = attention_distance(attn, num_prefix_tokens=1, grid_size=(h, w))
    assert dist.shape == (2, 3)
    torch.testing.assert_close(dist, torch.full((2, 3), expected, dtype=torch.float64))
    c = attention_collapse(attn, num_prefix_tokens=1, grid_size=(h, w))
    torch.testing.assert_close(c["nmi"], torch.zeros(2, 3, dtype=torch.float64), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(c["query_similarity"], torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(c["head_similarity"], torch.ones(2, dtype=torch.float64))


def test_attention_to_self_has_distance_zero_and_maximal_nmi():
    q = 9
    attn = with_prefix(torch.eye(q, dtype=torch.float64).expand(2, 2, q, q))
    assert attention_distance(attn, 1, (3, 3)).abs().max() == 0
    c = attention_collapse(attn, 1, (3, 3))
    torch.testing.assert_close(c["nmi"], torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(c["query_similarity"], torch.zeros(2, 2, dtype=torch.float64))


def test_shifted_attention_known_distance_and_nmi():
    # 3x3 grid, right neighbour with wrap-around: six queries at distance 1, three at 2.
    attn = shift_map(3, 3)[None, None]
    assert attention_distance(attn, 0, (3, 3)).item() == pytest.approx(4 / 3)
    assert attention_nmi(attn, 0, (3, 3)).item() == pytest.approx(1.0)  # a permutation


def test_hand_worked_nmi_and_query_similarity():
    # Two patches (1x2 grid): query 0 attends to key 0, query 1 half and half.
    attn = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]], dtype=torch.float64)
    joint = np.array([[0.5, 0.0], [0.25, 0.25]])  # p(q, k) = p(q) p(k | q), p(q) = 1/2
    pq, pk = joint.sum(1), joint.sum(0)
    mi = sum(joint[i, j] * math.log(joint[i, j] / (pq[i] * pk[j]))
             for i in range(2) for j in range(2) if joint[i, j] > 0)
    hq, hk = -(pq * np.log(pq)).sum(), -(pk * np.log(pk)).sum()
    c = attention_collapse(attn, 0, (1, 2))
    assert c["nmi"].item() == pytest.approx(mi / math.sqrt(hq * hk))
    assert c["query_similarity"].item() == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(c["head_similarity"].item())  # one head: no pair of heads


def test_head_similarity_of_identical_and_disjoint_heads():
    same = torch.eye(4, dtype=torch.float64).expand(1, 3, 4, 4)
    assert attention_collapse(same, 0, (2, 2))["head_similarity"].item() == pytest.approx(1.0)
    disjoint = torch.stack([torch.eye(4, dtype=torch.float64), shift_map(2, 2)])[None]
    assert attention_collapse(disjoint, 0, (2, 2))["head_similarity"].item() == pytest.approx(0.0)


def test_rows_with_all_mass_on_prefix_tokens_become_uniform():
    attn = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    attn[..., 0] = 1.0  # every query attends only to CLS
    dist = attention_distance(attn, 1, (2, 2))
    assert dist.item() == pytest.approx((2 + math.sqrt(2)) / 4)


def park_reference(attn: np.ndarray, patch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Park et al.'s notebook procedure, written out with loops: drop CLS, add a tiny constant,
    renormalise; distance per token averaged over queries; NMI with uniform p(q). ``[B, H]``."""
    a = attn[:, :, 1:, 1:]
    n = a.shape[-1]
    side = int(math.isqrt(n))
    dmat = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            dmat[i, j] = patch_size * math.hypot(i // side - j // side, i % side - j % side)
    a_d = a + 1e-32
    a_d = a_d / a_d.sum(-1, keepdims=True)
    dist = (a_d * dmat).sum(-1).mean(-1)
    a_n = a + 1e-8
    a_n = a_n / a_n.sum(-1, keepdims=True)
    pq = np.full(n, 1 / n)
    pk = (a_n * pq[:, None]).sum(-2)
    mi = (a_n * pq[:, None] * np.log(a_n / pk[..., None, :])).sum((-1, -2))
    eq = -(pq * np.log(pq)).sum()
    ek = -(pk * np.log(pk)).sum(-1)
    return dist, mi / np.sqrt(eq * ek)


def test_matches_park_et_al_on_random_attention():
    g = torch.Generator().manual_seed(0)
    attn = (torch.randn(3, 4, 37, 37, generator=g, dtype=torch.float64) * 10).softmax(-1)
    ref_dist, ref_nmi = park_reference(attn.numpy(), patch_size=16)
    got = attention_distance(attn, 1) * 16  # the grid is inferred: 36 patches, 6x6
    np.testing.assert_allclose(got.numpy(), ref_dist, rtol=1e-9)
    np.testing.assert_allclose(attention_nmi(attn, 1, eps=1e-8).numpy(), ref_nmi, rtol=1e-9)
    # Without their smoothing the peaked maps' NMI is the exact one, measurably different.
    assert np.abs(attention_nmi(attn, 1).numpy() - ref_nmi).max() > 1e-4


def random_maps(n: int, heads: int = 2, tokens: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, heads, tokens, tokens, generator=g) * 2).softmax(-1)


INFO = {"num_prefix_tokens": 1, "family": "vit", "grid_size": (3, 3)}
LAYERS = [f"blocks.{i}.attn.attn_drop:in" for i in (10, 2, 0)]  # out of order on purpose


def test_streaming_over_batches_and_a_resume_equals_the_one_shot_computation():
    maps = {la: random_maps(10, seed=i) for i, la in enumerate(LAYERS)}
    labels = torch.zeros(10, dtype=torch.long)
    first = AttentionCollapseEvaluator()
    dist = AttentionDistanceEvaluator(AttentionDistanceParams(unit="pixels"))
    for lo, hi in [(0, 3), (3, 8)]:
        for la in LAYERS:
            for ev in (first, dist):
                ev.observe("eval", "vit", la, maps[la][lo:hi], labels[lo:hi], INFO)
    resumed = AttentionCollapseEvaluator()
    resumed.load_state(first.state())  # as the run does after an interruption
    for la in LAYERS:
        resumed.observe("eval", "vit", la, maps[la][8:], labels[8:], INFO)
        dist.observe("eval", "vit", la, maps[la][8:], labels[8:], INFO)
        dist.observe("train", "vit", la, maps[la], labels, INFO)  # another split: ignored
    ctx = InMemoryContext(models=["vit", "cnn"], model_info={
        "vit": {"family": "vit", "patch_size": 16}, "cnn": {"family": "cnn"}})
    out = resumed.evaluate(ctx)
    order = sorted(LAYERS, key=lambda la: int(la.split(".")[1]))
    assert out.protocol["layers"]["vit"] == order and out.protocol["examples"] == {"vit": 10}
    expected = [attention_collapse(maps[la], 1, (3, 3)) for la in order]
    for stat in ("nmi", "query_similarity", "head_similarity"):
        want = torch.stack([e[stat].double().mean(0) for e in expected])
        torch.testing.assert_close(out.tensors[f"{stat}/vit"], want, atol=1e-6, rtol=0)
    assert any("cnn: skipped" in n and "'cnn'" in n for n in out.protocol["notes"])
    assert [r[2] for r in out.tables["per_block"][1]] == [1, 3, 11]  # depth = block + 1
    d = dist.evaluate(ctx)
    want = torch.stack([attention_distance(maps[la], 1, (3, 3)).double().mean(0)
                        for la in order]) * 16
    torch.testing.assert_close(d.tensors["distance/vit"], want, atol=1e-5, rtol=0)
    assert d.data["unit"] == {"vit": "pixels"} and d.protocol["examples"] == {"vit": 10}
    assert d.figures["attention_distance"]().axes and out.figures["attention_collapse"]().axes


def test_outputs_that_are_not_attention_maps_are_skipped_with_a_note():
    ev = AttentionDistanceEvaluator()
    ev.observe("eval", "m", "x", torch.rand(2, 3, 4, 5), torch.zeros(2), INFO)
    ev.observe("eval", "m", "y", random_maps(2, tokens=9), torch.zeros(2), INFO)  # 8 != 3x3
    out = ev.evaluate(InMemoryContext(models=["m"], model_info={"m": {"family": "vit"}}))
    assert out.tensors == {} and len(out.protocol["notes"]) == 3
    assert "8 patches" in " ".join(out.protocol["notes"])


def test_layer_depth():
    assert layer_depth("blocks.0.attn.attn_drop:in", 7) == 1
    assert layer_depth("blocks.0:in", 1) == 0 and layer_depth("blocks.11", 3) == 12
    assert layer_depth("stages.2", 3) == 3


def independent_attention(recipe: Path, label: str) -> list[torch.Tensor]:
    """Post-softmax attention of every block, recomputed from each block's attention input with
    the q/k projections (no hook on the attention maps, fused attention left as it is)."""
    r = check_recipe(recipe).recipe
    ds = registry("dataset").get(r.data.dataset).create(
        {**r.data.params, "split": r.data.split})
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(r.run.seed))
    model = repsim.build_model(r.models[label].model, **r.models[label].params)
    x = torch.stack([model.preprocess(ds[i][0]) for i in order[: r.run.examples].tolist()])
    inputs: dict[int, torch.Tensor] = {}
    blocks = model.module.blocks
    hooks = [b.attn.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.__setitem__(i, args[0])) for i, b in enumerate(blocks)]
    with torch.inference_mode():
        model.module(x)
        maps = []
        for i, b in enumerate(blocks):
            a, (n, t, _) = b.attn, inputs[i].shape
            qkv = a.qkv(inputs[i]).reshape(n, t, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
            maps.append(((q * a.scale) @ k.transpose(-2, -1)).softmax(-1))
    for h in hooks:
        h.remove()
    return maps


def sharp_checkpoint(recipe: Path, label: str, out: Path) -> Path:
    """Weights of a recipe's tiny ViT with q/k and position embeddings scaled up, so attention is
    far from the near-uniform maps of a fresh initialisation and differs between heads."""
    r = check_recipe(recipe).recipe
    state = repsim.build_model(r.models[label].model, **r.models[label].params).module.state_dict()
    for key, w in state.items():
        if key.endswith("attn.qkv.weight"):
            w[: 2 * w.shape[1]] *= 25  # the q and k rows
    state["pos_embed"] *= 50
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def test_run_writes_attention_tables_and_figures(write_recipe, tmp_path: Path) -> None:
    extra = ('\n[[evaluators]]\nname = "attention_distance"\nparams = { unit = "pixels" }\n'
             '\n[[evaluators]]\nname = "attention_collapse"\nparams = { indices = [0, 2] }\n')
    path = write_recipe(extra=extra)
    ckpt = sharp_checkpoint(path, "b", tmp_path / "sharp.safetensors")
    text = path.read_text().replace("seed = 1,", f'seed = 1, checkpoint = "{ckpt}",')
    path.write_text(text)
    run = Run(check_recipe(path), tmp_path / "run", progress=False, quiet=True).execute()
    dist_dir = run / "evaluators/attention_distance"
    coll_dir = run / "evaluators/attention_collapse"
    for f in ("per_block.md", "per_head.md", "attention_distance.png", "result.json"):
        assert (dist_dir / f).is_file(), f
    for f in ("per_block.md", "per_head.md", "attention_collapse.png"):
        assert (coll_dir / f).is_file(), f
    maps = independent_attention(path, "b")
    got = load_file(str(dist_dir / "tensors.safetensors"))
    want = torch.stack([attention_distance(m, 1, (4, 4)).double().mean(0) for m in maps]) * 4
    torch.testing.assert_close(got["distance/b"], want, atol=1e-5, rtol=0)  # patch size 4 px
    coll = load_file(str(coll_dir / "tensors.safetensors"))
    want = torch.stack([attention_nmi(maps[i], 1, (4, 4)).double().mean(0) for i in (0, 2)])
    assert want.min() > 0.3  # far from collapse: the comparison can tell maps apart
    torch.testing.assert_close(coll["nmi/b"], want, atol=1e-5, rtol=0)
    result = json.loads((coll_dir / "result.json").read_text())
    assert result["protocol"]["examples"] == {"a": 40, "b": 40}
    assert [r[2] for r in result["tables"]["per_block"]["rows"][:2]] == [1, 3]
