"""The ``repsim`` command line (click).

User errors (:class:`repsim.errors.RepsimError`) end with their message and exit code 2, never a
traceback. Plugins are loaded lazily and must not import torch at start-up, so ``--help`` is quick.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from repsim.errors import RepsimError

KIND_ALIASES = {"models": "model", "datasets": "dataset", "layer_selectors": "layer_selector",
                "selectors": "layer_selector", "metrics": "metric", "evaluators": "evaluator"}


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn RepsimError into a one-paragraph message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RepsimError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)

    return wrapper


class _Group(click.Group):
    """Adds plugin commands on first use, so a broken plugin cannot break ``--help``."""

    _loaded = False

    def _load_plugin_commands(self) -> None:
        if not self._loaded:
            self._loaded = True
            from repsim.plugins import get_host

            get_host().add_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load_plugin_commands()
        return super().get_command(ctx, name)


@click.group(cls=_Group)
@click.version_option(package_name="repsim-core", prog_name="repsim")
def cli() -> None:
    """Compare the internal representations of neural networks, layer by layer."""


@cli.command()
@click.argument("recipe")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default: run.output).")
@click.option("--quiet", is_flag=True, help="No progress bars or messages.")
@click.option("--device", help="run.device: auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="run.precision: autocast dtype of the forwards.")
@click.option("--tf32/--no-tf32", default=None, help="run.tf32: TF32 matrix products on CUDA.")
@click.option("--cache-dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="run.cache_dtype: dtype of the cached features.")
@click.option("--threads", type=click.IntRange(min=1), help="run.threads: torch threads.")
@click.option("--batch-size", type=click.IntRange(min=1), help="run.batch_size: forward batch.")
@user_errors
def run(recipe: str, out: Path | None, quiet: bool, **settings: Any) -> None:
    """Run RECIPE (a .toml file, or an embedded recipe name such as 'mini').

    The options replace the recipe's [run] settings of the same names."""
    from repsim.run import run_recipe

    overrides = {k: v for k, v in settings.items() if v is not None}
    run_dir = run_recipe(recipe, out, progress=not quiet and sys.stderr.isatty(), quiet=quiet,
                         overrides=overrides)
    click.echo(f"results in {run_dir}/ (summary.md, tables/, figures/, similarity/)")


@cli.command()
@click.argument("recipe")
@user_errors
def validate(recipe: str) -> None:
    """Check RECIPE without loading any weights: syntax, fields, part names and parameters."""
    from repsim.recipe import check_recipe

    checked = check_recipe(recipe)
    r = checked.recipe
    click.echo(f"{checked.path}: valid. {len(r.models)} models, {len(r.layers)} layer groups, "
               f"{len(r.metrics)} metrics, {len(r.evaluators)} evaluators, "
               f"{len(r.model_pairs())} model pairs.")


@cli.command(name="list")
@click.argument("kind", required=False)
@click.argument("pattern", required=False, default="*")
@user_errors
def list_parts(kind: str | None, pattern: str) -> None:
    """List registered parts: KIND is models, datasets, layer_selectors, metrics or evaluators;
    PATTERN a wildcard such as 'dino_*'."""
    from tabulate import tabulate

    from repsim.plugins import get_host

    host = get_host()
    if kind is not None and KIND_ALIASES.get(kind, kind) not in host.registries:
        raise RepsimError(f"unknown kind '{kind}'; use one of {', '.join(KIND_ALIASES)}.")
    kinds = [KIND_ALIASES.get(kind, kind)] if kind else list(host.registries)
    for k in kinds:
        reg = host.registry(k)
        rows = []
        for name in reg.names(pattern):
            part = reg.get(name)
            extra = "; ".join(f"{key}: {_fmt(v)}" for key, v in part.info.items())
            rows.append([name, part.provider, part.summary + (f" ({extra})" if extra else "")])
        click.echo(f"{k}s:")
        click.echo(tabulate(rows, headers=["name", "provider", "description"],
                            tablefmt="simple", maxcolwidths=[None, None, 90]) if rows
                   else "  (none)")
        click.echo()
    _warn_broken(host)


def _fmt(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _warn_broken(host: Any) -> None:
    for p in host.broken_plugins():
        click.echo(f"Warning: plugin '{p.name}' {p.version} was skipped: {p.error}", err=True)


@cli.command()
@user_errors
def plugins() -> None:
    """Show installed plugins, their versions and what each registers."""
    from tabulate import tabulate

    from repsim.plugins import get_host

    host = get_host()
    host.registries  # noqa: B018 - fills each plugin's list of parts
    rows = []
    for p in host.plugins.values():
        parts = "; ".join(f"{k}: {', '.join(v)}" for k, v in p.parts.items())
        rows.append([p.name, p.version, "built-in" if p.builtin else "plugin",
                     f"FAILED: {p.error}" if p.error else parts])
    click.echo(tabulate(rows, headers=["plugin", "version", "kind", "parts"], tablefmt="simple",
                        maxcolwidths=[None, None, None, 80]))


@cli.command()
@click.argument("model")
@click.option("--param", "-p", multiple=True, metavar="KEY=VALUE",
              help="Model parameter (TOML or JSON value), e.g. -p arch=\"'vit_small_patch16_224'\".")
@click.option("--pattern", default="*", help="Show only layers matching this glob ('blocks.*').")
@user_errors
def layers(model: str, param: tuple[str, ...], pattern: str) -> None:
    """List the layers MODEL offers (module paths for recipes), with their output shapes."""
    from repsim.api import build_model
    from repsim.layers import GlobParams, GlobSelector
    from repsim.options import parse_key_values

    params = parse_key_values(param)
    loaded = build_model(model, **params)
    names = GlobSelector(GlobParams(patterns=[pattern])).select(loaded) if pattern != "*" else \
        [n for n, _ in loaded.module.named_modules() if n]
    modules = dict(loaded.module.named_modules())
    for name in names:
        click.echo(f"{name}  ({type(modules[name]).__name__})")
    click.echo(f"{len(names)} layers; ':in' after a name captures the module's input; 'output' "
               "is the model's return value.", err=True)


@cli.command()
@click.argument("feats_a", type=click.Path(path_type=Path))
@click.argument("feats_b", type=click.Path(path_type=Path))
@click.option("--metric", default="minibatch_cka", show_default=True)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--out", type=click.Path(path_type=Path), help="Write the result as JSON here.")
@user_errors
def similarity(feats_a: Path, feats_b: Path, metric: str, batch_size: int,
               out: Path | None) -> None:
    """Compare two safetensors files of features (one tensor per layer, [N, ...] each)."""
    from repsim.api import get_metric
    from repsim.metrics.engine import similarity_matrix
    from repsim.report import result_table
    from repsim.store import write_json

    a, b = _read_features(feats_a), _read_features(feats_b)
    result = similarity_matrix(get_metric(metric), a, b, batch_size)
    click.echo(result_table(result))
    for note in result.notes:
        click.echo(f"Note: {note}", err=True)
    if out is not None:
        write_json(out, result.to_json())
        click.echo(f"wrote {out}", err=True)


def _read_features(path: Path) -> dict[str, Any]:
    from repsim.layers import natural_key

    if not path.is_file():
        raise RepsimError(f"feature file '{path}' does not exist.")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise RepsimError(f"'{path}' is not a readable safetensors file ({exc}). Save features "
                          "with safetensors.torch.save_file({layer: tensor, ...}, path).") from None
    if not tensors:
        raise RepsimError(f"feature file '{path}' holds no tensors.")
    return {k: tensors[k] for k in sorted(tensors, key=natural_key)}


def main() -> None:
    cli(prog_name="repsim")


if __name__ == "__main__":
    main()
