"""An example repsim plugin: registers one metric, ``minibatch_dcor``.

The entry point (``[project.entry-points.repsim]`` in pyproject.toml) names this module; repsim
loads it and calls its hook implementations. Keep this module light: import torch inside the
builder, not here, so ``repsim --help`` stays fast.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from repsim import hookimpl


class DcorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def build_dcor(params: DcorParams):
    from repsim_plugin_example.dcor import MinibatchDistanceCorrelation

    return MinibatchDistanceCorrelation(params, "minibatch_dcor")


@hookimpl
def register_metrics(register) -> None:
    from repsim_plugin_example.dcor import MinibatchDistanceCorrelation

    register("minibatch_dcor", build_dcor, params=DcorParams,
             summary="bias-corrected distance correlation (Székely & Rizzo 2014), over minibatches",
             **MinibatchDistanceCorrelation.properties.as_info())
