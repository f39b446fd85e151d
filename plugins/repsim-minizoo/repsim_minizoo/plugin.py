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
    def train(preset: str, seed: int, only: tuple[str, ...]) -> None:
        """Train (or find cached) every zoo model; print times and final losses."""
        from repsim_minizoo import zoo

        for name, (objective, finetuned) in entries().items():
            if objective == CONTROL or (only and name not in only):
                continue
            fn = zoo.finetuned if finetuned else zoo.pretrained
            _, record, path = fn(objective, preset, seed)
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
