"""CKA against relative-depth distance."""

from __future__ import annotations

import math

import pytest
import torch

from repsim.evaluators.context import InMemoryContext
from repsim.evaluators.depth import CkaDepthEvaluator, cka_vs_depth, relative_depth
from repsim.evaluators.params import CkaDepthParams
from repsim.metrics.results import SimilarityResult


def test_relative_depth():
    assert relative_depth(4).tolist() == [0.25, 0.5, 0.75, 1.0]


def test_hand_worked_bins():
    # 2 layers (depths 0.5, 1) against 4 (0.25, 0.5, 0.75, 1): distances
    # row 0: .25 0 .25 .5 ; row 1: .75 .5 .25 0. Two bins: [0, .5) and [.5, 1).
    values = torch.tensor([[0.6, 0.9, 0.7, 0.4], [0.1, 0.3, 0.5, 0.8]])
    c = cka_vs_depth(values, bins=2)
    near = [0.6, 0.9, 0.7, 0.5, 0.8]
    far = [0.4, 0.1, 0.3]
    assert c["count"].tolist() == [5, 3]
    assert c["mean"][0].item() == pytest.approx(sum(near) / 5)
    assert c["mean"][1].item() == pytest.approx(sum(far) / 3)
    far_std = torch.tensor(far).double().std(unbiased=False).item()
    assert c["std"][1].item() == pytest.approx(far_std)
    # Nearest depth: row 0 (0.5) -> column 1 (0.5); row 1 (1.0) -> column 3.
    assert c["matched_col"].tolist() == [1, 3]
    assert c["matched"].tolist() == pytest.approx([0.9, 0.8])


def test_nan_values_and_empty_bins():
    values = torch.tensor([[float("nan"), 1.0]])  # depth 1 against depths (0.5, 1)
    c = cka_vs_depth(values, bins=4)
    assert c["count"].tolist() == [1, 0, 0, 0]  # the NaN pair (distance 0.5) is left out
    assert c["mean"][0].item() == 1.0 and math.isnan(c["mean"][2].item())


def test_evaluator_reads_results_in_either_order_and_restricts_to_a_group():
    vit = [f"blocks.{i}" for i in range(4)] + ["head"]
    cnn = ["layer1", "layer2"]
    values = torch.arange(10, dtype=torch.float64).reshape(5, 2) / 10
    result = SimilarityResult(values, vit, cnn, "minibatch_cka")
    ctx = InMemoryContext(
        similarities={("minibatch_cka", "vit", "cnn"): result},
        models=["cnn", "vit", "other"],
        groups={"vit": {"blocks": vit[:4]}, "cnn": {"blocks": cnn}},
        model_info={"vit": {"family": "vit"}, "cnn": {"family": "cnn"}},
    )
    ev = CkaDepthEvaluator(CkaDepthParams(pairs=[("cnn", "vit"), ("cnn", "other")],
                                          group="blocks", bins=2))
    assert ev.access.similarity
    out = ev.evaluate(ctx)
    expected = cka_vs_depth(values[:4].T, bins=2)  # cnn rows, the vit blocks as columns
    assert torch.equal(out.tensors["by_distance/cnn vs vit"][0], expected["mean"])
    assert out.tables["by_distance"][1][0][2] == "cnn-vit"
    assert any("cnn vs other" in n for n in out.protocol["notes"])
    out.figures["cka_vs_distance"]()
