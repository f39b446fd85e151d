"""``python -m repsim``: the command line (as torchrun launches it: ``-m repsim run ...``)."""

from repsim.cli import main

main()
