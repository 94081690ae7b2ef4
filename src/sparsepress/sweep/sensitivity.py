"""The manifest keys a budgeted compression leaves for the report: `budget` and `sensitivity`.

This is the contract between the budget allocator (which writes them into `sparsepress.json`) and
`sparsepress report` (which draws them); both are optional and the report leaves its budget section
out when they are absent. Shapes (docs/sweeps.md has the full text):

    "budget": {"target": {"size_mb": 12.0}, "achieved": {"size_mb": 11.93, "fidelity": 0.962}}
    "sensitivity": {
      "metric": "fidelity loss",                  # y axis: what the allocator predicts, lower is better
      "curves": [{"layer": "encoder.layer.0.attention.self.query",   # a Linear (or embedding) name
                  "option": "unstructured int8",  # one panel per option (pattern / bits combination)
                  "x": "sparsity",                # what varies along the curve
                  "points": [[0.3, 0.0004], [0.5, 0.0012], [0.7, 0.0051]],
                  "chosen": 0.5}]                 # the x the allocator picked for this layer, or null
    }

Example:
    >>> m = {"sensitivity": {"metric": "loss", "curves": [{"layer": "a", "option": "int8", "x": "sparsity",
    ...                                                     "points": [[0.5, 0.1], [0.7, 0.3]], "chosen": 0.5}]}}
    >>> read_sensitivity(m).curves[0]["points"]
    [(0.5, 0.1), (0.7, 0.3)]
    >>> read_sensitivity({}) is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FormatError

BUDGET_KEY = "budget"
SENSITIVITY_KEY = "sensitivity"


@dataclass(frozen=True)
class Sensitivity:
    """Validated sensitivity curves from a manifest."""

    metric: str
    curves: list[dict[str, Any]]


def read_sensitivity(manifest: dict[str, Any], where: str = "sparsepress.json") -> Sensitivity | None:
    """The manifest's sensitivity curves, None when it has none; FormatError naming the file if malformed."""
    raw = manifest.get(SENSITIVITY_KEY)
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("curves"), list):
        raise FormatError(
            where, f"'{SENSITIVITY_KEY}' must be a mapping with a list 'curves' (see docs/sweeps.md)"
        )
    curves = []
    for index, curve in enumerate(raw["curves"]):
        try:
            points = [(float(x), float(y)) for x, y in curve["points"]]
            chosen = curve.get("chosen")
            curves.append(
                {
                    "layer": str(curve["layer"]),
                    "option": str(curve.get("option", "")),
                    "x": str(curve.get("x", "sparsity")),
                    "points": points,
                    "chosen": None if chosen is None else float(chosen),
                }
            )
        except (KeyError, TypeError, ValueError):
            raise FormatError(
                where, f"'{SENSITIVITY_KEY}.curves[{index}]' needs 'layer' and 'points' as [[x, y], ...]"
            ) from None
    return Sensitivity(metric=str(raw.get("metric", "predicted loss")), curves=curves)


def read_budget(manifest: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The manifest's budget record ({'target': ..., 'achieved': ...}), or the recipe's budget alone, or None.

    Example:
        >>> read_budget({"recipe": {"budget": {"size_mb": 12}}})
        {'target': {'size_mb': 12}, 'achieved': {}}
    """
    raw = manifest.get(BUDGET_KEY)
    if isinstance(raw, dict):
        return {"target": dict(raw.get("target") or {}), "achieved": dict(raw.get("achieved") or {})}
    recipe_budget = (manifest.get("recipe") or {}).get("budget")
    if isinstance(recipe_budget, dict):
        return {"target": dict(recipe_budget), "achieved": {}}
    return None
