"""The entry point: registers the zoo's models, the ``paper_observations`` evaluator and the
``repsim minizoo`` commands. No torch here: building a part imports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from repsim.hookspecs import Register, hookimpl
from repsim_minizoo.config import CONTROL, FINETUNABLE, PRETRAINED


class ZooParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, description="initialisation and training seed")
    preset: Literal["default", "tiny"] = Field("default", description="'tiny': a test-size ViT")
    progress: bool = Field(True, description="progress bars while training on a cache miss")


class FinetunedParams(ZooParams):
    epoch: int | None = Field(None, ge=0, description="a per-epoch snapshot (0: before "
                                                       "fine-tuning); default the final weights")


class ObservationsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field("minibatch_cka", description="metric label of the recipe to read")
    blocks: str = Field("blocks", description="layer group of whole blocks")
    attention_groups: list[str] = Field(default_factory=lambda: ["norm1", "attn_qkv"])
    mlp_group: str = "mlp_fc1"
    k: int = Field(20, ge=1, description="neighbours of the k-NN (the seeds use 20)")
    knn_gap: float = Field(0.05, gt=0, description="k-NN accuracy gap that counts as diverged")
    resamples: int = Field(1000, ge=0, description="bootstrap resamples of each CKA observation's "
                           "margin (minibatches resampled jointly for every model pair; needs "
                           "run.bootstrap > 0, which keeps the per-minibatch terms); 0: none")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the margins' intervals")
    roles: dict[str, str] = Field(default_factory=dict,
                                  description="objective role (mocov3, mae_ft, ...) → model label, "
                                              "for models not registered as minizoo_*")


def entries() -> dict[str, tuple[str, bool]]:
    """Registry name → (objective, fine-tuned)."""
    out = {f"minizoo_{o}": (o, False) for o in (*PRETRAINED, CONTROL)}
    out.update({f"minizoo_{o}_ft": (o, True) for o in FINETUNABLE})
    return out


def _builder(name: str, objective: str, finetuned: bool) -> Callable[[Any], Any]:
    def build(params: ZooParams) -> Any:
        from repsim_minizoo import zoo

        return zoo.build(name, objective, finetuned, params.preset, params.seed,
                         getattr(params, "epoch", None), params.progress)

    return build


@hookimpl
def register_models(register: Register) -> None:
    for name, (objective, finetuned) in entries().items():
        what = ("untrained control (the shared initialisation)" if objective == CONTROL
                else f"{objective} pretrained" + (", then fine-tuned supervised" if finetuned
                                                  else ""))
        register(name, _builder(name, objective, finetuned),
                 params=FinetunedParams if finetuned else ZooParams,
                 summary=f"tiny ViT on digits: {what}; trained on first use, cached",
                 checkpoint="trained on first use into $REPSIM_CACHE/minizoo",
                 preprocess="8x8 digits resized to 16, 1 channel, digits mean/std")


def _train_entries(todo: list[tuple[str, bool]], preset: str, seed: int, progress: bool = True,
                   process: str = "") -> list[tuple[dict[str, Any], dict[str, Any], Any]]:
    """Train (or load) the entries in order; their (weights, record, path). A line before each
    entry to train says which it is of how many (``process``: whose list it is)."""
    import logging

    from repsim_minizoo import cache, zoo

    log = logging.getLogger("repsim.minizoo")
    out = []
    for k, (objective, ft) in enumerate(todo, 1):
        if not cache.is_complete(zoo.entry_file(objective, ft, preset, seed)):
            log.info("model %d of %d%s: minizoo_%s%s", k, len(todo), process, objective,
                     "_ft" if ft else "")
        out.append((zoo.finetuned if ft else zoo.pretrained)(objective, preset, seed, progress))
    return out


def _train_side_by_side(wanted: list[tuple[str, bool]], preset: str, seed: int,
                        nproc: int | None) -> None:
    """The uncached entries of ``wanted`` dealt to ``nproc`` processes launched by torchrun's
    launcher (nothing when one process would do: the caller then trains them in order)."""
    import os

    import click

    from repsim.run.distributed import launch_local
    from repsim_minizoo import zoo

    chains = zoo.training_chains(wanted, preset, seed)
    n = min(nproc or os.cpu_count() or 1, len(chains))
    if n < 2:
        return
    dealt = zoo.deal(chains, n, preset)
    longest = max(zoo.chain_cost(part, preset) for part in dealt)
    click.echo(f"training {sum(map(len, dealt))} zoo models in {n} processes, one thread each "
               f"(about {longest / 60:.0f} min on a 2-core reference machine)", err=True)
    # Training pins one thread; saying so to torchrun's launcher also silences its warning.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    code = launch_local(n, ["minizoo", "train", "--preset", preset, "--seed", str(seed),
                            "--deal", _format_deal(dealt)])
    if code:
        raise SystemExit(code)


def _format_deal(dealt: list[list[tuple[str, bool]]]) -> str:
    """``mocov3,mocov3+ft;dino,...``: each process's entries, processes by ';'."""
    return ";".join(",".join(o + ("+ft" if ft else "") for o, ft in part) for part in dealt)


def _parse_deal(text: str) -> list[list[tuple[str, bool]]]:
    return [[(e.removesuffix("+ft"), e.endswith("+ft")) for e in part.split(",") if e]
            for part in text.split(";")]


def _build_observations(params: ObservationsParams) -> Any:
    from repsim_minizoo.evaluator import PaperObservations

    return PaperObservations(params)


@hookimpl
def register_evaluators(register: Register) -> None:
    register("paper_observations", _build_observations, params=ObservationsParams,
             summary="report.md: do the seeds' main observations hold (CKA, k-NN, fine-tuning)?")


@hookimpl
def register_commands(cli: Any) -> None:
    import click

    @cli.group("minizoo")
    def minizoo() -> None:
        """The plugin's tiny ViT zoo: train it ahead of a run, see the cache."""

    @minizoo.command("train")
    @click.option("--preset", type=click.Choice(["default", "tiny"]), default="default")
    @click.option("--seed", type=int, default=0)
    @click.option("--only", multiple=True, help="registry names (default: every zoo model)")
    @click.option("--nproc", type=click.IntRange(min=1), default=None,
                  help="models trained side by side, one process and one thread each "
                       "(default: the machine's cores, at most one per objective)")
    @click.option("--deal", hidden=True, help="set by --nproc: each process's entries")
    def train(preset: str, seed: int, only: tuple[str, ...], nproc: int | None,
              deal: str | None) -> None:
        """Train (or find cached) every zoo model; print times and final losses.

        Several processes start through torchrun's launcher; each trains whole models (an
        objective's pretraining, then its fine-tuning) with one thread, so the weights are the
        same whatever the number of processes."""
        from repsim.cli import progress_messages
        from repsim.run.distributed import world_from_env

        unknown = sorted(set(only) - set(entries()))
        if unknown:
            raise click.UsageError(f"--only {', '.join(unknown)}: not zoo models; zoo models: "
                                   f"{', '.join(entries())}")
        world = world_from_env()
        if deal is not None:  # one of the launched processes
            with progress_messages():
                _train_entries(_parse_deal(deal)[world.rank], preset, seed, progress=False,
                               process=f" of process {world.rank + 1}")
            return
        wanted = [entries()[n] for n in (only or entries())]
        with progress_messages():
            _train_side_by_side(wanted, preset, seed, nproc)  # then all cached: only loaded
            names = [n for n, e in entries().items() if e in wanted and e[0] != CONTROL]
            trained = _train_entries([entries()[n] for n in names], preset, seed)
        for name, (_, record, path) in zip(names, trained):
            click.echo(f"{name:22s} {record['train_seconds']:7.1f} s  final loss "
                       f"{record['loss_final']:.4f}  {path}")

    @minizoo.command("cache")
    def cache_cmd() -> None:
        """Where the zoo caches its weights, and what is there."""
        from repsim_minizoo.cache import cache_root

        root = cache_root()
        click.echo(str(root))
        for p in sorted(root.glob("*.safetensors")) if root.is_dir() else []:
            click.echo(f"  {p.name}  {p.stat().st_size / 1e6:.1f} MB")
