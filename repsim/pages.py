"""The run report: one self-contained HTML page (figures embedded, no network) and its markdown
twin, ordered as the papers' figures.

Built from a run directory alone (``resolved.json``, ``similarity/``, ``evaluators/``,
``provenance.json``), so ``repsim report RUN_DIR`` works on any finished run. Each section of the
papers is present or marked "not in this run" with the reason. CKA figures are drawn anew as one
grid per figure, every panel on one colour scale, with block numbers on the axes.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import store
from repsim.errors import RecipeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PairFilter = Callable[[str, str, dict[str, Any]], bool]


@dataclass
class Section:
    """One figure or table of the papers and where a run holds it."""

    key: str
    title: str
    caption: str
    evaluators: tuple[str, ...] = ()  # registry names of the evaluators that make it
    groups: tuple[str, ...] = ()  # layer groups of a similarity figure
    pairs: PairFilter | None = None  # which model pairs a similarity figure shows


@dataclass
class Block:
    """What a section holds in this run: figures (name, PNG bytes), tables (markdown), text."""

    figures: list[tuple[str, bytes]] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


def _finetuned(label: str, models: dict[str, Any]) -> bool:
    name = str(models.get(label, {}).get("model", ""))
    return label.endswith("_ft") or name.endswith("_ft") or name == "finetuned"


def _base_of(label: str) -> str:
    return label.removesuffix("_ft").removesuffix("_finetuned")


def _pretrained_vits(a: str, b: str, models: dict[str, Any]) -> bool:
    """Two distinct pre-trained models, neither a CNN (those are Fig. 11's)."""
    return a != b and not any(_finetuned(x, models) or models.get(x, {}).get("family") == "cnn"
                              for x in (a, b))


SECTIONS = (
    Section("fig1", "Fig. 1 — CKA between the blocks of every pair of models",
            "CKA of the residual stream after each block, every block of model A (rows) against "
            "every block of model B (columns).", groups=("blocks",), pairs=_pretrained_vits),
    Section("fig2", "Fig. 2 — CKA by layer type", "LayerNorm-1, MHSA-QKV and MLP-FC-1 of each "
            "block, model A against model B.", groups=("norm1", "attn_qkv", "mlp_fc1"),
            pairs=_pretrained_vits),
    Section("fig3", "Fig. 3 / 12 — k-NN accuracy per block", "Weighted 20-NN accuracy (DINO "
            "protocol) of every block for CLS, GAP and GAP without CLS.", evaluators=("knn",)),
    Section("fig2a", "Fig. 2a — non-linear probes", "Probes of 1–3 Linear–BatchNorm–ReLU blocks "
            "on the final block.", evaluators=("mlp_probe",)),
    Section("fig2c", "Fig. 2c / 5 — linear probes", "Linear probes on the final and intermediate "
            "CLS tokens (mean ± std of the best runs).", evaluators=("linear_probe",)),
    Section("fig4", "Fig. 4 / 13 — agreement of predictions", "Kendall's τ of top-k class rankings "
            "(all, both correct, both wrong) and top-1 F1.", evaluators=("prediction_agreement",)),
    Section("fig5", "Fig. 5–6, 8–10 — before against after fine-tuning", "CKA between the blocks "
            "of a pre-trained model (rows) and of its fine-tuned self (columns).",
            groups=("blocks",),
            pairs=lambda a, b, m: not _finetuned(a, m) and _finetuned(b, m) and
            _base_of(b) == a),
    Section("fig11", "Fig. 11 — CKA against relative depth", "Mean CKA of layer pairs binned by "
            "their distance in relative depth, across families.", evaluators=("cka_vs_depth",)),
    Section("fig14", "Fig. 14 — path efficiency of fine-tuning", "‖θ_T − θ_0‖ / Σ‖θ_t − θ_{t−1}‖ "
            "per layer type and block.", evaluators=("path_efficiency",)),
    Section("fig15", "Fig. 15–16 — MSN against the other objectives", "CKA between the blocks of "
            "MSN (rows) and of each other pre-trained model.", groups=("blocks",),
            pairs=lambda a, b, m: "msn" in a and "msn" not in b and _pretrained_vits(a, b, m)),
    Section("tab6", "Tables 6–7 / Fig. 7 — ViTDet transfer", "Box and mask AP of a Mask R-CNN on "
            "frozen or fine-tuned backbones.", evaluators=("vitdet",)),
    Section("park", "Park et al. — attention and Fourier analyses", "Attention distance, attention "
            "collapse (NMI, query and head similarity) and Δ log amplitude of high frequencies.",
            evaluators=("attention_distance", "attention_collapse", "fourier_features")),
    Section("observations", "The papers' observations, measured", "Each observation of the "
            "papers with the verdict this run's numbers give.",
            evaluators=("paper_observations",)),
)


def _grid(results: Sequence[dict[str, Any]], title: str) -> Figure:
    """One heatmap per result on one colour scale (shared vmin, vmax 1), first block at the
    bottom-left, block numbers on the axes."""
    import matplotlib
    from matplotlib.figure import Figure

    from repsim.layers import natural_key

    n = len(results)
    cols = min(n, 4)
    rows = -(-n // cols)
    head = 0.8  # inches above the first row: the title, clear of the panels' own titles
    fig = Figure(figsize=(3.2 * cols, 2.9 * rows + head))
    fig.subplots_adjust(left=0.07, right=0.9, bottom=0.08, top=1 - head / (2.9 * rows + head),
                        hspace=0.55, wspace=0.35)
    values = [[[float("nan") if v is None else v for v in r] for r in res["values"]]
              for res in results]
    low = min([0.0, *(v for m in values for r in m for v in r if v == v)])
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#bbbbbb")
    im = None
    for i, (res, vals) in enumerate(zip(results, values)):
        ax = fig.add_subplot(rows, cols, i + 1)
        im = ax.imshow(vals, origin="lower", cmap=cmap, vmin=low, vmax=1.0, aspect="auto",
                       interpolation="nearest")

        def block(name: str) -> str:
            # a ViT block's number; a CNN's stage.block (ConvNeXt stages.0.blocks.2 -> 0.2)
            digits = [str(t) for t in natural_key(name) if isinstance(t, int)]
            return ".".join(digits[:2]) if len(digits) > 1 and not name.startswith("blocks.") \
                else digits[0] if digits else name

        ax.set_xticks(range(len(res["cols"])), [block(c) for c in res["cols"]], fontsize=6)
        ax.set_yticks(range(len(res["rows"])), [block(r) for r in res["rows"]], fontsize=6)
        ax.set_xlabel(f"{res['model_b']} block", fontsize=7)
        ax.set_ylabel(f"{res['model_a']} block", fontsize=7)
        ax.set_title(f"{res['model_a']} vs {res['model_b']}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, fraction=0.02, pad=0.02)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _similarity_block(run_dir: Path, section: Section, models: dict[str, Any],
                      run: dict[str, Any], data: dict[str, Any]) -> tuple[Block | None, str]:
    folder = run_dir / "similarity"
    metrics = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    metric = next((m for m in ("minibatch_cka", "linear_cka") if m in metrics),
                  metrics[0] if metrics else None)
    if metric is None:
        return None, "no similarity metric was computed"
    assert section.pairs is not None
    found = [json.loads(f.read_text()) for f in sorted((folder / metric).glob("*.json"))]
    chosen = [r for r in found if section.pairs(r["model_a"], r["model_b"], models)]
    if not chosen:
        return None, "no model pair of this kind is in the recipe"
    block = Block()
    for group in section.groups:
        panels, sources = [], []  # a pair whose models lack the group has no panel
        for r in chosen:
            ga, gb = r["groups_a"].get(group), r["groups_b"].get(group)
            if not ga or not gb:
                continue
            ri, ci = [r["rows"].index(x) for x in ga], [r["cols"].index(x) for x in gb]
            sources.append(r)
            panels.append(r | {"rows": ga, "cols": gb,
                               "values": [[r["values"][i][j] for j in ci] for i in ri]})
        if not panels:
            continue
        desc = panels[0]["description"]
        reduce = desc.get("reduce", {}).get(panels[0]["model_a"], {})
        layer_reduce = set(reduce.get("layers", {}).get(x) for x in panels[0]["rows"]) - {None}
        block.figures.append((f"{section.key}_{group}", _png(_grid(panels, f"{metric} — {group}"))))
        block.text.append(
            f"{group} — {metric}: {desc.get('estimator', '')}. N = {desc.get('examples')} "
            f"examples of {data.get('dataset')} ({data.get('split')}), minibatch "
            f"{desc.get('batch_size', 'all')}, reduction "
            f"{', '.join(sorted(layer_reduce)) or reduce.get('model', run.get('reduce'))}.")
        if "ci_low" in panels[0]:
            block.tables.append((f"{group}: last layer pair with its "
                                 f"{desc['bootstrap']['confidence']:.0%} bootstrap interval",
                                 ["model A", "model B", "CKA", "interval"],
                                 [[p["model_a"], p["model_b"], _num(p["values"][-1][-1]),
                                   f"[{_num(_last(r, 'ci_low', group))}, "
                                   f"{_num(_last(r, 'ci_high', group))}]"]
                                  for p, r in zip(panels, sources)]))
    if not block.figures:
        return None, f"the run has no layer group {', '.join(section.groups)} for these pairs"
    return block, ""


def _last(result: dict[str, Any], key: str, group: str) -> float | None:
    i = result["rows"].index(result["groups_a"][group][-1])
    j = result["cols"].index(result["groups_b"][group][-1])
    return result[key][i][j]


def _num(v: Any) -> str:
    return "undefined" if v is None or v != v else f"{v:.3f}" if isinstance(v, float) else str(v)


def _evaluator_block(run_dir: Path, section: Section, names: dict[str, str]
                     ) -> tuple[Block | None, str]:
    keys = [k for k, name in names.items() if name in section.evaluators]
    if not keys:
        return None, f"the recipe has no {' / '.join(section.evaluators)} evaluator"
    block = Block()
    for key in keys:
        folder = run_dir / "evaluators" / key
        if not (folder / "result.json").exists():
            block.text.append(f"evaluator '{key}' did not finish in this run.")
            continue
        result = store.read_json(folder / "result.json")
        if (folder / "report.md").exists():
            block.text.append((folder / "report.md").read_text(encoding="utf-8"))
        for png in sorted(folder.glob("*.png")):
            block.figures.append((f"{key}_{png.stem}", png.read_bytes()))
        for tname, t in result.get("tables", {}).items():
            block.tables.append((f"{key}: {tname}", t["headers"], t["rows"]))
    return block, ""


def build_report(run_dir: Path) -> Path:
    """Write ``report/index.html`` and ``report/report.md`` (with its PNGs) for a run; returns
    the HTML page's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecipeError(f"run directory '{run_dir}' " + ("is a file" if run_dir.exists() else
                          "does not exist") + "; give the directory a `repsim run` wrote (its "
                          "run.output or --out).")
    if not (run_dir / "resolved.json").exists():
        raise RecipeError(f"'{run_dir}' is not a repsim run directory (no resolved.json); give "
                          "the directory a `repsim run` wrote (its run.output or --out).")
    resolved = store.read_json(run_dir / "resolved.json")
    provenance = store.read_json(run_dir / "provenance.json") \
        if (run_dir / "provenance.json").exists() else {}
    names = {e.get("label") or e["name"]: e["name"] for e in resolved.get("evaluators", [])}
    # each model's family (vit, cnn) as the run found it, beside its recipe entry
    families = {label: {"family": m.get("family")}
                for label, m in provenance.get("models", {}).items()}
    models = {label: {**m, **families.get(label, {})} for label, m in resolved["models"].items()}
    run, data = resolved["run"], resolved["data"]
    parts: list[tuple[Section, Block | None, str]] = []
    for section in SECTIONS:
        if section.groups:
            block, why = _similarity_block(run_dir, section, models, run, data)
        else:
            block, why = _evaluator_block(run_dir, section, names)
        parts.append((section, block, why))
    out = run_dir / "report"
    title = f"repsim report — {run.get('name', run_dir.name)}"
    store.write_text(out / "index.html", _html(title, parts, provenance, resolved))
    md = [f"# {title}", "", _models_line(resolved), ""]
    for section, block, why in parts:
        md += [f"## {section.title}", "", section.caption, ""]
        if block is None:
            md += [f"*Not in this run: {why}.*", ""]
            continue
        for name, png in block.figures:
            (out / f"{name}.png").parent.mkdir(parents=True, exist_ok=True)
            with store.atomic_path(out / f"{name}.png") as tmp:
                tmp.write_bytes(png)
            md += [f"![{name}]({name}.png)", ""]
        md += [*block.text, ""]
        for caption, headers, rows in block.tables:
            md += [f"**{caption}**", "", _md_table(headers, rows), ""]
    md += ["## Provenance", "", "```json", json.dumps(_provenance_view(provenance), indent=2),
           "```", ""]
    store.write_text(out / "report.md", "\n".join(md))
    return out / "index.html"


def _models_line(resolved: dict[str, Any]) -> str:
    """Each model label with the registry entry it is (a stand-in rehearsal shows here)."""
    def entry(m: dict[str, Any]) -> str:
        arch = (m.get("params") or {}).get("arch")
        return f"{m.get('model')}" + (f" ({arch})" if arch else "")

    return "Models: " + ", ".join(f"{label} = {entry(m)}"
                                  for label, m in resolved["models"].items()) + "."


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    from repsim.report import records_table

    return records_table(list(headers), [[_num(v) if isinstance(v, float) else v for v in r]
                                         for r in rows])


def _provenance_view(p: dict[str, Any]) -> dict[str, Any]:
    # No timing here: identical runs write identical reports (timing is in provenance.json).
    keys = ("repsim", "versions", "git_commit", "seed", "device", "world_size", "inputs",
            "part_versions")
    view = {k: p[k] for k in keys if k in p}
    view["models"] = {label: {"model": m.get("model"), "checkpoint":
                              m.get("provenance", {}).get("checkpoint")}
                      for label, m in p.get("models", {}).items()}
    return view


_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-top:.6em}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}table{border-collapse:collapse;
font-size:12px;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px}th{background:#f4f4f4}
.missing{color:#888;font-style:italic}pre{background:#f7f7f7;padding:.6em;overflow:auto;
font-size:12px}nav a{margin-right:.8em}"""


def _html(title: str, parts: Sequence[tuple[Section, Block | None, str]],
          provenance: dict[str, Any], resolved: dict[str, Any]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>",
            f"<p>{len(resolved['models'])} models on {e(str(resolved['data'].get('dataset')))} "
            f"({e(str(resolved['data'].get('split')))}), seed {resolved['run'].get('seed')}.</p>",
            f"<p>{e(_models_line(resolved))}</p>",
            "<nav>" + "".join(f'<a href="#{s.key}">{e(s.title.split(" — ")[0])}</a>'
                              for s, _, _ in parts) + "</nav>"]
    for section, block, why in parts:
        body.append(f'<h2 id="{section.key}">{e(section.title)}</h2><p>{e(section.caption)}</p>')
        if block is None:
            body.append(f'<p class="missing">Not in this run: {e(why)}.</p>')
            continue
        for name, png in block.figures:
            data = base64.b64encode(png).decode()
            body.append(f'<img alt="{e(name)}" src="data:image/png;base64,{data}">')
        body += [f"<p>{e(t)}</p>" if "\n" not in t else f"<pre>{e(t)}</pre>" for t in block.text]
        for caption, headers, rows in block.tables:
            head = "".join(f"<th>{e(str(h))}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{e(_num(v))}</td>" for v in r) + "</tr>"
                            for r in rows)
            body.append(f"<p><b>{e(caption)}</b></p><table><tr>{head}</tr>{cells}</table>")
    body.append("<h2 id='provenance'>Provenance</h2><pre>"
                + e(json.dumps(_provenance_view(provenance), indent=2)) + "</pre>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + e(title) +
            f"</title><style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
