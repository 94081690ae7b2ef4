"""The report's figures, drawn with matplotlib's object API (no pyplot state) and written as PNG.

Every function takes plain data and returns a `matplotlib.figure.Figure`; `save_png` writes one.
matplotlib is in the `plot` extra.

Example:
    >>> import tempfile
    >>> fig = pareto_figure([Point("0", 2e6, 0.99), Point("1", 1e6, 0.95)], dense=Point("dense", 4e6, 1.0),
    ...                     x_label="size (MB)", y_label="fidelity", x_scale=1e-6)
    >>> save_png(fig, tempfile.mkdtemp() + "/p.png").stat().st_size > 1000
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .pareto import pareto_front

DPI = 110
FRONT_COLOR = "#d62728"
POINT_COLOR = "#1f77b4"
DENSE_COLOR = "#2ca02c"
KIND_COLORS = {
    "weight values": "#1f77b4",
    "sparsity index": "#ff7f0e",
    "quantization scales": "#9467bd",
    "biases": "#8c564b",
    "embedding codes": "#17becf",
    "dense matrices": "#7f7f7f",
    "dense vectors": "#bcbd22",
    "safetensors header": "#e377c2",
    "config, tokenizer, manifest": "#c7c7c7",
}


def _figure(width: float = 7.5, height: float = 4.8) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        from ..errors import InputError

        raise InputError("report", "figures need matplotlib: pip install 'sparsepress[plot]'") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(figure: Any, path: str | Path) -> Path:
    """Write `figure` as a PNG at `path`; returns the path."""
    path = Path(path)
    figure.savefig(path, format="png", dpi=DPI)
    return path


@dataclass(frozen=True)
class Point:
    """A labelled (cost, quality) point: a trial or the dense model."""

    label: str
    cost: float
    quality: float


def pareto_figure(
    points: Sequence[Point],
    *,
    dense: Point | None,
    x_label: str,
    y_label: str,
    higher_is_better: bool = True,
    x_scale: float = 1.0,
    title: str = "",
) -> Any:
    """Every trial as a dot, the Pareto front highlighted and joined, the dense model as a star."""
    fig = _figure()
    ax = fig.add_subplot()
    front = set(pareto_front([(p.cost, p.quality) for p in points], higher_is_better))
    others = [p for i, p in enumerate(points) if i not in front]
    on_front = sorted((points[i] for i in front), key=lambda p: p.cost)
    ax.scatter(
        [p.cost * x_scale for p in others],
        [p.quality for p in others],
        s=28,
        color=POINT_COLOR,
        alpha=0.75,
        label="trial",
        zorder=3,
    )
    if on_front:
        ax.plot(
            [p.cost * x_scale for p in on_front],
            [p.quality for p in on_front],
            "-o",
            color=FRONT_COLOR,
            markersize=7,
            linewidth=1.5,
            label="Pareto front",
            zorder=4,
        )
    for p in points:
        ax.annotate(
            p.label, (p.cost * x_scale, p.quality), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    if dense is not None:
        ax.scatter(
            [dense.cost * x_scale],
            [dense.quality],
            marker="*",
            s=220,
            color=DENSE_COLOR,
            edgecolor="black",
            linewidth=0.6,
            label="dense model",
            zorder=5,
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label + ("" if higher_is_better else " (lower is better)"))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def heatmap_figure(
    rows: Sequence[str],
    columns: Sequence[str],
    values: Sequence[Sequence[float]],
    *,
    title: str,
    colorbar: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Any:
    """A trials x layers heatmap (e.g. sparsity, bits), layer names along the bottom."""
    import numpy as np

    matrix = np.array(values, dtype=float)
    fig = _figure(width=min(16.0, 3.0 + 0.22 * len(columns)), height=min(14.0, 2.6 + 0.28 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=7)
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=90, fontsize=6)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar, shrink=0.8)
    return fig


def breakdown_figure(bars: dict[str, dict[str, int]], *, title: str = "size by tensor kind") -> Any:
    """Horizontal stacked bars: one per folder, segments per tensor kind, in MB."""
    kinds = [k for k in KIND_COLORS if any(k in parts for parts in bars.values())]
    fig = _figure(width=8.5, height=min(14.0, 1.8 + 0.32 * len(bars)))
    ax = fig.add_subplot()
    labels = list(bars)
    left = [0.0] * len(labels)
    for kind in kinds:
        widths = [bars[label].get(kind, 0) / 1e6 for label in labels]
        ax.barh(labels, widths, left=left, color=KIND_COLORS[kind], label=kind, height=0.7)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("MB (10^6 bytes), as ls -l adds them up")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def layers_figure(views: Sequence[dict[str, Any]], *, title: str) -> Any:
    """One folder's layers: sparsity bars, and stored bits as a line on a second axis."""
    fig = _figure(width=min(16.0, 3.5 + 0.22 * len(views)), height=4.8)
    ax = fig.add_subplot()
    names = [v["name"] for v in views]
    ax.bar(range(len(views)), [v["sparsity"] for v in views], color=POINT_COLOR, label="sparsity")
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_xticks(range(len(views)), labels=names, rotation=90, fontsize=6)
    bits = ax.twinx()
    bits.plot(
        range(len(views)), [v["bits"] for v in views], "o-", color=FRONT_COLOR, markersize=3, label="bits"
    )
    bits.set_ylabel("stored bits per value")
    bits.set_ylim(0, 33)
    ax.set_title(title)
    return fig


def sensitivity_figure(curves: Sequence[dict[str, Any]], *, metric: str, title: str) -> Any:
    """The allocator's sensitivity curves: one panel per option, one line per layer, chosen points ringed."""
    from matplotlib import colormaps

    options = list(dict.fromkeys(str(c.get("option", "")) for c in curves))
    layers = list(dict.fromkeys(str(c["layer"]) for c in curves))
    cmap = colormaps["viridis"]
    fig = _figure(width=min(16.0, 4.2 * len(options) + 1.5), height=4.4)
    axes = fig.subplots(1, len(options), squeeze=False)[0]
    for ax, option in zip(axes, options):
        for curve in (c for c in curves if str(c.get("option", "")) == option):
            color = cmap(layers.index(str(curve["layer"])) / max(1, len(layers) - 1))
            xs, ys = zip(*curve["points"]) if curve["points"] else ((), ())
            ax.plot(xs, ys, "-", color=color, linewidth=1, alpha=0.85)
            chosen = curve.get("chosen")
            if chosen is not None and chosen in xs:
                ax.plot(
                    [chosen],
                    [ys[xs.index(chosen)]],
                    "o",
                    markerfacecolor="none",
                    markeredgecolor="black",
                    markersize=6,
                )
        ax.set_title(option or "sensitivity", fontsize=9)
        ax.set_xlabel(str(next((c.get("x") for c in curves if str(c.get("option", "")) == option), "x")))
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(0, max(1, len(layers) - 1)), cmap=cmap)
    fig.colorbar(mappable, ax=list(axes), label="layer (in model order)", shrink=0.8)
    fig.suptitle(title)
    return fig
