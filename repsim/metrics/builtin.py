"""Built-in metrics, registered through the same hook as a plugin's."""

from __future__ import annotations

from repsim.hookspecs import Register, hookimpl
from repsim.metrics.cka import LinearCKAParams, MinibatchCKAParams


def _minibatch_cka(params: MinibatchCKAParams):
    from repsim.metrics.cka import MinibatchCKA

    return MinibatchCKA(params, "minibatch_cka")


def _linear_cka(params: LinearCKAParams):
    from repsim.metrics.cka import LinearCKA

    return LinearCKA(params, "linear_cka")


@hookimpl
def register_metrics(register: Register) -> None:
    from repsim.metrics.cka import LinearCKA, MinibatchCKA

    register("minibatch_cka", _minibatch_cka, params=MinibatchCKAParams,
             summary="Linear CKA, unbiased HSIC_1 summed over minibatches (the seeds' estimator)",
             **MinibatchCKA.properties.as_info())
    register("linear_cka", _linear_cka, params=LinearCKAParams,
             summary="Linear CKA on all examples (Kornblith et al. 2019); debiased option",
             **LinearCKA.properties.as_info())
