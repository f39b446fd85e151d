"""The entry point, the registered models as the core sees them, and the study evaluator."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch

from repsim.metrics.results import SimilarityResult
from repsim.plugins import registry

ZOO = ["minizoo_dino", "minizoo_dino_ft", "minizoo_mae", "minizoo_mae_ft", "minizoo_mocov3",
       "minizoo_mocov3_ft", "minizoo_msn", "minizoo_msn_ft", "minizoo_supervised",
       "minizoo_untrained"]


def test_registered_through_the_entry_point() -> None:
    assert registry("model").names("minizoo*") == ZOO
    assert "paper_observations" in registry("evaluator")
    assert registry("model").get("minizoo_mae").provider == "repsim-minizoo"


def test_plugin_import_does_not_import_torch() -> None:
    code = ("import sys; from repsim.plugins import registry; registry('model'); "
            "import repsim_minizoo.plugin; print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_untrained_control_fits_the_core_layer_selectors() -> None:
    from repsim.layers import LayerTap

    model = registry("model").get("minizoo_untrained").create({"preset": "tiny"})
    assert (model.family, model.num_prefix_tokens, model.preprocess.channels) == ("vit", 1, 1)
    layers = []
    for sel in ("blocks", "norm1", "attn_qkv", "mlp_fc1"):
        layers += registry("layer_selector").get(sel).create({}).select(model)
    assert "blocks.1.attn.qkv" in layers and "blocks.0.mlp.fc1" in layers
    x = torch.stack([model.preprocess(torch.rand(1, 8, 8)) for _ in range(2)])
    tap = LayerTap(model, layers)
    with tap.attached():
        out = tap.run(x)
    assert out["blocks.0"].shape == (2, 17, 32)  # CLS + 4×4 patches, tiny width 32
    same = registry("model").get("minizoo_untrained").create({"preset": "tiny"})
    assert torch.equal(same.module.pos_embed, model.module.pos_embed)  # the seed fixes it


def test_unknown_preset_is_a_recipe_error() -> None:
    from repsim.errors import RecipeError

    with pytest.raises(RecipeError, match="preset"):
        registry("model").get("minizoo_mae").validate({"preset": "huge"})


class FakeContext:
    """Enough of a finished run for the evaluator: zoo models, CKA results, block features."""

    def __init__(self, roles: list[str], depth: int = 4,
                 constant_layer: str | None = None) -> None:
        self.models = [f"m_{r}" for r in roles]
        self.constant_layer = constant_layer  # its CKA is undefined (NaN)
        self.seed = 0
        types = {"blocks": "", "norm1": ".norm1", "attn_qkv": ".attn.qkv", "mlp_fc1": ".mlp.fc1"}
        self._groups = {g: [f"blocks.{i}{s}" for i in range(depth)] for g, s in types.items()}
        g = torch.Generator().manual_seed(0)
        self._labels = {"train": torch.arange(60) % 3, "eval": torch.arange(30) % 3}
        self._feats = {(m, layer, split, r): torch.randn(len(y), 8, generator=g)
                       + 2 * torch.nn.functional.one_hot(y, 8).float()
                       for m in self.models for layer in self.layers(m)
                       for split, y in self._labels.items() for r in ("cls", "gap", "gap_no_cls")}

    def layers(self, model: str) -> list[str]:
        return [x for names in self._groups.values() for x in names]

    def groups(self, model: str) -> dict[str, list[str]]:
        return self._groups

    def features(self, model: str, layer: str, split: str = "eval",
                 reduction: str | None = None) -> torch.Tensor:
        return self._feats[(model, layer, split, reduction or "cls")]

    def labels(self, split: str = "eval") -> torch.Tensor:
        return self._labels[split]

    def similarity(self, metric: str, a: str, b: str) -> SimilarityResult:
        layers = self.layers(a)
        je = ("mocov3", "dino", "msn")
        close = all(any(j in m for j in je) for m in (a, b))
        values = torch.full((len(layers), len(layers)), 0.9 if close else 0.4, dtype=torch.float64)
        if self.constant_layer:
            values[layers.index(self.constant_layer)] = float("nan")
            values[:, layers.index(self.constant_layer)] = float("nan")
        return SimilarityResult(values, layers, layers, metric)

    def model_info(self, model: str) -> dict[str, Any]:
        role = model.removeprefix("m_")
        prov = {"path_efficiency": {"attention": 0.5 if role == "mae_ft" else 0.3}}
        return {"model": f"minizoo_{role}", "provenance": prov}

    def classes(self) -> list[str]:
        return ["a", "b", "c"]


def _evaluate(ctx: FakeContext) -> Any:
    ev = registry("evaluator").get("paper_observations").create({})
    assert ev.access.similarity and set(ev.needs.splits) == {"eval", "train"}
    return ev.evaluate(ctx)


def test_paper_observations_report_with_every_model() -> None:
    res = _evaluate(FakeContext(["mocov3", "dino", "msn", "mae", "mae_ft", "mocov3_ft",
                                 "supervised", "untrained"]))
    report = res.data["report_md"]
    assert report.startswith("# The papers' observations in miniature")
    verdicts = [o["verdict"] for o in res.data["observations"]]
    assert len(verdicts) == 5 and "not measured" not in verdicts
    assert verdicts[0] == "holds"  # JE–JE 0.9 above JE–MAE 0.4 in the fake results
    # every layer type at 0.4: observation 2 fails, with its reason measured against the control
    assert verdicts[1] == "does not hold"
    assert "Most likely reason, measured" in report and "norm1 0.400" in report
    assert "0.900" in report and "0.400" in report
    assert {"observations", "cka_pairs", "cka_by_layer_type", "knn", "finetuning",
            "path_efficiency"} <= res.tables.keys()
    headers, rows = res.tables["knn"]
    assert headers[:2] == ["model", "reduction"] and len(rows) == 8 * 3
    assert all(0 <= v <= 1 for row in rows for v in row[2:])


def test_paper_observations_say_what_is_missing() -> None:
    res = _evaluate(FakeContext(["mocov3", "supervised"]))
    assert [o["verdict"] for o in res.data["observations"]] == ["not measured"] * 5
    assert "Not measured" in res.data["report_md"]


def test_undefined_cka_values_are_left_out_and_said() -> None:
    res = _evaluate(FakeContext(["mocov3", "dino", "mae"], constant_layer="blocks.0.norm1"))
    by_type = {row[0]: row[1] for row in res.tables["cka_by_layer_type"][1]}
    assert by_type["norm1"] == pytest.approx(0.4)  # the mean of the three defined blocks
    # norm1 of mocov3–mae, dino–mae (JE–MAE) and mocov3–dino (JE–JE)
    assert res.data["undefined_cka_values_left_out"] == 3
    assert "undefined CKA values" in res.data["report_md"] and "nan" not in res.data["report_md"]


class BootstrapContext(FakeContext):
    """CKA results with per-minibatch terms: each pair's value is the mean of its batches'
    (self terms of 1), JE–JE batches drawn around ``je`` and JE–MAE around ``mae``."""

    def __init__(self, je: float, mae: float, spread: float, batches: int = 12) -> None:
        super().__init__(["mocov3", "dino", "msn", "mae"], depth=2)
        self.je, self.mae, self.spread, self.batches = je, mae, spread, batches

    def similarity(self, metric: str, a: str, b: str) -> SimilarityResult:
        from repsim.metrics.base import PairTerms

        layers = self.layers(a)
        n, big = len(layers), ("mae" not in a and "mae" not in b)
        centre = self.je if big else self.mae
        g = torch.Generator().manual_seed(sum(map(ord, a + b)))  # fixed per pair
        noise = self.spread * (2 * torch.rand(self.batches, generator=g) - 1)
        cross = (centre + noise).double()[:, None, None].expand(self.batches, n, n).clone()
        ones = torch.ones(self.batches, n, dtype=torch.float64)
        terms = PairTerms(cross.sum(0), ones.sum(0), ones.sum(0), self.batches, 32 * self.batches,
                          [cross], [ones], [ones])
        return SimilarityResult(cross.mean(0), layers, layers, metric, terms=terms)


def test_observation_margins_carry_bootstrap_intervals() -> None:
    clear = _evaluate(BootstrapContext(je=0.9, mae=0.4, spread=0.05))
    first = clear.data["observations"][0]
    assert first["verdict"] == "holds" and "bootstrap interval" in first["measured"]
    # the margin is lowest JE–JE − highest JE–MAE, about 0.5 with tight minibatch noise
    lo, hi = (float(x) for x in first["measured"].split("interval ")[1].rstrip(")").split(" … "))
    assert 0.35 < lo < hi < 0.6
    # a difference smaller than the minibatch noise is not read as holding, nor as failing
    noisy = _evaluate(BootstrapContext(je=0.5, mae=0.4, spread=0.6))
    assert noisy.data["observations"][0]["verdict"] == "not resolved"
    reversed_ = _evaluate(BootstrapContext(je=0.3, mae=0.8, spread=0.05))
    assert reversed_.data["observations"][0]["verdict"] == "does not hold"


def test_without_per_minibatch_terms_the_sign_decides_and_says_so() -> None:
    res = _evaluate(FakeContext(["mocov3", "dino", "mae"]))
    first = res.data["observations"][0]
    assert first["verdict"] == "holds" and "no interval: set run.bootstrap" in first["measured"]
