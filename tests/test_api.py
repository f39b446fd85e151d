"""The Python API: similarity, compare, build_model — against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import repsim
from repsim import functional as F
from repsim.errors import FeatureError


def hsic1_reference(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Eq. 4 of the seeds, term by term, in float64."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def minibatch_cka_reference(x: np.ndarray, y: np.ndarray, bs: int) -> float:
    xy = xx = yy = 0.0
    for i in range(0, len(x), bs):
        k, l = x[i:i + bs] @ x[i:i + bs].T, y[i:i + bs] @ y[i:i + bs].T  # noqa: E741
        xy += hsic1_reference(k, l)
        xx += hsic1_reference(k, k)
        yy += hsic1_reference(l, l)
    return xy / np.sqrt(xx * yy)


def test_similarity_all_pairs_equals_reference() -> None:
    g = torch.Generator().manual_seed(0)
    a = {f"a{i}": torch.randn(64, 5 + i, generator=g) for i in range(3)}
    b = {"b0": a["a0"] @ torch.randn(5, 4, generator=g), "b1": torch.randn(64, 2, 3, generator=g)}
    res = repsim.similarity(a, b, metric="minibatch_cka", batch_size=16)
    assert res.values.dtype == torch.float64 and res.values.shape == (3, 2)
    assert res.rows == ["a0", "a1", "a2"] and res.cols == ["b0", "b1"] and res.metric == "minibatch_cka"
    for i, r in enumerate(res.rows):
        for j, c in enumerate(res.cols):
            ref = minibatch_cka_reference(a[r].double().numpy(),
                                          b[c].reshape(64, -1).double().numpy(), 16)
            assert res.values[i, j].item() == pytest.approx(ref, abs=1e-6)
            assert res.values[i, j].item() == pytest.approx(F.minibatch_cka(a[r], b[c], 16),
                                                            abs=1e-12)


def test_short_last_batch_is_used_when_large_enough() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(70, 6, generator=g), torch.randn(70, 4, generator=g)
    ref = minibatch_cka_reference(x.double().numpy(), y.double().numpy(), 32)  # 32, 32, 6
    assert F.minibatch_cka(x, y, 32) == pytest.approx(ref, abs=1e-6)


def test_linear_cka_matches_feature_space_formula() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 7, generator=g), torch.randn(50, 3, generator=g)
    xc, yc = (x - x.mean(0)).double().numpy(), (y - y.mean(0)).double().numpy()
    ref = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert F.linear_cka(x, y) == pytest.approx(ref, abs=1e-6)
    assert F.linear_cka(x, y, debiased=True) == pytest.approx(F.minibatch_cka(x, y, 50), abs=1e-12)


def test_mismatched_n_is_refused() -> None:
    with pytest.raises(FeatureError, match="different numbers of examples"):
        repsim.similarity({"a": torch.randn(10, 3)}, {"b": torch.randn(12, 3)})


def test_compare_streams_and_equals_similarity_on_timm_intermediates() -> None:
    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, depth=3, embed_dim=32, num_heads=2, num_classes=0)
    a = timm.create_model("vit_tiny_patch16_224", **kw)
    b = timm.create_model("vit_tiny_patch16_224", **kw)
    data = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    res = repsim.compare(a, b, data, "blocks.*", "blocks.*", reduce="cls")

    def cls_tokens(model) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            outs = [model.forward_intermediates(x, norm=False, intermediates_only=True,
                                                return_prefix_tokens=True) for x in data]
        return {f"blocks.{i}": torch.cat([o[i][1][:, 0] for o in outs]) for i in range(3)}

    expected = repsim.similarity(cls_tokens(a), cls_tokens(b), batch_size=8)
    torch.testing.assert_close(res.values, expected.values, atol=1e-9, rtol=0)
    assert res.rows == expected.rows


def test_build_model_gives_module_and_preprocess() -> None:
    m = repsim.build_model("timm", arch="resnet18", kwargs={"num_classes": 0})
    assert isinstance(m.module, torch.nn.Module) and not m.module.training
    out = m.preprocess(torch.rand(3, 300, 260))
    assert out.shape == (3, 224, 224)
    assert m.family == "cnn"
