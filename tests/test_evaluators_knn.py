"""k-NN (DINO protocol) against an independent float64 implementation and known answers."""

from __future__ import annotations

import math

import pytest
import torch

from repsim.errors import FeatureError
from repsim.evaluators.knn import _blocks, _topk, knn_accuracy, knn_neighbours, knn_predict


def reference_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """Straightforward float64 DINO k-NN: full similarity matrix, one-hot weighted votes."""
    tr = train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    te = test_x.double() / test_x.double().norm(dim=1, keepdim=True)
    sim = te @ tr.T
    top_sim, top_idx = sim.topk(k, dim=1)
    one_hot = torch.nn.functional.one_hot(train_y[top_idx], num_classes).double()  # [q, k, C]
    votes = (one_hot * torch.exp(top_sim / temperature)[:, :, None]).sum(1)
    return votes.argmax(1)


def gaussian_classes(n, d, c, sep, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * sep
    y = torch.randint(0, c, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("seed,k,temperature", [(0, 20, 0.07), (1, 5, 0.07), (2, 1, 0.5),
                                                (3, 50, 0.02)])
def test_matches_float64_reference(seed, k, temperature):
    x, y = gaussian_classes(900, 24, 7, sep=0.4, seed=seed)  # overlapping classes: errors occur
    train_x, train_y, test_x = x[:600], y[:600], x[600:]
    ours = knn_predict(train_x, train_y, test_x, k, temperature, num_classes=7)
    ref = reference_knn(train_x, train_y, test_x, k, temperature, 7)
    assert torch.equal(ours, ref)
    acc = knn_accuracy(train_x, train_y, test_x, y[600:], k, temperature)
    assert acc == pytest.approx(float((ref == y[600:]).double().mean()), abs=0)
    assert 0.2 < acc < 1.0  # the comparison is not trivially all-correct


def tied_features(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows of ±1 in 16-d: after L2 normalisation ±0.25, so every cosine is a multiple of 1/8,
    computed exactly in any order; 17 possible values, so most similarities tie."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1


def reference_neighbours(train_x, test_x, k):
    """Top-k by (similarity descending, index ascending) from the full float64 matrix."""
    sim = (test_x.double() / 4) @ (train_x.double() / 4).T  # exact for tied_features
    order = torch.tensor([sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], j))[:k]
                          for i in range(sim.shape[0])])
    return sim.gather(1, order), order


@pytest.mark.parametrize("memory_mb", [256.0, 0.0005])
def test_tied_neighbours_are_the_lowest_indices(memory_mb):
    train_x, test_x = tied_features(300, seed=1), tied_features(40, seed=2)
    for k in (1, 7, 20):
        sims, idx = knn_neighbours(train_x, test_x, k, memory_mb=memory_mb)
        ref_sims, ref_idx = reference_neighbours(train_x, test_x, k)
        assert torch.equal(idx, ref_idx)
        assert torch.equal(sims.double(), ref_sims)
    assert (ref_sims[:, :-1] == ref_sims[:, 1:]).any()  # ties inside the lists as well


def test_neighbour_indices_follow_the_given_index():
    train_x, test_x = tied_features(50, seed=3), tied_features(9, seed=4)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(5))
    # the same rows given in another order, with their indices: the same neighbours
    base = knn_neighbours(train_x, test_x, 5)
    shuffled = knn_neighbours(train_x[perm], test_x, 5, index=perm)
    assert torch.equal(base[1], shuffled[1]) and torch.equal(base[0], shuffled[0])


def test_topk_takes_the_lowest_columns_at_a_tie():
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    vals, cols = _topk(sim, 2)
    assert sorted(cols[0].tolist()) == [0, 1] and sorted(cols[1].tolist()) == [0, 1]
    assert torch.equal(vals, torch.tensor([[0.9, 0.5], [0.2, 0.2]]))


def test_blocked_equals_unblocked():
    x, y = gaussian_classes(1500, 16, 5, sep=0.5, seed=4)
    full = knn_predict(x[:1000], y[:1000], x[1000:], 20, 0.07, num_classes=5)
    # 0.01 MB: 2621 similarities per block, so the training set is cut and top-k lists merged.
    assert _blocks(500, 1000, 20, 0.01)[1] < 1000
    blocked = knn_predict(x[:1000], y[:1000], x[1000:], 20, 0.07, num_classes=5, memory_mb=0.01)
    assert torch.equal(full, blocked)


def test_votes_are_weighted_by_exp_similarity():
    # Two class-0 neighbours at cosine 0.5 lose to one class-1 neighbour at cosine 0.9 with
    # T = 0.07 (2·e^{0.5/0.07} ≈ 2.5e3 < e^{0.9/0.07} ≈ 3.8e5); a plain majority vote says 0.
    angle = lambda c: [math.cos(math.acos(c)), math.sin(math.acos(c))]  # noqa: E731
    train_x = torch.tensor([angle(0.5), [0.5, -math.sqrt(0.75)], angle(0.9)])
    train_y = torch.tensor([0, 0, 1])
    test_x = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train_x, train_y, test_x, k=3, temperature=0.07).tolist() == [1]
    # A very high temperature makes the weights nearly equal: the majority wins.
    assert knn_predict(train_x, train_y, test_x, k=3, temperature=1e3).tolist() == [0]


def test_separable_data_is_perfect():
    x, y = gaussian_classes(1200, 32, 10, sep=10.0, seed=5)
    assert knn_accuracy(x[:1000], y[:1000], x[1000:], y[1000:]) == 1.0


def test_random_labels_give_chance():
    # 5 classes, 4000 queries: chance 0.2 with binomial std sqrt(0.2·0.8/4000) ≈ 0.0063;
    # tolerance 0.03 is more than 4.5 std.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6000, 16, generator=g)
    y = torch.randint(0, 5, (6000,), generator=g)
    assert knn_accuracy(x[:2000], y[:2000], x[2000:], y[2000:]) == pytest.approx(0.2, abs=0.03)


def test_scale_invariance_per_example():
    x, y = gaussian_classes(500, 8, 4, sep=0.5, seed=7)
    scale = torch.rand(500, 1, generator=torch.Generator().manual_seed(8)) * 10 + 0.1
    a = knn_predict(x[:400], y[:400], x[400:], num_classes=4)
    b = knn_predict(x[:400] * scale[:400], y[:400], x[400:] * scale[400:], num_classes=4)
    assert torch.equal(a, b)


def test_too_few_training_examples():
    with pytest.raises(FeatureError, match="k = 20"):
        knn_predict(torch.randn(10, 4), torch.zeros(10, dtype=torch.long), torch.randn(3, 4))


@pytest.mark.slow
def test_large_blocked_run_matches_reference():
    # 20 000 × 2 000 × 128-d with a 1 MB budget: 64-query blocks over 4 096-example train slices.
    x, y = gaussian_classes(22_000, 128, 50, sep=0.15, seed=9)
    train_x, train_y, test_x = x[:20_000], y[:20_000], x[20_000:]
    ours = knn_predict(train_x, train_y, test_x, num_classes=50, memory_mb=1.0)
    ref = torch.cat([reference_knn(train_x, train_y, test_x[i:i + 250], 20, 0.07, 50)
                     for i in range(0, 2000, 250)])
    assert (ours == ref).double().mean().item() >= 0.999  # float32 vs float64 near-ties
