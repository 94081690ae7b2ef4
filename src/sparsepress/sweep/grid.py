"""Sweep grids: a base recipe plus dotted paths to vary; every combination is one validated trial.

A grid (DESIGN section 3) is YAML with `recipe` (the base recipe), `vary` (dotted path -> list of
values; or a list of such mappings, whose products are joined, for combinations that only make sense
apart, such as N:M patterns beside unstructured sparsities) and optional `settings` (how each trial
is calibrated and measured). Numeric path segments index lists (`stages.0.prune.sparsity`); missing
mappings are created on the way (`budget.size_mb` on a recipe without a budget). Every combination is
validated as a Recipe before anything runs; a mistake raises one GridError naming the dotted path.

Example:
    >>> grid = expand_grid({
    ...     "recipe": {"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}}]},
    ...     "vary": {"stages.0.prune.method": ["magnitude", "wanda"], "stages.0.prune.sparsity": [0.5, 0.7]},
    ... })
    >>> [t.label for t in grid.trials]
    ['method=magnitude sparsity=0.5', 'method=magnitude sparsity=0.7', 'method=wanda sparsity=0.5', 'method=wanda sparsity=0.7']
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import GridError, InputError, RecipeError
from ..recipe import Recipe

_STRICT = ConfigDict(extra="forbid", frozen=True)
GRID_KEYS = ("recipe", "vary", "settings")


class LatencySettings(BaseModel):
    """The batch every trial is timed on (against the dense model, interleaved) and how many rounds.

    Example:
        >>> LatencySettings().batch, LatencySettings().seq_len
        (1, 128)
    """

    model_config = _STRICT
    batch: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=1)
    rounds: int = Field(10, ge=1)


class SweepSettings(BaseModel):
    """How each trial is calibrated, evaluated, timed and scheduled (grid key `settings`).

    `samples` / `seq_len`: calibration windows as in `sparsepress compress`. `eval_samples` /
    `eval_seq_len`: held-out windows as in `sparsepress eval`. `latency: null` skips timing.
    `cpus` / `memory_gb`: what each trial declares to Ray (`memory_gb: null` estimates it from the
    model's size). `user_metric`: `module:function` called as `function(model, reference)` on the
    loaded compressed model and the dense one, returning a float (higher is better).

    Example:
        >>> SweepSettings(samples=16).eval_samples
        64
    """

    model_config = _STRICT
    samples: int = Field(128, ge=1)
    seq_len: int = Field(128, ge=8)
    eval_samples: int = Field(64, ge=1)
    eval_seq_len: int = Field(128, ge=8)
    latency: LatencySettings | None = Field(default_factory=LatencySettings)
    cpus: float = Field(1.0, gt=0)
    memory_gb: float | None = Field(None, gt=0)
    user_metric: str | None = None


@dataclass(frozen=True)
class Trial:
    """One point of the grid: its index, the validated recipe, the values varied and a stable key.

    Example:
        >>> t = Trial(0, Recipe.model_validate({"stages": [{"quantize": {}}]}), {"stages.0.quantize.bits": 8}, "bits=8")
        >>> len(t.key)
        16
    """

    index: int
    recipe: Recipe
    values: dict[str, Any]
    label: str

    @property
    def recipe_json(self) -> str:
        """The recipe as canonical JSON (sorted keys): what results.csv records."""
        return json.dumps(self.recipe.to_dict(), sort_keys=True)

    @property
    def key(self) -> str:
        """A short hash of the recipe: a resumed sweep must find the same keys in the same order."""
        return hashlib.sha256(self.recipe_json.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Grid:
    """An expanded grid: the distinct trials in order, the settings, and the varied paths."""

    trials: list[Trial]
    settings: SweepSettings
    paths: list[str]
    combinations: int


def load_grid(path: str | Path) -> Grid:
    """Read and expand a grid YAML file; InputError naming the file when it cannot be read.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "g.yaml")
        >>> _ = open(p, "w").write("recipe: {stages: [{quantize: {method: rtn}}]}\\nvary: {stages.0.quantize.bits: [8, 4]}\\n")
        >>> len(load_grid(p).trials)
        2
    """
    return expand_grid(read_grid_text(path))


def read_grid_text(path: str | Path) -> dict[str, Any]:
    """The parsed YAML mapping of a grid file (not yet validated)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; expected a grid YAML file")
    if not path.is_file():
        raise InputError(path, "grid file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read grid: {exc}") from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise GridError("<top level>", f"a mapping with keys {', '.join(GRID_KEYS)} ({path})")
    return data


def expand_grid(data: dict[str, Any]) -> Grid:
    """Validate a grid mapping and expand it into distinct trials (first occurrence of a recipe kept).

    Example:
        >>> expand_grid({"recipe": {"stages": [{"quantize": {}}]}, "vary": {}}).combinations
        1
    """
    unknown = [key for key in data if key not in GRID_KEYS]
    if unknown:
        raise GridError(str(unknown[0]), f"unknown top-level key; known keys: {', '.join(GRID_KEYS)}")
    base = data.get("recipe")
    if not isinstance(base, dict):
        raise GridError("recipe", "a mapping: the base recipe (stages, budget, format, solver, seed)")
    _validate(base, "recipe", {})
    settings = _settings(data.get("settings") or {})
    blocks = _blocks(data.get("vary"))
    paths = list(dict.fromkeys(path for block in blocks for path in block))
    names = short_names(paths)
    trials: list[Trial] = []
    seen: set[str] = set()
    combinations = 0
    for block in blocks:
        for values in itertools.product(*block.values()):
            combinations += 1
            chosen = dict(zip(block, values))
            raw = copy.deepcopy(base)
            for path, value in chosen.items():
                set_path(raw, path, value)
            recipe = _validate(raw, "vary", chosen)
            label = " ".join(f"{names[p]}={_show(v)}" for p, v in chosen.items()) or "base recipe"
            trial = Trial(len(trials), recipe, chosen, label)
            if trial.key not in seen:
                seen.add(trial.key)
                trials.append(trial)
    return Grid(trials=trials, settings=settings, paths=paths, combinations=combinations)


def _settings(raw: Any) -> SweepSettings:
    if not isinstance(raw, dict):
        raise GridError("settings", f"a mapping of {', '.join(SweepSettings.model_fields)}")
    try:
        settings = SweepSettings.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise GridError(f"settings.{where}", error["msg"]) from None
    if settings.user_metric is not None:
        load_callable(settings.user_metric)
    return settings


def _blocks(vary: Any) -> list[dict[str, list[Any]]]:
    if vary is None:
        return [{}]
    raw_blocks = vary if isinstance(vary, list) else [vary]
    blocks = []
    for index, block in enumerate(raw_blocks):
        where = f"vary[{index}]" if isinstance(vary, list) else "vary"
        if not isinstance(block, dict):
            raise GridError(where, "a mapping of dotted recipe paths to lists of values")
        for path, values in block.items():
            if not isinstance(path, str) or not path:
                raise GridError(
                    f"{where}.{path}",
                    "keys are dotted paths into the recipe, such as stages.0.prune.sparsity",
                )
            if not isinstance(values, list) or not values:
                raise GridError(f"{where}.{path}", f"a non-empty list of values to try, got {values!r}")
        blocks.append(block)
    return blocks


def set_path(recipe: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at dotted `path` in a recipe mapping, in place; GridError naming the path when it cannot.

    Example:
        >>> r = {"stages": [{"prune": {"sparsity": 0.5}}]}
        >>> set_path(r, "stages.0.prune.sparsity", 0.7); set_path(r, "budget.size_mb", 12); r
        {'stages': [{'prune': {'sparsity': 0.7}}], 'budget': {'size_mb': 12}}
    """
    parts = path.split(".")
    node: Any = recipe
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not re.fullmatch(r"\d+", part):
                raise GridError(
                    f"vary.{path}",
                    f"'{'.'.join(parts[:depth]) or path}' is a list; index it with a number, not {part!r}",
                )
            if int(part) >= len(node):
                raise GridError(
                    f"vary.{path}",
                    f"'{'.'.join(parts[:depth])}' has {len(node)} entries; index {part} is out of range",
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if _is_stage_entry(node, parts[:depth]) and part not in node:
                kind = next(iter(node))
                raise GridError(
                    f"vary.{path}", f"'{'.'.join(parts[:depth])}' is a {kind!r} stage, not {part!r}"
                )
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise GridError(
                f"vary.{path}",
                f"'{'.'.join(parts[:depth])}' holds the value {node!r}, not a mapping or list "
                f"(cannot reach {where!r})",
            )


def _is_stage_entry(node: dict[str, Any], parents: list[str]) -> bool:
    return len(parents) == 2 and parents[0] == "stages" and len(node) == 1


def _validate(raw: dict[str, Any], where: str, chosen: dict[str, Any]) -> Recipe:
    """A Recipe from `raw`, or GridError naming the varied path that broke it (or the combination)."""
    try:
        return Recipe.model_validate(raw)
    except RecipeError as exc:
        field, problem = exc.field, str(exc)
    except ValidationError as exc:
        from ..recipe import _first_error

        error = _first_error(exc)
        field, problem = error.field, str(error)
    dotted = _dotted(field)
    if not chosen:
        raise GridError(f"{where}.{dotted}", problem)
    culprit = next(
        (p for p in chosen if dotted == p or dotted.startswith(p + ".") or p.startswith(dotted + ".")), None
    )
    others = ", ".join(f"{p}={_show(v)}" for p, v in chosen.items() if p != culprit)
    if culprit is None:
        raise GridError("vary", f"the combination {others} makes an invalid recipe: {problem}")
    context = f" (with {others})" if others else ""
    raise GridError(f"vary.{culprit}", f"value {_show(chosen[culprit])}{context}: {problem}")


def _dotted(field: str) -> str:
    """A recipe error's field (`stages[0].prune.sparsity`) as a grid path (`stages.0.prune.sparsity`)."""
    return re.sub(r"\[(\d+)\]", r".\1", field).lstrip(".")


def short_names(paths: list[str]) -> dict[str, str]:
    """The shortest trailing part of each path (numbers skipped) that no other path ends with.

    Example:
        >>> short_names(["stages.1.quantize.bits", "stages.2.quantize_embeddings.bits", "format"])
        {'stages.1.quantize.bits': 'quantize.bits', 'stages.2.quantize_embeddings.bits': 'quantize_embeddings.bits', 'format': 'format'}
    """
    words = {path: [p for p in path.split(".") if not p.isdigit()] or [path] for path in paths}
    names = {}
    for path, parts in words.items():
        for width in range(1, len(parts) + 1):
            name = ".".join(parts[-width:])
            if all(other == path or ".".join(words[other][-width:]) != name for other in paths):
                break
        names[path] = name
    return names


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def load_callable(spec: str) -> Callable[..., Any]:
    """The function named `module:function`; GridError naming it when it cannot be imported.

    Example:
        >>> load_callable("math:sqrt")(4.0)
        2.0
    """
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise GridError("settings.user_metric", f"{spec!r} is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise GridError("settings.user_metric", f"cannot import {module_name!r}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise GridError("settings.user_metric", f"{module_name!r} has no callable {name!r}")
    return function
