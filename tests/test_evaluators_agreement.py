"""Kendall's tau of top-k rankings (hand-worked and against scipy) and top-1 F1."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import kendalltau

from repsim.evaluators.agreement import kendall_tau_topk, prediction_agreement, top1_f1


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_worked_full_ranking():
    # A ranks 0>1>2>3>4; B ranks 1>0>2>4>3: 2 discordant pairs of 10 -> (8 - 2) / 10.
    a, b = t([4, 3, 2, 1, 0]), t([3, 4, 2, 0, 1])
    assert kendall_tau_topk(a, b, 5).item() == pytest.approx(0.6)
    # Top-3 of A = {0, 1, 2}: pair (0, 1) discordant, two concordant -> 1/3.
    assert kendall_tau_topk(a, b, 3, "a").item() == pytest.approx(1 / 3)


def test_reference_model_matters():
    # A's top-2 {0, 1}: B orders them 1 > 0 -> -1. B's top-2 {3, 4}: both say 3 > 4 -> +1.
    a, b = t([4, 3, 2, 1, 0]), t([0, 1, 2, 4, 3])
    assert kendall_tau_topk(a, b, 2, "a").item() == -1.0
    assert kendall_tau_topk(a, b, 2, "b").item() == 1.0
    assert kendall_tau_topk(a, b, 2, "symmetric").item() == 0.0


def test_ties_use_tau_b_and_all_tied_is_undefined():
    # B's top-3 {0, 1, 2}; A ties classes 0 and 1: 2 concordant, untied pairs 2 (A) and 3 (B).
    a, b = t([2, 2, 1, 0]), t([3, 2, 1, 0])
    assert kendall_tau_topk(a, b, 3, "b").item() == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau_topk(a, b, 3, "b").item() == pytest.approx(
        kendalltau([2, 2, 1], [3, 2, 1]).statistic)
    # A's top-2 under a three-way tie is {0, 1} (lower index first); A is constant there.
    assert math.isnan(kendall_tau_topk(t([1, 1, 1, 0]), b, 2, "a").item())
    # Symmetric: the undefined side is left out. B's top-2 {2, 3}: both say 2 > 3.
    assert kendall_tau_topk(t([1, 1, 1, 0]), t([0, 1, 3, 2]), 2).item() == 1.0


@pytest.mark.parametrize("k", [2, 5, 10])
@pytest.mark.parametrize("reference", ["a", "b"])
def test_against_scipy(k, reference):
    g = torch.Generator().manual_seed(k)
    a = torch.randn(200, 12, generator=g)
    b = 0.5 * a + torch.randn(200, 12, generator=g)
    a[:50] = a[:50].round()  # ties in some rows
    b[25:75] = (b[25:75] * 2).round()
    ours = kendall_tau_topk(a, b, k, reference)
    ref = a if reference == "a" else b
    for i in range(200):
        idx = torch.sort(ref[i], descending=True, stable=True).indices[:k]
        expected = kendalltau(a[i, idx].numpy(), b[i, idx].numpy()).statistic
        if math.isnan(expected):
            assert math.isnan(ours[i].item())
        else:
            assert ours[i].item() == pytest.approx(expected, abs=1e-12)


def test_symmetric_is_symmetric_and_k_is_capped():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g)
    assert torch.allclose(kendall_tau_topk(a, b, 5), kendall_tau_topk(b, a, 5))
    assert torch.equal(kendall_tau_topk(a, b, 100, "a"), kendall_tau_topk(a, b, 7, "a"))


def test_f1_hand_worked_confusion():
    # Top-1 of A: 0 0 1 1 2; of B: 0 1 1 1 2. Per class 2·both / (|A=c| + |B=c|):
    # class 0: 2·1/(2+1) = 2/3; class 1: 2·2/(2+3) = 4/5; class 2: 2·1/(1+1) = 1.
    classes_a, classes_b = [0, 0, 1, 1, 2], [0, 1, 1, 1, 2]
    a = torch.nn.functional.one_hot(torch.tensor(classes_a), 4).float()
    b = torch.nn.functional.one_hot(torch.tensor(classes_b), 4).float()
    macro = (2 / 3 + 4 / 5 + 1) / 3  # class 3, predicted by neither, is left out
    assert top1_f1(a, b) == pytest.approx(macro)
    assert top1_f1(b, a) == pytest.approx(macro)
    assert top1_f1(a, b, "micro") == pytest.approx(4 / 5)


def test_subsets_by_correctness():
    labels = torch.tensor([0, 1, 2, 1])
    a = torch.tensor([[4., 3, 2, 1], [4, 3, 2, 1], [4, 3, 2, 1], [1, 2, 3, 4]])
    b = torch.tensor([[4., 3, 2, 1], [3, 4, 2, 1], [4, 3, 2, 1], [4, 3, 2, 1]])
    r = prediction_agreement(a, b, labels, ks=(4, 10))
    assert r["ks"] == [4]
    assert r["n"] == {"all": 4, "both_correct": 1, "both_incorrect": 2}
    # Examples: 0 identical (+1, both correct); 1 one swap (4/6 = 2/3, only B correct);
    # 2 identical (+1, both wrong); 3 reversed (-1, both wrong).
    assert r["tau"][4]["all"] == pytest.approx((1 + 2 / 3 + 1 - 1) / 4)
    assert r["tau"][4]["both_correct"] == pytest.approx(1.0)
    assert r["tau"][4]["both_incorrect"] == pytest.approx(0.0)
    assert r["top1_agreement"] == pytest.approx(2 / 4)
