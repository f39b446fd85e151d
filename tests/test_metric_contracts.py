"""The contract suite of ``repsim.testing`` on every registered metric (built-in or plugin), with
default parameters, plus the parameter settings that change a metric's declared facts."""

from __future__ import annotations

import pytest

from repsim.plugins import registry
from repsim.testing import MetricContract, check_metric

VARIANTS: list[tuple[str, dict]] = [(name, {}) for name in registry("metric").names()] + [
    ("linear_cka", {"debiased": True}),
    ("rbf_cka", {"debiased": True}),
    ("rbf_cka", {"threshold": 0.5}),
    ("cca", {"r2": True}),
    ("svcca", {"keep": 1.0}),
    ("procrustes", {"distance": True}),
    ("mutual_knn", {"k": 3}),
]


def _class_name(name: str, params: dict) -> str:
    suffix = "".join(f"_{k}_{v}" for k, v in params.items()).replace(".", "p")
    return f"TestContract_{name}{suffix}"


for _name, _params in VARIANTS:
    _cls = type(_class_name(_name, _params), (MetricContract,),
                {"metric": _name, "params": _params})
    globals()[_cls.__name__] = _cls


@pytest.mark.parametrize("name", registry("metric").names())
def test_check_metric_runs_on_fixed_seeds(name: str) -> None:
    check_metric(name, seeds=2)


def test_contract_catches_a_false_declaration() -> None:
    """A metric that declares an invariance it lacks must fail the suite (the suite can fail)."""
    from dataclasses import replace

    from repsim.metrics.knn import MutualKNN

    liar = MutualKNN(name="liar")
    liar.properties = replace(liar.properties, invariances=("translation",))
    with pytest.raises(AssertionError, match="translation"):
        check_metric(liar, seeds=1)
