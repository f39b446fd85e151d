"""Fourier analysis of ViT token maps (Park et al., ICLR 2023, Fig. 'Fourier analysis'), streamed.

Each block's output tokens ``[B, T, D]`` are seen batch by batch during the data pass; the patch
tokens are put back on their ``h × w`` grid and transformed with a 2-D FFT over space, channel by
channel. Only the running sum of the per-example channel mean of the (log) amplitude spectrum is
kept (``[h, w]`` per layer), so memory is one batch of tokens whatever the number of examples.
The profile is read off that mean spectrum at the end; ``docs/evaluators.md`` gives the
definitions, and the tests check them against Park et al.'s ``representation_analysis.ipynb``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from repsim.errors import FeatureError
from repsim.evaluators._common import figure, json_float, table
from repsim.evaluators.attention import LayerSumsEvaluator, depth_axis, layer_depth, patch_grid
from repsim.evaluators.base import EvalContext, EvalResult, ObserveSpec
from repsim.evaluators.params import FourierParams

if TYPE_CHECKING:
    import torch

Average = Literal["log_amplitude", "amplitude"]
Profile = Literal["diagonal", "ring"]


def token_spectrum(tokens: torch.Tensor, num_prefix_tokens: int = 0,
                   grid_size: tuple[int, int] | None = None, average: Average = "log_amplitude",
                   eps: float = 1e-6) -> torch.Tensor:
    """Per-example channel mean of the 2-D amplitude spectrum of a token map, ``[B, h, w]``.

    ``tokens`` ``[B, T, D]``: prefix tokens first, then the patches row-major. Entry ``[b, ky,
    kx]`` is the mean over channels of log(|F| + eps) (``log_amplitude``) or of |F|
    (``amplitude``), F the unnormalised DFT over the grid, in FFT order (frequency 0 first).
    """
    import torch

    if tokens.ndim != 3:
        raise FeatureError(f"token maps must be [B, T, D]; got {tuple(tokens.shape)}.")
    h, w = patch_grid(tokens.shape[1], num_prefix_tokens, grid_size)
    x = tokens[:, num_prefix_tokens:].to(torch.promote_types(tokens.dtype, torch.float32))
    amp = torch.fft.fft2(x.reshape(x.shape[0], h, w, x.shape[2]), dim=(1, 2)).abs()
    if average == "log_amplitude":
        amp = amp.add_(eps).log_()
    return amp.mean(-1)


def fourier_profile(spectrum: torch.Tensor, average: Average = "log_amplitude",
                    profile: Profile = "diagonal", eps: float = 1e-6
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ log amplitude against frequency from a mean ``[h, w]`` spectrum (square grid).

    Frequency k = 0 … ⌊h/2⌋ is 2k/h in units of π rad per patch (1 = the Nyquist frequency of an
    even grid). ``diagonal`` takes the spectrum at (k, k); ``ring`` averages it over the
    frequencies whose larger folded component is k. With ``average="amplitude"`` the level is
    log(value + eps), else the value (already a mean log amplitude). Returns ``(frequency,
    level − level at k = 0)``.
    """
    import torch

    h, w = spectrum.shape
    if h != w:
        raise FeatureError(f"the Fourier profile needs a square patch grid; got {h}x{w}.")
    n = h // 2 + 1
    if profile == "diagonal":
        values = spectrum.diagonal()[:n]
    else:
        k = torch.arange(h, device=spectrum.device)
        folded = torch.minimum(k, h - k)  # |signed frequency| of each FFT index
        ring = torch.maximum(folded[:, None], folded[None, :]).flatten()
        values = torch.zeros(n, dtype=spectrum.dtype, device=spectrum.device)
        values = values.index_add_(0, ring, spectrum.flatten()) / torch.bincount(ring, minlength=n)
    level = values if average == "log_amplitude" else (values + eps).log()
    freq = 2 * torch.arange(n, dtype=torch.float64) / h
    return freq, level - level[0]


def fourier_features(tokens: torch.Tensor, num_prefix_tokens: int = 0,
                     grid_size: tuple[int, int] | None = None, average: Average = "log_amplitude",
                     profile: Profile = "diagonal", eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """One layer in one shot: ``spectrum`` ``[h, w]`` (mean over examples of
    :func:`token_spectrum`), ``frequency`` and ``delta_log_amplitude`` (:func:`fourier_profile`)."""
    spectrum = token_spectrum(tokens, num_prefix_tokens, grid_size, average, eps).double().mean(0)
    freq, delta = fourier_profile(spectrum, average, profile, eps)
    return {"spectrum": spectrum, "frequency": freq, "delta_log_amplitude": delta}


class FourierEvaluator(LayerSumsEvaluator):
    """Δ log amplitude of high frequencies per block (Park et al. 2023 Fig. 'Fourier analysis')."""

    params: FourierParams
    watches = "block tokens"

    def __init__(self, params: FourierParams | None = None,
                 name: str | None = "fourier_features") -> None:
        super().__init__(params or FourierParams(), name)
        p = self.params
        patterns = (["blocks.0:in"] if p.embedding else []) + ["blocks.*"]
        self.observes = ObserveSpec("glob", {"patterns": patterns}, (p.split,))

    def observe(self, split: str, model: str, layer: str, raw: torch.Tensor,
                labels: torch.Tensor, info: Mapping[str, Any]) -> None:
        import torch

        if split != self.params.split:
            return
        p = self.params
        try:
            s = token_spectrum(raw, int(info.get("num_prefix_tokens", 0)), info.get("grid_size"),
                               p.average, p.eps)
        except FeatureError as exc:
            self._note(f"{model} {layer}: skipped ({exc})")
            return
        self._add(model, layer, {"spectrum": s.sum(0), "count": torch.tensor([s.shape[0]])})

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        p = self.params
        observed = self.observed(ctx)
        notes = self.run_notes(ctx, observed)
        tensors: dict[str, torch.Tensor] = {}
        depths: dict[str, list[int]] = {}
        layers_of: dict[str, list[str]] = {}
        rows: list[list[Any]] = []
        for model, layers in observed.items():
            profiles, kept = [], []
            for i, layer in enumerate(layers):
                spectrum = self.mean(model, layer, "spectrum")
                try:
                    freq, delta = fourier_profile(spectrum, p.average, p.profile, p.eps)
                except FeatureError as exc:
                    notes.append(f"{model} {layer}: skipped ({exc})")
                    continue
                profiles.append(delta)
                kept.append((layer, layer_depth(layer, i + 1), spectrum))
            if not kept:
                continue
            layers_of[model] = [la for la, _, _ in kept]
            depths[model] = [d for _, d, _ in kept]
            tensors[f"delta_log_amplitude/{model}"] = torch.stack(profiles)
            tensors[f"frequency/{model}"] = freq
            tensors[f"spectrum/{model}"] = torch.stack([s for _, _, s in kept])
            rows += [[model, layer, depth, float(freq[-1]), float(delta[-1])]
                     for (layer, depth, _), delta in zip(kept, profiles)]
        protocol = {
            **self.protocol_base(observed),
            "protocol": "Fourier analysis of token maps (Park et al. 2023; Park & Kim 2022)",
            "tokens": "block outputs" + (" and the tokens entering block 0 (depth 0)"
                                         if p.embedding else "") + "; prefix tokens dropped, "
                      "patches on their h x w grid",
            "spectrum": f"|2-D DFT over the grid| per channel; {p.average}: " + (
                "mean over channels and examples of log(|F| + eps)" if p.average ==
                "log_amplitude" else "mean over channels and examples of |F|"),
            "profile": (f"{p.profile}: frequency k = 0..floor(h/2) at 2k/h pi rad/patch; "
                        + ("the spectrum at (k, k)" if p.profile == "diagonal" else
                           "the mean over frequencies with max(|ky|, |kx|) = k")),
            "delta_log_amplitude": "level(k) - level(0), level = " + (
                "the mean log amplitude" if p.average == "log_amplitude"
                else "log(mean amplitude + eps)"),
            "eps": p.eps,
            "tensor_layout": "delta_log_amplitude/<model>: [layer, frequency]; "
                             "frequency/<model>: [frequency] (units of pi); "
                             "spectrum/<model>: [layer, h, w] (FFT order)",
            "notes": notes,
        }

        def profile_plot():
            from matplotlib import colormaps
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            fig, axes = figure(max(len(layers_of), 1))
            for ax, model in zip(axes, layers_of):
                norm = Normalize(min(depths[model]), max(depths[model]))
                freq = tensors[f"frequency/{model}"].numpy()
                for depth, delta in zip(depths[model], tensors[f"delta_log_amplitude/{model}"]):
                    ax.plot(freq, delta.numpy(), color=colormaps["plasma"](norm(depth)))
                fig.colorbar(ScalarMappable(norm, "plasma"), ax=ax, label="depth")
                ax.set_xlabel("frequency (π rad / patch)")
                ax.set_ylabel("Δ log amplitude")
                ax.set_title(f"{model}: Fourier profile per layer")
            return fig

        def depth_plot():
            fig, axes = figure(1)
            for model in layers_of:
                highest = tensors[f"delta_log_amplitude/{model}"][:, -1]
                ax_label = f"{model} ({float(tensors[f'frequency/{model}'][-1]):.2f}π)"
                axes[0].plot(depths[model], highest.numpy(), marker="o", label=ax_label)
            depth_axis(axes[0], "depth (0: embedding)")
            axes[0].set_ylabel("Δ log amplitude at the highest frequency")
            axes[0].set_title("high-frequency amplitude vs depth")
            axes[0].legend(fontsize=7)
            return fig

        return EvalResult(
            protocol=protocol,
            tables={"high_frequency": table(["model", "layer", "depth", "frequency (pi)",
                                             "delta_log_amplitude"], rows)},
            tensors=tensors,
            data={"depth": depths, "layers": layers_of,
                  "frequency": {m: tensors[f"frequency/{m}"].tolist() for m in layers_of},
                  "delta_log_amplitude": {m: [[json_float(x) for x in r] for r in
                                              tensors[f"delta_log_amplitude/{m}"].tolist()]
                                          for m in layers_of}},
            figures={"fourier_profile": profile_plot, "high_frequency_vs_depth": depth_plot},
        )
