"""`sparsepress report`: one self-contained HTML page (figures inlined as PNG data) plus the PNG files.

For a sweep folder: Pareto fronts of fidelity against size and against latency (every trial and the
dense model marked, the front highlighted), a table of every trial with its recipe, per-layer
sparsity and bits heatmaps, the size breakdown by tensor kind, and the allocator's sensitivity curves
for trials made under a budget. For a packed model folder: its per-layer view, size breakdown and,
where present, budget and sensitivity. The page needs no network and no script; the report folder is
written atomically.

Example:
    >>> import tempfile, torch, sparsepress as sp
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> folder = sp.save(model, tempfile.mkdtemp() + "/m")
    >>> index = write_report(folder, tempfile.mkdtemp() + "/report")
    >>> "Size by tensor kind" in index.read_text()
    True
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import MANIFEST, TENSORS, _atomic_folder, _replace_folder
from ..report import human_bytes
from .breakdown import layer_views, read_header, size_breakdown
from .figures import (
    Point,
    breakdown_figure,
    heatmap_figure,
    layers_figure,
    pareto_figure,
    save_png,
    sensitivity_figure,
)
from .pareto import pareto_front
from .sensitivity import read_budget, read_sensitivity
from .store import DB_NAME, ResultsStore

INDEX = "index.html"
PARETO_TABLE_ID = "pareto-table"


@dataclass
class Page:
    """A report page being built: title, subtitle and HTML sections in order; figures written as they come."""

    folder: Path
    title: str
    subtitle: str = ""
    sections: list[str] = field(default_factory=list)

    def figure(self, figure: Any, name: str, caption: str) -> None:
        """Save `figure` as NAME.png and add it to the page, inlined."""
        path = save_png(figure, self.folder / f"{name}.png")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        self.sections.append(
            f'<figure id="fig-{html.escape(name)}"><img src="data:image/png;base64,{data}" '
            f'data-file="{html.escape(path.name)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def heading(self, text: str) -> None:
        self.sections.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str) -> None:
        self.sections.append(f"<p>{html.escape(text)}</p>")

    def table(
        self,
        headers: list[str],
        rows: list[tuple[dict[str, str], list[str]]],
        table_id: str = "",
        text_columns: tuple[str, ...] = (),
    ) -> None:
        """A table; each row is (attributes, cells); cells are already-escaped HTML; `text_columns` wrap, left-aligned."""
        wrap = [' class="l"' if h in text_columns else "" for h in headers]
        head = "".join(f"<th{w}>{html.escape(h)}</th>" for h, w in zip(headers, wrap))
        body = "".join(
            "<tr"
            + "".join(f' {k}="{html.escape(v)}"' for k, v in attrs.items())
            + ">"
            + "".join(f"<td{w}>{cell}</td>" for cell, w in zip(cells, wrap))
            + "</tr>"
            for attrs, cells in rows
        )
        ident = f' id="{table_id}"' if table_id else ""
        self.sections.append(f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def render(self) -> str:
        return _TEMPLATE.format(
            title=html.escape(self.title), subtitle=html.escape(self.subtitle), body="\n".join(self.sections)
        )


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }}
h1 {{ margin-bottom: 0.1em; }} .subtitle {{ color: #666; margin-top: 0; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
th, td {{ border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; vertical-align: top; white-space: nowrap; }}
th {{ background: #f4f4f4; }} td.l, th.l {{ text-align: left; white-space: normal; min-width: 10em; }}
tr.front td {{ background: #fff1f0; }} tr.failed td {{ color: #a00; }} tr.dense td {{ background: #eef8ee; }}
figure {{ margin: 1.5em 0; }} figure img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.9em; }} code {{ font-size: 0.85em; white-space: pre-wrap; }}
details summary {{ cursor: pointer; color: #36c; }}
</style></head>
<body><h1>{title}</h1><p class="subtitle">{subtitle}</p>
{body}
<p class="subtitle">made by <code>sparsepress report</code></p>
</body></html>
"""


def write_report(target: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Build the report of a sweep folder or a packed model folder into `out`; returns `out/index.html`."""
    target, out = Path(target), Path(out)
    if (target / DB_NAME).is_file():
        build = _sweep_page
    elif (target / MANIFEST).is_file():
        build = _folder_page
    else:
        raise InputError(
            target, f"neither a sweep folder ({DB_NAME}) nor a sparsepress model folder ({MANIFEST})"
        )
    staging = _atomic_folder(out, overwrite)
    try:
        page = build(target, staging)
        (staging / INDEX).write_text(page.render(), encoding="utf-8")
        staging.chmod(0o755)  # a report is for reading (and serving); the temp folder was private
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / INDEX


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _recipe_cell(recipe_json: str) -> str:
    pretty = json.dumps(json.loads(recipe_json), indent=1, sort_keys=True)
    return f"<details><summary>recipe</summary><code>{html.escape(pretty)}</code></details>"


def _sweep_page(sweep: Path, folder: Path) -> Page:
    from .driver import trial_folder

    store = ResultsStore.open(sweep)
    try:
        rows, meta = (
            store.rows(),
            {
                k: store.meta(k)
                for k in (
                    "model",
                    "cpu",
                    "dense_bytes",
                    "dense_perplexity",
                    "dense_user_metric",
                    "settings",
                    "source_path",
                )
            },
        )
        wall = store.wall_seconds()
    finally:
        store.close()
    done = [r for r in rows if r["status"] == "done"]
    settings = meta["settings"] or {}
    page = Page(
        folder,
        title=f"sparsepress sweep: {meta['model']}",
        subtitle=f"{len(rows)} trials ({len(done)} done, {sum(r['status'] == 'failed' for r in rows)} failed, "
        f"{sum(r['status'] in ('pending', 'running') for r in rows)} unfinished); "
        f"{wall / 60:.1f} min of wall time; CPU: {meta['cpu'] or 'unknown'}",
    )
    timed = [r for r in done if r["latency_ms"]]
    dense_ms = _median([r["dense_latency_ms"] for r in timed])
    size_front = {done[i]["trial"] for i in pareto_front([(r["size_bytes"], r["fidelity"]) for r in done])}
    latency_front = {
        timed[i]["trial"] for i in pareto_front([(r["latency_ms"], r["fidelity"]) for r in timed])
    }

    page.heading("Quality against size and latency")
    dense_size = Point("dense", float(meta["dense_bytes"]), 1.0) if meta["dense_bytes"] else None
    page.figure(
        pareto_figure(
            [Point(str(r["trial"]), float(r["size_bytes"]), r["fidelity"]) for r in done],
            dense=dense_size,
            x_label="folder size (MB, as ls -l adds it up)",
            y_label="fidelity (mean cosine to dense)",
            x_scale=1e-6,
            title="fidelity vs size",
        ),
        "pareto-size",
        "Fidelity against folder size: every trial (numbered), the Pareto front in red, "
        "the dense model as a star.",
    )
    if timed:
        latency_settings = settings.get("latency") or {}
        shape = f"batch {latency_settings.get('batch', '?')} x {latency_settings.get('seq_len', '?')} tokens"
        contended = sum(1 for r in timed if r["latency_contended"])
        page.figure(
            pareto_figure(
                [Point(str(r["trial"]), r["latency_ms"], r["fidelity"]) for r in timed],
                dense=Point("dense", dense_ms, 1.0) if dense_ms else None,
                x_label=f"latency (ms, {shape})",
                y_label="fidelity (mean cosine to dense)",
                title="fidelity vs latency",
            ),
            "pareto-latency",
            f"Fidelity against latency ({shape}), each trial timed alone on one node against the dense "
            f"model, interleaved; {contended} of {len(timed)} timings were flagged as measured under contention.",
        )
    else:
        page.paragraph("No trial has a latency yet (the sweep ran with --no-latency or is unfinished).")
    for column, label, reference, better in (
        ("perplexity", "perplexity", meta["dense_perplexity"], False),
        ("user_metric", "user metric", meta["dense_user_metric"], True),
    ):
        measured = [r for r in done if r[column] is not None]
        if measured:
            page.figure(
                pareto_figure(
                    [Point(str(r["trial"]), float(r["size_bytes"]), r[column]) for r in measured],
                    dense=Point("dense", float(meta["dense_bytes"]), reference)
                    if reference is not None and meta["dense_bytes"]
                    else None,
                    x_label="folder size (MB)",
                    y_label=label,
                    higher_is_better=better,
                    x_scale=1e-6,
                    title=f"{label} vs size",
                ),
                f"pareto-{column.replace('_', '-')}",
                f"{label.capitalize()} against folder size.",
            )

    page.heading("Every trial")
    page.paragraph(
        "Rows on a Pareto front are shaded; 'front' says which (size, latency). Fidelity is the mean "
        "cosine of pooled outputs to the dense model on held-out text, as `sparsepress eval` reports it."
    )
    headers = [
        "#",
        "front",
        "status",
        "varied",
        "size",
        "fidelity",
        "perplexity",
        "user metric",
        "latency ms",
        "dense ms",
        "speedup",
        "J / inference",
        "contention",
        "error",
        "recipe",
    ]
    table_rows: list[tuple[dict[str, str], list[str]]] = [
        (
            {"data-trial": "dense", "class": "dense"},
            [
                "dense",
                "",
                "reference",
                "dense model",
                human_bytes(meta["dense_bytes"] or 0),
                "1.0000",
                _cell(meta["dense_perplexity"], 3),
                _cell(meta["dense_user_metric"]),
                "",
                _cell(dense_ms, 2),
                "1.00x",
                _energy_cell(_median([r["dense_energy_j"] for r in timed]), timed[0]["energy_source"] if timed else None),
                "",
                "",
                "",
            ],
        )
    ]
    for r in rows:
        fronts = [
            name
            for name, members in (("size", size_front), ("latency", latency_front))
            if r["trial"] in members
        ]
        speedup = f"{r['dense_latency_ms'] / r['latency_ms']:.2f}x" if r["latency_ms"] else ""
        contention = "" if r["latency_contended"] is None else ("yes" if r["latency_contended"] else "no")
        css = "front" if fronts else ("failed" if r["status"] == "failed" else "")
        table_rows.append(
            (
                {"data-trial": str(r["trial"]), "class": css},
                [
                    str(r["trial"]),
                    ", ".join(fronts),
                    html.escape(r["status"]),
                    html.escape(r["label"]),
                    human_bytes(r["size_bytes"]) if r["size_bytes"] else "",
                    _cell(r["fidelity"]),
                    _cell(r["perplexity"], 3),
                    _cell(r["user_metric"]),
                    _cell(r["latency_ms"], 2),
                    _cell(r["dense_latency_ms"], 2),
                    speedup,
                    _energy_cell(r["energy_j"], r["energy_source"]),
                    contention,
                    html.escape(r["error"] or ""),
                    _recipe_cell(r["recipe"]),
                ],
            )
        )
    page.table(headers, table_rows, table_id=PARETO_TABLE_ID, text_columns=("varied", "error", "recipe"))

    manifests = {r["trial"]: _manifest(trial_folder(sweep, r["trial"])) for r in done}
    manifests = {k: v for k, v in manifests.items() if v is not None}
    if manifests:
        page.heading("Per layer")
        _heatmaps(
            page,
            {f"#{k} {next(r['label'] for r in rows if r['trial'] == k)}": m for k, m in manifests.items()},
        )
        page.heading("Size by tensor kind")
        bars = {f"#{k}": size_breakdown(trial_folder(sweep, k)) for k in manifests}
        dense_bars = _dense_breakdown(meta["source_path"])
        if dense_bars:
            bars = {"dense": dense_bars, **bars}
        page.figure(
            breakdown_figure(bars),
            "size-breakdown",
            "What each folder's bytes are: kept values, sparsity index (masks / indices), scales, biases, "
            "embedding codes, tensors left dense, and the config / tokenizer / manifest files.",
        )
        for k, manifest in manifests.items():
            _budget_sections(page, manifest, f"trial #{k}", f"sensitivity-{k:03d}")
    return page


def _energy_cell(joules: float | None, source: str | None) -> str:
    if joules is None:
        return ""
    return f"{joules:.3f}" + (" (estimate)" if source == "estimate" else "")


def _median(values: list[float]) -> float | None:
    import statistics

    values = [v for v in values if v]
    return statistics.median(values) if values else None


def _manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _dense_breakdown(source_path: str | None) -> dict[str, int] | None:
    """The dense source folder's weights, by dense matrices / vectors, plus the files a packed folder also carries."""
    from .source import side_files

    if not source_path or not (Path(source_path) / "model.safetensors").is_file():
        return None
    weights = Path(source_path) / "model.safetensors"
    header = read_header(weights)
    matrices = vectors = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        if len(entry["shape"]) >= 2:
            matrices += size
        else:
            vectors += size
    return {
        "dense matrices": matrices,
        "dense vectors": vectors,
        "safetensors header": weights.stat().st_size - matrices - vectors,
        "config, tokenizer, manifest": sum(len(b) for b in side_files(Path(source_path)).values()),
    }


def _heatmaps(page: Page, manifests: dict[str, dict[str, Any]]) -> None:
    views = {label: {v["name"]: v for v in layer_views(m)} for label, m in manifests.items()}
    columns = list(dict.fromkeys(name for per in views.values() for name in per))
    labels = list(views)
    sparsity = [[views[label].get(c, {}).get("sparsity", float("nan")) for c in columns] for label in labels]
    bits = [[views[label].get(c, {}).get("bits", 32) for c in columns] for label in labels]
    page.figure(
        heatmap_figure(
            labels,
            columns,
            sparsity,
            title="sparsity per layer",
            colorbar="fraction of zeros",
            vmin=0.0,
            vmax=1.0,
        ),
        "sparsity-heatmap",
        "Sparsity of every packed layer (columns) in every finished trial (rows).",
    )
    page.figure(
        heatmap_figure(
            labels,
            columns,
            bits,
            title="stored bits per value",
            colorbar="bits",
            cmap="magma",
            vmin=0,
            vmax=32,
        ),
        "bits-heatmap",
        "Bits per stored value of every packed layer and quantized embedding (32 = float32).",
    )


def _budget_sections(page: Page, manifest: dict[str, Any], what: str, name: str) -> None:
    budget = read_budget(manifest)
    sensitivity = read_sensitivity(manifest)
    if budget is None and sensitivity is None:
        return
    page.heading(f"Budget and sensitivity: {what}")
    if budget is not None:
        keys = list(dict.fromkeys([*budget["target"], *budget["achieved"]]))
        page.table(
            ["budget", "target", "achieved"],
            [
                ({}, [html.escape(k), _cell(budget["target"].get(k)), _cell(budget["achieved"].get(k))])
                for k in keys
            ],
        )
    if sensitivity is not None and sensitivity.curves:
        page.figure(
            sensitivity_figure(sensitivity.curves, metric=sensitivity.metric, title=f"sensitivity, {what}"),
            name,
            f"The allocator's sensitivity curves ({sensitivity.metric}) per layer; rings mark its choices.",
        )


def _folder_page(target: Path, folder: Path) -> Page:
    from ..io import read_manifest

    manifest = read_manifest(target)
    views = layer_views(manifest)
    breakdown = size_breakdown(target)
    total = sum(breakdown.values())
    page = Page(
        folder,
        title=f"sparsepress model folder: {target.name}",
        subtitle=f"{manifest['model_class']}; {human_bytes(total)} on disk "
        f"({human_bytes((target / TENSORS).stat().st_size)} of tensors)",
    )
    if manifest.get("recipe"):
        page.sections.append(_recipe_cell(json.dumps(manifest["recipe"])))
    page.heading("Per layer")
    if views:
        page.figure(
            layers_figure(views, title="sparsity and stored bits per layer"),
            "layers",
            "Sparsity (bars) and bits per stored value (line) of every packed layer and quantized embedding.",
        )
        page.table(
            ["layer", "format", "sparsity", "bits", "bytes"],
            [
                (
                    {"data-layer": v["name"]},
                    [
                        html.escape(v["name"]),
                        html.escape(v["format"]),
                        f"{v['sparsity']:.3f}",
                        str(v["bits"]),
                        human_bytes(v["bytes"]) if v["bytes"] else "",
                    ],
                )
                for v in views
            ],
            table_id="layer-table",
            text_columns=("layer",),
        )
    else:
        page.paragraph("This folder has no packed layers.")
    page.heading("Size by tensor kind")
    page.figure(
        breakdown_figure({target.name: breakdown}),
        "size-breakdown",
        "What the folder's bytes are, by tensor kind (they add up to the folder's size).",
    )
    page.table(
        ["kind", "bytes", "share"],
        [({}, [html.escape(k), f"{v:,}", f"{v / total:.1%}"]) for k, v in breakdown.items()],
    )
    _budget_sections(page, manifest, target.name, "sensitivity")
    return page
