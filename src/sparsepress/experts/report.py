"""Routing statistics for people: a rich table per folder (`sparsepress inspect`) and a figure.

Example:
    >>> entry = {"layers": {"m.0.mlp": {"experts": 2, "top_k": 1, "kept": [0, 2], "removed": {"1": None},
    ...          "routing": {"n_tokens": 4, "tokens": [3.0, 1.0], "gate_mass": [3.0, 1.0], "reap": [0.5, 0.2],
    ...                      "coactivation": [[3.0, 0.0], [0.0, 1.0]], "top_share": [0.0] * 10}}}}
    >>> routing_table(entry).row_count
    1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def _share(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total if total else 0.0 for v in values]


def routing_table(entry: dict[str, Any]) -> Table:
    """One row per MoE layer: experts kept / removed, tokens seen, the busiest and quietest expert's share
    of the routed tokens, gate-mass spread, the most frequent expert pair, and the calibrated top_p."""
    table = Table(title="mixture of experts: routing on the calibration data")
    for column in ("MoE layer", "experts", "removed (merged into)", "tokens", "busiest", "quietest",
                   "gate mass max/min", "top pair (share)"):
        table.add_column(column, justify="left" if column in ("MoE layer", "removed (merged into)") else "right")
    for name, body in entry.get("layers", {}).items():
        routing = body.get("routing") or {}
        removed = body.get("removed") or {}
        gone = ", ".join(f"{k}" + (f"->{v}" if v is not None else "") for k, v in removed.items()) or "-"
        kept = body.get("kept") or list(range(body.get("experts", 0)))
        tokens = routing.get("tokens") or []
        if not tokens:
            table.add_row(name, str(body.get("experts")), gone, "-", "-", "-", "-", "-")
            continue
        share = _share(tokens)
        busiest = max(range(len(share)), key=share.__getitem__)
        quietest = min(range(len(share)), key=share.__getitem__)
        mass = routing.get("gate_mass") or tokens
        spread = max(mass) / min(mass) if min(mass) > 0 else float("inf")
        co = routing.get("coactivation") or []
        pairs = [(co[i][j], i, j) for i in range(len(co)) for j in range(i + 1, len(co))]
        top = max(pairs) if pairs else None
        n = max(routing.get("n_tokens", 0), 1)
        table.add_row(name, f"{body.get('experts')} (top-{body.get('top_k')})", gone, str(routing.get("n_tokens")),
                      f"#{kept[busiest]} {share[busiest]:.1%}", f"#{kept[quietest]} {share[quietest]:.1%}",
                      f"{spread:.2f}", f"#{kept[top[1]]}+#{kept[top[2]]} {top[0] / n:.1%}" if top else "-")
    return table


def routing_points_table(entry: dict[str, Any]) -> Table | None:
    """The calibrated adaptive-routing operating points (None when none were measured)."""
    points = entry.get("operating_points") or []
    if not points:
        return None
    levels = set(entry.get("levels") or [])
    table = Table(title=f"adaptive routing (top_p now {entry.get('top_p') or 'off'}; "
                        f"quality floor {entry.get('max_loss_rise')})")
    for column in ("top_p", "experts / token", "calibration loss", "rise", "offered"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(f"{p['top_p']:.2f}", f"{p['experts_per_token']:.3f}", f"{p['loss']:.4f}", f"{p['loss_rise']:+.2%}",
                      "yes" if p["top_p"] in levels else "")
    return table


def plot_routing(entry: dict[str, Any], out: str | Path) -> Path:
    """A PNG: per MoE layer, each expert's share of routed tokens and of gate mass (bars, removed experts
    shown empty) and the co-activation matrix (needs the `plot` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - the plot extra is installed in CI
        from ..errors import InputError

        raise InputError("--plot", f"needs matplotlib (pip install 'sparsepress[plot]'): {exc}") from None
    layers = [(name, body) for name, body in entry.get("layers", {}).items() if (body.get("routing") or {}).get("tokens")]
    if not layers:
        from ..errors import InputError

        raise InputError("--plot", "the folder holds no routing statistics (compress with an experts: stage)")
    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 2.6 * len(layers)), squeeze=False)
    for row, (name, body) in enumerate(layers):
        routing = body["routing"]
        kept = body.get("kept") or list(range(len(routing["tokens"])))
        removed = [int(k) for k in (body.get("removed") or {})]
        total = len(kept) + len(removed)
        tokens = dict(zip(kept, _share(routing["tokens"])))
        mass = dict(zip(kept, _share(routing["gate_mass"])))
        ids = list(range(total))
        ax = axes[row][0]
        ax.bar([i - 0.2 for i in ids], [tokens.get(i, 0.0) for i in ids], width=0.4, label="tokens")
        ax.bar([i + 0.2 for i in ids], [mass.get(i, 0.0) for i in ids], width=0.4, label="gate mass")
        for i in removed:
            ax.axvspan(i - 0.45, i + 0.45, color="0.85", zorder=0)
        ax.axhline(1.0 / max(len(kept), 1), color="0.4", linewidth=0.8, linestyle="--")
        ax.set_title(f"{name}: share per expert (grey: removed)", fontsize=9)
        ax.set_xticks(ids)
        if row == 0:
            ax.legend(fontsize=8)
        ax = axes[row][1]
        image = ax.imshow(routing["coactivation"], cmap="viridis")
        ax.set_title("co-activation (tokens)", fontsize=9)
        ax.set_xticks(range(len(kept)), [str(k) for k in kept], fontsize=7)
        ax.set_yticks(range(len(kept)), [str(k) for k in kept], fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
