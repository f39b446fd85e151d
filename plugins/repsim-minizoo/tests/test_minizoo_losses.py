"""Each objective's loss on hand-built inputs whose value is known."""

from __future__ import annotations

import math

import pytest
import torch

from repsim_minizoo.objectives.dino import dino_loss, update_centre
from repsim_minizoo.objectives.mae import mae_loss, patchify
from repsim_minizoo.objectives.mocov3 import infonce
from repsim_minizoo.objectives.msn import msn_loss


@pytest.mark.parametrize("tau", [0.1, 0.2, 1.0])
def test_infonce_of_identical_orthonormal_views(tau: float) -> None:
    n = 8
    q = torch.eye(n, dtype=torch.float64) * 3.0  # norm does not matter: InfoNCE compares directions
    # positive logit 1/τ, n − 1 negatives at 0; MoCo-v3 scales the cross-entropy by 2τ
    expected = 2 * tau * -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + n - 1))
    assert float(infonce(q, q.clone(), tau)) == pytest.approx(expected, rel=1e-5)


def test_infonce_prefers_matching_keys() -> None:
    q = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert infonce(q, q, 0.2) < infonce(q, q.roll(1, 0), 0.2)


def test_mae_loss_zero_for_perfect_reconstruction() -> None:
    target = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert float(mae_loss(norm, target, mask, norm_pix=True)) == pytest.approx(0.0, abs=1e-10)
    assert float(mae_loss(target, target, mask, norm_pix=False)) == 0.0


def test_mae_loss_counts_masked_patches_only() -> None:
    target = torch.zeros(1, 4, 16)
    mask = torch.tensor([[1.0, 1, 0, 0]])  # patches 0 and 1 were hidden from the encoder
    wrong_visible = target.clone()
    wrong_visible[0, 2:] = 5.0  # errors on visible patches: not counted
    assert float(mae_loss(wrong_visible, target, mask, norm_pix=False)) == 0.0
    wrong_masked = target.clone()
    wrong_masked[0, 0] = 2.0  # squared error 4 on one of two masked patches
    assert float(mae_loss(wrong_masked, target, mask, norm_pix=False)) == pytest.approx(2.0)


def test_patchify_matches_the_patch_embedding_order() -> None:
    from timm.layers import PatchEmbed

    embed = PatchEmbed(img_size=8, patch_size=4, in_chans=1, embed_dim=16)
    with torch.no_grad():  # an identity projection: token i = the pixels of patch i
        embed.proj.weight.copy_(torch.eye(16).view(16, 1, 4, 4))
        embed.proj.bias.zero_()
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(embed(x), patchify(x, 4), atol=1e-6)


def test_dino_centre_update_is_an_ema_of_the_teacher_mean() -> None:
    centre = torch.full((1, 3), 1.0)
    t1, t2 = torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([[2.0, 2.0, 0.0]])
    new = update_centre(centre, [t1, t2], momentum=0.9)
    assert torch.allclose(new, 0.9 * centre + 0.1 * torch.tensor([[1.0, 2.0, 2.0]]))


def test_dino_loss_skips_same_view_pairs_and_uses_temperatures() -> None:
    k = 4
    a, b = torch.randn(2, k), torch.randn(2, k)
    centre = torch.randn(1, k)
    loss = dino_loss([a, b], [a, b], centre, student_temp=0.1, teacher_temp=0.05)

    def h(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        p = torch.softmax((t - centre) / 0.05, -1)
        return -(p * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()

    assert float(loss) == pytest.approx(float((h(a, b) + h(b, a)) / 2), rel=1e-5)


def test_msn_loss_is_cross_entropy_minus_mean_entropy() -> None:
    target = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    logits = torch.log(target)  # anchors predict exactly the target: CE = H(target)
    ce = float(-(target * target.log()).sum(-1).mean())
    mean_p = target.mean(0)
    me = float(-(mean_p * mean_p.log()).sum())
    assert float(msn_loss(logits, target, 1.0)) == pytest.approx(ce - me, rel=1e-5)
    # two anchor views per target: the target is repeated for each
    assert float(msn_loss(logits.repeat(2, 1), target, 0.0)) == pytest.approx(ce, rel=1e-5)
