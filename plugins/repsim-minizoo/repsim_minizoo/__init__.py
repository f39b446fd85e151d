"""repsim-minizoo: tiny ViTs trained on the CPU with MoCo-v3, DINO, MAE, MSN and supervision.

Importing this package imports nothing heavy; the entry point is :mod:`repsim_minizoo.plugin`.
"""

__version__ = "0.1.0"
