"""Linear and MLP probes: separable → perfect, shuffled → chance, XOR needs the non-linear probe."""

from __future__ import annotations

import pytest
import torch

from repsim.evaluators.probes import (_optimizer, build_probe, holdout_split, linear_probe,
                                      mlp_probe, train_probe)

SMALL = dict(base_lrs=(0.1, 0.01), weight_decays=(0.0, 1e-4, 1e-3), epochs=(30,),
             warmup_epochs=(3,), batch_size=64)


def blobs(n, d=8, c=4, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * sep
    y = torch.randint(0, c, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def xor(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n, 2), generator=g)
    x = (bits * 2 - 1).float() * 2 + 0.3 * torch.randn(n, 2, generator=g)
    return x, bits[:, 0] ^ bits[:, 1]


def test_linearly_separable_is_perfect():
    x, y = blobs(600)
    r = linear_probe(x[:400], y[:400], x[400:], y[400:], **SMALL)
    assert r.mean == 1.0 and r.std == 0.0
    assert len(r.best) == 5 and len(r.runs) == 6
    assert r.protocol["grid"]["base_lr"] == [0.1, 0.01]


def test_shuffled_labels_give_chance():
    # 4 classes, 1000 eval examples: chance 0.25, binomial std ≈ 0.014; tolerance 0.06.
    x, y = blobs(1400, seed=1)
    g = torch.Generator().manual_seed(2)
    y = y[torch.randperm(1400, generator=g)]
    r = linear_probe(x[:400], y[:400], x[400:], y[400:], **SMALL)
    assert r.mean == pytest.approx(0.25, abs=0.06)


def test_xor_needs_the_nonlinear_probe():
    x, y = xor(600)
    lin = linear_probe(x[:400], y[:400], x[400:], y[400:], **SMALL)
    mlp = mlp_probe(x[:400], y[:400], x[400:], y[400:], depth=1, hidden=16, **SMALL)
    assert lin.mean < 0.8  # a line gets at most 3 of the 4 XOR clusters right
    assert mlp.mean > 0.97


def test_selection_never_looks_at_the_eval_labels():
    x, y = blobs(700, sep=1.0, seed=3)  # overlapping classes: runs differ
    test_y = y[500:]
    a = linear_probe(x[:500], y[:500], x[500:], test_y, **SMALL)
    shuffled = test_y[torch.randperm(200, generator=torch.Generator().manual_seed(4))]
    b = linear_probe(x[:500], y[:500], x[500:], shuffled, **SMALL)
    assert a.best == b.best
    assert a.mean != b.mean
    # ... whereas the seeds' protocol ranks by eval accuracy.
    c = linear_probe(x[:500], y[:500], x[500:], test_y, selection="eval", **SMALL)
    assert [c.runs[i]["eval_accuracy"] for i in c.best] == sorted(
        (r["eval_accuracy"] for r in c.runs), reverse=True)[:5]


def test_holdout_split_is_stratified_and_disjoint():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    fit, held = holdout_split(y, 0.1, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(100))
    assert torch.bincount(y[held], minlength=3).tolist() == [5, 3, 2]


def test_probe_architecture_and_optimizer_groups():
    probe = build_probe(12, 5, depth=2, hidden=7)
    kinds = [type(m).__name__ for m in probe]
    assert kinds == ["BatchNorm1d", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d",
                     "ReLU", "Linear"]
    assert not probe[0].affine and probe[2].affine
    opt = _optimizer(probe, "lars", 0.1, 0.05, 0.9)
    weights, others = opt.param_groups
    assert all(p.ndim == 2 for p in weights["params"]) and weights["weight_decay"] == 0.05
    assert weights["always_adapt"] and not others["always_adapt"]
    assert all(p.ndim == 1 for p in others["params"]) and others["weight_decay"] == 0.0


def test_lars_trains():
    # LARS moves each weight by at most lr·trust_coeff of its norm per step, so a few hundred
    # steps need a large base lr (docs/evaluators.md).
    x, y = blobs(300, seed=5)
    r = linear_probe(x[:200], y[:200], x[200:], y[200:], optimizer="lars", base_lrs=(200.0,),
                     weight_decays=(0.0,), epochs=(20,), warmup_epochs=(2,), batch_size=32,
                     top=1)
    assert r.mean == 1.0


def test_seeded_and_leaves_global_rng_alone():
    x, y = blobs(200, seed=6)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_probe(x, y, 4, epochs=3, warmup_epochs=1, seed=9)
    after = torch.rand(1)
    b = train_probe(x, y, 4, epochs=3, warmup_epochs=1, seed=9)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("affine", [True, False])
def test_synced_batchnorm_on_one_rank_is_batchnorm(tmp_path, affine):
    """The statistics over a group of one rank: torch's BatchNorm to float rounding, forward,
    input and parameter gradients, running statistics, and eval mode."""
    import copy

    import torch.distributed as dist

    from repsim.training import SyncedBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        bn = torch.nn.BatchNorm1d(5, affine=affine)
        synced = SyncedBatchNorm(copy.deepcopy(bn), dist.group.WORLD)
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)) * 3 + 2
        for _ in range(3):  # running statistics over several steps
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = bn(xa), synced(xb)
            torch.testing.assert_close(yb, ya)
            (ya * torch.arange(5.0)).sum().backward()
            (yb * torch.arange(5.0)).sum().backward()
            torch.testing.assert_close(xb.grad, xa.grad)
            x = x * 1.1 + 0.3
        for name, value in bn.state_dict().items():
            torch.testing.assert_close(synced.state_dict()[name], value)
        if affine:
            torch.testing.assert_close(synced.weight.grad, bn.weight.grad)
        torch.testing.assert_close(synced.eval()(x), bn.eval()(x))
    finally:
        dist.destroy_process_group()
