"""The shared training loop: it learns, accumulates exactly, resumes bit-identically, loads
checkpoints as data only, and runs bf16 (but not fp16) autocast on the CPU; per-step hooks, timm
schedules and extra state resume with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repsim.errors import CheckpointError, DeviceError
from repsim.training import History, train


def toy(n: int = 256, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two linearly separable classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def shuffled(x: torch.Tensor, y: torch.Tensor, bs: int):
    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), bs):
            yield x[order[i:i + bs]], y[order[i:i + bs]]
    return batches


def net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))


def run(model: nn.Module, epochs: int, **kw: Any) -> History:
    """SGD with momentum and a per-step cosine schedule over 8 epochs of the toy problem."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8 * 8)
    return train(model, shuffled(*toy(), 32), F.cross_entropy, opt, epochs, schedule=sched, **kw)


def test_loss_falls_on_separable_toy():
    x, y = toy()
    model = net()
    hist = run(model, 8, seed=1)
    assert len(hist.loss) == 8 and hist.resumed_at == 0
    assert hist.loss[-1] < 0.3 * hist.loss[0]
    assert (model(x).argmax(1) == y).float().mean() > 0.95


def test_accumulation_equals_one_big_step():
    x, y = toy(64)
    big, small = net(), net()
    for model, bs, k in ((big, 64, 1), (small, 16, 4)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train(model, lambda gen, bs=bs: ((x[i:i + bs], y[i:i + bs]) for i in range(0, 64, bs)),
              F.cross_entropy, opt, 1, accumulate=k)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_short_last_group_steps_with_the_mean_gradient():
    x, y = toy(48)
    big, small = net(), net()
    for model, bs, k, clip in ((big, 48, 1, None), (small, 16, 4, 1e9)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train(model, lambda gen, bs=bs: ((x[i:i + bs], y[i:i + bs]) for i in range(0, 48, bs)),
              F.cross_entropy, opt, 1, accumulate=k, clip_grad_norm=clip)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("interrupt", ["callback", "shorter_run"])
def test_resume_is_bit_identical(tmp_path: Path, interrupt: str):
    # Dropout and clipping: the global RNG and everything else must resume exactly too.
    kw = dict(seed=3, clip_grad_norm=0.5)
    reference = net(dropout=0.2)
    full = run(reference, 4, **kw)

    ckpt = tmp_path / "train.pt"
    if interrupt == "callback":
        def crash(epoch: int, loss: float) -> None:
            if epoch == 3:  # before epoch 3's checkpoint: the resumed run redoes it
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            run(net(dropout=0.2), 4, checkpoint=ckpt, on_epoch=crash, **kw)
    else:
        run(net(dropout=0.2), 2, checkpoint=ckpt, **kw)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    seen: list[int] = []
    resumed = net(seed=9, dropout=0.2)  # another init: the checkpoint replaces it
    hist = run(resumed, 4, checkpoint=ckpt, on_epoch=lambda e, _: seen.append(e), **kw)
    assert hist.resumed_at == 2 and seen == [3, 4]
    assert hist.loss == full.loss
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary behind


def test_caller_rng_untouched():
    model = net(dropout=0.5)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    run(model, 1)
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_loaded_as_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ckpt = tmp_path / "train.pt"
    run(net(), 1, checkpoint=ckpt)
    real_load, flags = torch.load, []

    def load(*args: Any, **kwargs: Any) -> Any:
        flags.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    assert run(net(), 2, checkpoint=ckpt).resumed_at == 1
    assert flags == [True]


def test_bad_checkpoints_are_clear_errors(tmp_path: Path):
    ckpt = tmp_path / "train.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot resume"):
        run(net(), 2, checkpoint=ckpt)
    ckpt.unlink()
    run(net(), 2, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="past the 1 asked for"):
        run(net(), 1, checkpoint=ckpt)


def test_bf16_autocast_on_cpu():
    hist = run(net(), 2, precision="bf16")
    assert all(torch.isfinite(torch.tensor(hist.loss)))


def test_fp16_on_cpu_is_refused():
    with pytest.raises(DeviceError, match="'fp16'.*'bf16' or 'fp32'"):
        run(net(), 1, precision="fp16")


def test_on_step_counts_every_optimizer_step_across_a_resume(tmp_path: Path):
    # A timm scheduler steps by update index (step_update), a torch one by step().
    from timm.scheduler import CosineLRScheduler

    ckpt, seen = tmp_path / "train.pt", []

    def run_timm(epochs: int) -> tuple[History, torch.optim.Optimizer, CosineLRScheduler]:
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        sched = CosineLRScheduler(opt, t_initial=16, warmup_t=4, warmup_lr_init=0.0,
                                  t_in_epochs=False)
        hist = train(model, shuffled(*toy(), 32), F.cross_entropy, opt, epochs,
                     schedule=sched, checkpoint=ckpt, on_step=seen.append)
        return hist, opt, sched

    run_timm(1)
    assert seen == list(range(1, 9))  # 256 examples in batches of 32
    hist, opt, sched = run_timm(2)
    assert seen == list(range(1, 17)) and (hist.steps, hist.resumed_at) == (16, 1)
    assert opt.param_groups[0]["lr"] == pytest.approx(sched._get_lr(16)[0])


class Counter:
    """Extra state a run checkpoints: a number."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def test_extra_state_is_checkpointed_and_a_reader_never_writes(tmp_path: Path):
    ckpt, counter = tmp_path / "train.pt", Counter()

    def bump(steps: int) -> None:
        counter.n += 1

    run(net(), 1, checkpoint=ckpt, on_step=bump, state={"counter": counter})
    restored = Counter()
    run(net(), 2, checkpoint=ckpt, state={"counter": restored}, save_checkpoint=False)
    assert counter.n == 8 and restored.n == 8  # restored from epoch 1's checkpoint
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # not rewritten by the reader
    with pytest.raises(ValueError, match="'loss' is one the loop's checkpoint uses"):
        run(net(), 1, state={"loss": Counter()})
