"""The ``repsim`` command line (click).

User errors (:class:`repsim.errors.RepsimError`) end with their message and exit code 2, never a
traceback. Plugins are loaded lazily and must not import torch at start-up, so ``--help`` is quick.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from repsim.errors import RepsimError

KIND_ALIASES = {"models": "model", "datasets": "dataset", "layer_selectors": "layer_selector",
                "selectors": "layer_selector", "metrics": "metric", "evaluators": "evaluator"}
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def user_errors(fn: Callable[..., Any] | None = None, *, on_interrupt: str = "") -> Any:
    """Turn RepsimError into a one-paragraph message and exit code 2, and Ctrl-C into
    'Interrupted.' (plus ``on_interrupt``, formatted with the command's arguments) and exit
    code 130. Use as ``@user_errors`` or ``@user_errors(on_interrupt=...)``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except RepsimError as exc:
                click.echo(f"Error: {exc}", err=True)
                sys.exit(2)
            except KeyboardInterrupt:
                hint = on_interrupt.format(**kwargs)
                click.echo(f"Interrupted.{' ' + hint if hint else ''}", err=True)
                sys.exit(INTERRUPTED)

        return wrapper

    return decorate(fn) if fn is not None else decorate


class _EchoHandler(logging.Handler):
    """Log records as lines on the current stderr (looked up per line, as click does)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


@contextmanager
def progress_messages(enabled: bool = True) -> Iterator[None]:
    """Show what the parts say while they work (logger ``repsim``, level INFO: which checkpoint
    a model reads, what it loaded) on stderr, for the duration of a command."""
    if not enabled:
        yield
        return
    logger, handler = logging.getLogger("repsim"), _EchoHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def check_run_dir(path: Path, where: str) -> None:
    """Refuse a run directory that is a file, lies under one, or cannot be written, before
    anything is built; creates nothing."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise RepsimError(
            f"{where} '{path}': '{existing}' is a file, not a directory. Give a directory for "
            "the run (it is created if missing).")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as exc:
        raise RepsimError(
            f"{where} '{path}': cannot write in '{existing}' ({exc.strerror}). Give a directory "
            "you can write to.") from None


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
@click.option("--force", is_flag=True,
              help="Write the run into a folder that holds other files (not a run directory).")
@click.option("--device", help="run.device: auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="run.precision: autocast dtype of the forwards.")
@click.option("--tf32/--no-tf32", default=None, help="run.tf32: TF32 matrix products on CUDA.")
@click.option("--cache-dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="run.cache_dtype: dtype of the cached features.")
@click.option("--threads", type=click.IntRange(min=1), help="run.threads: torch threads.")
@click.option("--batch-size", type=click.IntRange(min=1), help="run.batch_size: forward batch.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine (torchrun's launcher, one GPU or a share of the "
              "cores each); several machines: start `torchrun ... -m repsim run` on each.")
@click.option("--stand-ins", "stand_ins", is_flag=True,
              help="Rehearse the recipe: every official model replaced by a miniature, ImageNet "
              "by digits, COCO by coco_shapes, sizes cut to minutes (output: run.output + "
              "'-standins').")
@user_errors(on_interrupt="The run directory keeps the state saved every run.checkpoint_every "
             "batches: rerun the same command (repsim run {recipe} with the same options) to "
             "resume from there.")
def run(recipe: str, out: Path | None, quiet: bool, force: bool, nproc: int, stand_ins: bool,
        **settings: Any) -> None:
    """Run RECIPE (a .toml file, or an embedded recipe name such as 'mini').

    The options replace the recipe's [run] settings of the same names. Before any weights load,
    every file the recipe needs is checked: if any is missing, all of them are listed with
    where each is published, with an estimate of the compute, and nothing runs (exit code 2).
    Ctrl-C stops the run (exit code 130); rerunning the same command resumes it."""
    from repsim.plugins import get_host
    from repsim.run.core import Run
    from repsim.run.distributed import world_from_env

    _warn_broken(get_host())
    overrides = settings_given(settings)
    main = world_from_env().is_main
    if stand_ins:
        checked, replaced = _stand_in_recipe(recipe, overrides)
        if main and not quiet:
            click.echo("Stand-in rehearsal (nothing below is the papers' models or data):\n" +
                       "\n".join(f"  {line}" for line in replaced), err=True)
    else:
        checked = _preflight_or_exit(recipe, overrides)
    check_run_dir(out or checked.recipe.run.output, "--out" if out else "run.output")
    if nproc > 1:
        from repsim.run.distributed import launch_local

        sys.exit(launch_local(nproc, _without_option(sys.argv[1:], "--nproc")))
    with progress_messages(not quiet):
        run_dir = Run(checked, out, not quiet and sys.stderr.isatty(), quiet, force).execute()
    if main:
        if stand_ins:
            from repsim.preflight import measure_cpu_throughput

            flops = measure_cpu_throughput(checked.recipe.run.threads)
            if not quiet:
                click.echo(f"this CPU: {flops / 1e9:.0f} GFLOP/s on a full-size ViT-B/16 "
                           "forward (stored; `repsim validate` estimates CPU hours with it)",
                           err=True)
        click.echo(f"results in {run_dir}/ (report/index.html, summary.md, tables/, figures/, "
                   "similarity/)")


def _stand_in_recipe(recipe: str, overrides: dict[str, Any]) -> tuple[Any, list[str]]:
    """RECIPE's stand-in rehearsal, checked (it needs no file)."""
    from repsim.recipe import CheckedRecipe, load_recipe, resolve_recipe_path, with_run_settings
    from repsim.standins import stand_in

    path = resolve_recipe_path(recipe)
    rehearsal, replaced = stand_in(load_recipe(path))
    if overrides:
        rehearsal = with_run_settings(rehearsal, overrides, path)
    return CheckedRecipe(rehearsal, path), replaced


def _preflight_or_exit(recipe: str, overrides: dict[str, Any]) -> Any:
    """The checked recipe; when a file is missing, every missing file with the compute
    estimate, then exit code 2."""
    from repsim.preflight import preflight

    pf = preflight(recipe, overrides, estimate="if_missing")
    _refuse_missing(pf, ": nothing was loaded or run. Put them in place (or point the locations "
                    f"elsewhere, above) and rerun; `repsim run {recipe} --stand-ins` rehearses "
                    "the recipe without them.")
    return pf.checked


def _refuse_missing(pf: Any, tail: str) -> None:
    """With files missing: the list (stderr), the compute estimate (stdout), and the error."""
    if pf.missing:
        click.echo(pf.missing_text(), err=True)
        click.echo(pf.estimate_text())
        raise RepsimError(f"{len(pf.missing)} file(s) missing{tail}")


def _without_option(args: list[str], option: str) -> list[str]:
    """``args`` without ``option VALUE`` / ``option=VALUE`` (what each launched process gets)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def settings_given(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``[run]`` settings given on the command line."""
    return {k: v for k, v in settings.items() if v is not None}


@cli.command()
@click.argument("recipe")
@user_errors
def validate(recipe: str) -> None:
    """Check RECIPE without loading any weights: syntax, fields, part names and parameters,
    the layers of every model whose structure can be built without weights, and every file it
    needs (all missing ones listed at once, exit code 2); estimate its compute per figure."""
    from repsim.plugins import get_host
    from repsim.preflight import preflight

    _warn_broken(get_host())
    pf = preflight(recipe)
    checked = pf.checked
    r = checked.recipe
    for note in checked.notes:
        click.echo(f"Note: {note}", err=True)
    _refuse_missing(pf, "; everything else is valid.")
    check_run_dir(r.run.output, "run.output")
    click.echo(f"{checked.path}: valid. {len(r.models)} models, {len(r.layers)} layer groups, "
               f"{len(r.metrics)} metrics, {len(r.evaluators)} evaluators, "
               f"{len(r.model_pairs())} model pairs.")
    click.echo(pf.estimate_text())


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@user_errors
def report(run_dir: Path) -> None:
    """(Re)build RUN_DIR's report: report/index.html (one self-contained page, figures embedded)
    and report/report.md, from the files of a finished (or partly finished) run."""
    from repsim.pages import build_report

    page = build_report(run_dir)
    click.echo(f"wrote {page} and {page.parent / 'report.md'}")


@cli.command(name="list")
@click.argument("kind", required=False)
@click.argument("pattern", required=False, default="*")
@user_errors
def list_parts(kind: str | None, pattern: str) -> None:
    """List registered parts: KIND is models, datasets, layer_selectors, metrics or evaluators;
    PATTERN a wildcard such as 'dino_*'. A PATTERN naming one part shows its parameters."""
    from tabulate import tabulate

    from repsim.plugins import get_host

    host = get_host()
    if kind is not None and KIND_ALIASES.get(kind, kind) not in host.registries:
        raise RepsimError(f"unknown kind '{kind}'; use one of {', '.join(KIND_ALIASES)}.")
    kinds = [KIND_ALIASES.get(kind, kind)] if kind else list(host.registries)
    tables = False
    for k in kinds:
        reg = host.registry(k)
        names = reg.names(pattern)
        if pattern != "*" and len(names) == 1:
            click.echo(_part_details(reg.get(names[0])))
            continue
        tables = True
        rows = []
        for name in names:
            part = reg.get(name)
            extra = "; ".join(f"{key}: {_fmt(v)}" for key, v in part.info.items())
            rows.append([name, part.provider, part.summary + (f" ({extra})" if extra else "")])
        click.echo(f"{k}s:")
        click.echo(tabulate(rows, headers=["name", "provider", "description"],
                            tablefmt="simple", maxcolwidths=[None, None, 90]) if rows
                   else "  (none)")
        click.echo()
    if tables:
        click.echo(f"`repsim list {kind or 'KIND'} NAME` shows a part's parameters.", err=True)
    _warn_broken(host)


def _part_details(part: Any) -> str:
    """One part: its summary and facts, then each parameter's type, default and description."""
    from tabulate import tabulate

    lines = [f"{part.kind} '{part.name}' ({part.provider}): {part.summary}"]
    lines += [f"  {key}: {_fmt(v)}" for key, v in part.info.items()]
    if part.params.__doc__:  # a class's own docstring only: __doc__ is not inherited
        lines.append("  " + " ".join(part.params.__doc__.split()))
    rows = _param_rows(part.params)
    lines.append("")
    lines.append(tabulate(rows, headers=["parameter", "type", "default", "description"],
                          tablefmt="simple", maxcolwidths=[None, 32, 30, 60]) if rows
                 else "no parameters")
    return "\n".join(lines) + "\n"


# pydantic's constraint attributes (annotated_types) and how they read
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=",
           "max_length": "length <="}


def _param_rows(model: type, prefix: str = "") -> list[list[str]]:
    """Rows of a parameter model; the fields of a nested model follow as ``field.sub``."""
    from pydantic import BaseModel

    rows = []
    for name, field in model.model_fields.items():
        bounds = [f"{op} {getattr(m, attr)}" for m in field.metadata
                  for attr, op in _BOUNDS.items() if getattr(m, attr, None) is not None]
        kind = _type_name(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        default = "required" if field.is_required() else \
            _default_text(field.get_default(call_default_factory=True))
        rows.append([prefix + name, kind, default, field.description or ""])
        nested = [t for t in (field.annotation, *_type_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            rows += _param_rows(nested[0], f"{prefix}{name}.")
    return rows


def _type_args(t: Any) -> tuple[Any, ...]:
    import typing

    return typing.get_args(t)


def _type_name(t: Any) -> str:
    """A parameter's type as written in Python: ``int | None``, ``list[str]``, ``'a' | 'b'``."""
    import types
    import typing

    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', origin)}[{inner}]" if args else str(origin)
    if t is type(None):
        return "None"
    return getattr(t, "__name__", str(t).replace("typing.", ""))


def _default_text(v: Any) -> str:
    from pydantic import BaseModel

    if isinstance(v, BaseModel):
        return "(fields below)"
    return str(v) if isinstance(v, Path) else repr(v)


def _fmt(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _warn_broken(host: Any) -> None:
    for p in host.broken_plugins():
        click.echo(f"Warning: plugin '{p.name}' {p.version} was skipped: {p.error}", err=True)


@cli.command()
@user_errors
def plugins() -> None:
    """Show installed plugins, their versions and what each registers, the plugins that failed
    to load, and part names that two plugins register (which every other command refuses)."""
    from tabulate import tabulate

    from repsim.plugins import get_host

    host = get_host()
    clashes = host.name_clashes()  # also fills each plugin's list of parts
    rows = []
    for p in host.plugins.values():
        parts = "; ".join(f"{k}: {', '.join(v)}" for k, v in p.parts.items())
        rows.append([p.name, p.version, "built-in" if p.builtin else "plugin",
                     f"FAILED: {p.error}" if p.error else parts])
    click.echo(tabulate(rows, headers=["plugin", "version", "kind", "parts"], tablefmt="simple",
                        maxcolwidths=[None, None, None, 80]))
    for clash in clashes:
        click.echo(f"\nName clash (the other commands refuse to run until it is resolved): "
                   f"{clash}")


@cli.command()
@click.argument("model")
@click.option("--param", "-p", multiple=True, metavar="KEY=VALUE",
              help="Model parameter (TOML or JSON value), e.g. -p arch=\"'vit_small_patch16_224'\".")
@click.option("--pattern", default="*", help="Show only layers matching this glob ('blocks.*').")
@user_errors
def layers(model: str, param: tuple[str, ...], pattern: str) -> None:
    """List the layers MODEL offers (module paths for recipes), with their output shapes.

    Models that can be built without weights (timm, callable, the zoo) are, on the meta device,
    in a fraction of a second; a zoo entry then needs no checkpoint. Others are built."""
    from tabulate import tabulate

    from repsim.layers import GlobParams, GlobSelector, module_names
    from repsim.options import parse_key_values
    from repsim.plugins import registry

    part = registry("model").get(model)
    params = parse_key_values(param)
    field = part.params.model_fields.get("checkpoint")
    if part.structure is not None and field is not None and field.is_required():
        params.setdefault("checkpoint", os.devnull)  # the structure reads no weights
    validated = part.validate(params)
    try:
        loaded = part.skeleton(validated)
    except RepsimError:
        raise
    except Exception:  # noqa: BLE001 - a network that reads its data while built: build it
        loaded = None
    loaded = loaded or part.build(validated)
    loaded.name = loaded.name or model
    names = GlobSelector(GlobParams(patterns=[pattern])).select(loaded) if pattern != "*" else \
        module_names(loaded.module)
    modules = dict(loaded.module.named_modules())
    shapes, what = _output_shapes(loaded)
    click.echo(tabulate([[n, f"({type(modules[n]).__name__})", shapes.get(n, "")] for n in names],
                        tablefmt="plain"))
    click.echo(f"{len(names)} layers; {what}. ':in' after a name captures the module's input; "
               "'output' is the model's return value.", err=True)


def _output_shapes(loaded: Any) -> tuple[dict[str, str], str]:
    """Each module's output shape for one input of the model's crop (a forward on the meta
    device for a structure, computing nothing), and what was fed."""
    import torch

    crop = loaded.preprocess.crop
    if crop is None:
        return {}, ("no output shapes: the model's transform sets no crop "
                    "(-p 'preprocess={crop = N}')")
    module = loaded.module
    device = next(module.parameters(), torch.empty(0)).device
    shapes: dict[str, str] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: Any, _inputs: Any, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor):
                shapes[name] = "[" + ", ".join(["B", *map(str, t.shape[1:])]) + "]"

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if n]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, loaded.preprocess.channels, crop, crop, device=device))
    except Exception as exc:  # noqa: BLE001 - the names are still worth listing
        return {}, f"no output shapes: a forward of one {crop}x{crop} input failed " \
                   f"({type(exc).__name__}: {exc})"
    finally:
        for h in handles:
            h.remove()
    return shapes, f"output shapes for B {crop}x{crop} inputs"


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
    click.echo(f"{metric}: rows: layers of {feats_a}; columns: layers of {feats_b}")
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
