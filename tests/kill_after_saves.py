"""Run a recipe and SIGKILL this process right after its N-th state save (tests of resume).

    python tests/kill_after_saves.py RECIPE OUT N
"""

import os
import signal
import sys
from pathlib import Path

from repsim.run import core

saved = {"n": 0}
original = core.save_states


def save_then_die(*args: object) -> None:
    original(*args)
    saved["n"] += 1
    if saved["n"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)


core.save_states = save_then_die
core.run_recipe(sys.argv[1], Path(sys.argv[2]), progress=False, quiet=True)
