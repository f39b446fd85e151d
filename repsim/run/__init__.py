"""Running a recipe: plan → batch source → feature pass → sinks → results → evaluators.

One module per stage: :mod:`~repsim.run.plan`, :mod:`~repsim.run.source`,
:mod:`~repsim.run.features`, :mod:`~repsim.run.sinks`, :mod:`~repsim.run.cache`,
:mod:`~repsim.run.results`, :mod:`~repsim.run.evaluate`; :mod:`~repsim.run.core` lists them.
"""

from repsim.run.core import Run, fingerprint, run_recipe

__all__ = ["Run", "fingerprint", "run_recipe"]
