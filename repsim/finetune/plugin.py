"""The ``finetuned`` model entry and the ``repsim finetune RECIPE`` command (a core plugin).

Fine-tuning is its own command, not a section of a comparison recipe: it is hours of GPU work
with its own resume cycle, every process of a ``torchrun`` trains, and its product (a run
directory) is named by any number of comparison recipes, which stay quick to rerun and resume on
another device. No torch here: building a part or running the command imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from repsim.cli import check_run_dir, progress_messages, user_errors
from repsim.finetune.config import FinetunedParams
from repsim.hookspecs import Register, hookimpl


def finetune_recipe(path: str | Path, out: Path | None = None,
                    overrides: dict[str, Any] | None = None, progress: bool = False) -> Path:
    """Run a fine-tuning recipe file (every process of a distributed launch calls this);
    ``overrides`` replace [run] settings. Returns the run directory."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from repsim.errors import DeviceError
    from repsim.finetune.config import dataset_params, load_finetune_recipe
    from repsim.finetune.runner import Compute, finetune
    from repsim.plugins import build_part, registry
    from repsim.run.device import DeviceSettings, configured
    from repsim.run.distributed import process_group, world_from_env

    recipe = load_finetune_recipe(path, overrides)
    out = out or recipe.finetune.output
    world = world_from_env()
    r = recipe.run
    device = DeviceSettings.from_run(
        SimpleNamespace(device=r.device, precision=r.precision, tf32=r.tf32, threads=r.threads,
                        cache_dtype="float32"), world.local_rank, world.local_size)
    if device.device.type == "cuda":  # NCCL's collectives use the current device: make it
        if device.device.index is not None:  # this process's GPU, named by its index
            torch.cuda.set_device(device.device)
        device = dataclasses.replace(device, device=torch.device("cuda",
                                                                 torch.cuda.current_device()))
    with process_group(world, device.device), configured(device):
        d = recipe.data
        params = dataset_params(d, registry("dataset").get(d.dataset).params.model_fields)
        data = build_part("dataset", d.dataset, **params)
        eval_data = data.with_split(d.eval_split) if d.eval_split else None
        loaded = build_part("model", recipe.model.model, **recipe.model.params)
        compute = Compute(device, r.device_batch, r.num_workers, world)
        try:
            finetune(loaded, data, recipe.finetune.settings(), out, source=recipe.source(),
                     examples=d.examples, eval_data=eval_data, compute=compute,
                     recipe_text=Path(path).read_text(encoding="utf-8"), progress=progress)
        except torch.OutOfMemoryError:
            raise DeviceError(
                f"device '{device.device}' ran out of memory fine-tuning "
                f"'{recipe.model.model}' ({r.device_batch or 'all'} examples per forward, "
                f"precision {r.precision}). Lower run.device_batch (the rest of "
                "finetune.batch_size is accumulated, the numbers stay), use precision = "
                "'bf16', or more processes; the run resumes from its last epoch.") from None
    return Path(out)


@click.command("finetune")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path),
              help="Run directory (default: finetune.output).")
@click.option("--device", help="run.device: auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="run.precision: autocast dtype of the forwards and losses.")
@click.option("--device-batch", type=click.IntRange(min=1),
              help="run.device_batch: examples per forward (the rest is accumulated).")
@click.option("--num-workers", type=click.IntRange(min=0), help="run.num_workers.")
@click.option("--threads", type=click.IntRange(min=1), help="run.threads: torch threads.")
@click.option("--quiet", is_flag=True, help="No progress bar or messages.")
@user_errors(on_interrupt="The run directory keeps the last epoch's checkpoint: rerun the same "
             "command to resume from there.")
def finetune_command(recipe: Path, out: Path | None, quiet: bool, **settings: Any) -> None:
    """Fine-tune the model of RECIPE (a fine-tuning .toml) into its run directory.

    Rerunning resumes from the last epoch; `torchrun --nproc-per-node N -m repsim finetune
    RECIPE` trains on N GPUs. A comparison recipe then names the result as
    `model = "finetuned"`, `params = { run = "DIR" }`."""
    from repsim.finetune.config import load_finetune_recipe

    overrides = {k: v for k, v in settings.items() if v is not None}
    target = out or load_finetune_recipe(recipe, overrides).finetune.output
    check_run_dir(target, "--out" if out else "finetune.output")
    with progress_messages(not quiet):
        done = finetune_recipe(recipe, out, overrides, not quiet and sys.stderr.isatty())
    click.echo(f"fine-tuned into {done}/ (final.safetensors, snapshots/, provenance.json); "
               f'name it in a recipe as model = "finetuned", params = {{ run = "{done}" }}')


def _build(params: FinetunedParams) -> Any:
    from repsim.finetune.model import build_finetuned

    return build_finetuned(params)


def _structure(params: FinetunedParams) -> Any:
    from repsim.finetune.model import finetuned_structure

    return finetuned_structure(params)


@hookimpl
def register_models(register: Register) -> None:
    register("finetuned", _build, params=FinetunedParams, structure=_structure,
             summary="a model fine-tuned by `repsim finetune` (final weights or a snapshot), "
                     "its snapshots and path lengths in its provenance",
             checkpoint="run = a `repsim finetune` run directory",
             preprocess="the fine-tuned model's own")


@hookimpl
def register_commands(cli: Any) -> None:
    cli.add_command(finetune_command)
