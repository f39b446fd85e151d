"""Supervised fine-tuning of any registered model, with the snapshots path efficiency reads.

``repsim finetune RECIPE`` (:mod:`repsim.finetune.plugin`) runs a fine-tuning recipe
(:mod:`repsim.finetune.config`: the model, the data, a preset such as the seeds' ``table5`` and
its overrides) into a run directory; :func:`repsim.finetune.runner.finetune` is the same from
Python. The model entry ``finetuned`` (``params = { run = "..." }``) builds the result, or any of
its snapshots, for a comparison recipe. Importing this package imports no torch.
"""
