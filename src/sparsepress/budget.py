"""Budgets turned into a per-layer allocation: each Linear's sparsity, pattern and bits, each embedding
table's bits, chosen to meet a size, latency and/or fidelity budget with the least predicted loss.

Every choosable thing is an `Item` with, per option, its bytes (the packed format's exact size on a
synthetic weight of that shape), its latency (the real kernel timed on this machine at the budget's
batch x seq_len) and its predicted fidelity loss (`sparsepress.sensitivity`, summed over items). A
configuration's size is the items' bytes plus what is never compressed; its latency is the items'
kernel time plus the rest of a forward (measured once with every targeted Linear doing nothing).

`allocate` solves the multiple-choice knapsack by Lagrangian relaxation (one multiplier per violated
constraint, found by bisection), then repairs any remaining violation greedily and spends what is
left of the budget on the moves that lower the objective most. The objective is the predicted loss,
or the size when only `min_fidelity` (and perhaps a latency) is asked.

Example:
    >>> items = [Item("a", ["big", "small"], size=[10, 4], latency=[0.0, 0.0], loss=[0.0, 0.2]),
    ...          Item("b", ["big", "small"], size=[10, 4], latency=[0.0, 0.0], loss=[0.0, 0.05])]
    >>> problem = Problem(items, fixed_bytes=0, fixed_ms=0.0)
    >>> [items[i].options[o] for i, o in enumerate(allocate(problem, Limits(size=14)))]
    ['big', 'small']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SparsepressError


class BudgetError(SparsepressError, ValueError):
    """A budget that no allowed configuration meets (names the closest reachable figure).

    Example:
        >>> str(BudgetError("size_mb", 5.0, "the smallest reachable is 7.20 MB"))
        'budget size_mb = 5 cannot be met: the smallest reachable is 7.20 MB'
    """

    def __init__(self, target: str, value: float, why: str):
        self.target, self.value, self.why = target, value, why
        super().__init__(f"budget {target} = {value:g} cannot be met: {why}")


@dataclass
class Item:
    """One thing the allocator chooses for (a Linear layer or an embedding table), per option."""

    name: str
    options: list[str]
    size: list[int]
    latency: list[float]
    loss: list[float]


@dataclass(frozen=True)
class Limits:
    """Upper bounds: bytes of the tensors file, forward ms, predicted fidelity loss (None: no bound)."""

    size: float | None = None
    latency: float | None = None
    loss: float | None = None


@dataclass
class Problem:
    """Items plus what every configuration holds and spends anyway."""

    items: list[Item]
    fixed_bytes: int
    fixed_ms: float
    minimize: str = "loss"  # or "size"

    def totals(self, choice: Sequence[int]) -> dict[str, float]:
        """size (bytes), latency (ms) and loss (predicted) of a choice of one option index per item."""
        return {
            "size": self.fixed_bytes + sum(item.size[o] for item, o in zip(self.items, choice)),
            "latency": self.fixed_ms + sum(item.latency[o] for item, o in zip(self.items, choice)),
            "loss": sum(item.loss[o] for item, o in zip(self.items, choice)),
        }

    def extreme(self, what: str) -> float:
        """The lowest total of `what` any configuration reaches."""
        fixed = {"size": self.fixed_bytes, "latency": self.fixed_ms, "loss": 0.0}[what]
        return fixed + sum(min(getattr(item, what)) for item in self.items)


_LIMITED = ("size", "latency", "loss")


def _violation(totals: dict[str, float], limits: Limits) -> float:
    # relative excess over each bound, summed (bounds are in different units)
    out = 0.0
    for what in _LIMITED:
        bound = getattr(limits, what)
        if bound is not None and totals[what] > bound:
            out += (totals[what] - bound) / max(abs(bound), 1e-12)
    return out


def _pick(problem: Problem, weights: dict[str, float]) -> list[int]:
    choice = []
    for item in problem.items:
        objective = getattr(item, problem.minimize)
        costs = [objective[o] + sum(w * getattr(item, what)[o] for what, w in weights.items())
                 for o in range(len(item.options))]
        choice.append(min(range(len(costs)), key=lambda o: (costs[o], objective[o])))
    return choice


def _scales(problem: Problem) -> dict[str, float]:
    # normalise each resource so one multiplier range fits all
    out = {}
    for what in ("size", "latency", "loss"):
        spread = sum(max(getattr(i, what)) - min(getattr(i, what)) for i in problem.items)
        out[what] = spread if spread > 0 else 1.0
    return out


def _lagrangian(problem: Problem, limits: Limits) -> list[int]:
    scale = _scales(problem)
    objective_spread = scale[problem.minimize]
    active = [w for w in _LIMITED if getattr(limits, w) is not None and w != problem.minimize]
    weights = {w: 0.0 for w in active}
    for _ in range(4):  # coordinate passes: each multiplier the smallest that meets its own bound
        for what in active:
            bound = getattr(limits, what)
            unit = objective_spread / scale[what]
            low, high = 0.0, unit
            def meets(value: float) -> bool:
                return problem.totals(_pick(problem, {**weights, what: value}))[what] <= bound
            while not meets(high) and high < unit * 1e9:
                high *= 4
            if not meets(high):
                weights[what] = high
                continue
            for _ in range(50):
                middle = (low + high) / 2
                low, high = (low, middle) if meets(middle) else (middle, high)
            weights[what] = high
    return _pick(problem, weights)


def _moves(problem: Problem, choice: list[int], totals: dict[str, float]):
    """Every single-item change of `choice`: (item, option, totals after it)."""
    for i, item in enumerate(problem.items):
        now = choice[i]
        for o in range(len(item.options)):
            if o != now:
                yield i, o, {what: totals[what] + getattr(item, what)[o] - getattr(item, what)[now]
                             for what in _LIMITED}


def _repair(problem: Problem, choice: list[int], limits: Limits) -> list[int]:
    """Greedy moves that lower the total violation most per objective added, until none is left."""
    choice = list(choice)
    totals = problem.totals(choice)
    while _violation(totals, limits) > 0:
        now = _violation(totals, limits)
        best, best_rate = None, -math.inf
        for i, o, trial in _moves(problem, choice, totals):
            gain = now - _violation(trial, limits)
            if gain > 0:
                rate = gain / max(trial[problem.minimize] - totals[problem.minimize], 1e-12)
                if rate > best_rate:
                    best, best_rate = (i, o, trial), rate
        if best is None:
            break
        choice[best[0]], totals = best[1], best[2]
    return choice


def _improve(problem: Problem, choice: list[int], limits: Limits) -> list[int]:
    """Greedy moves that lower the objective while every bound still holds."""
    choice = list(choice)
    totals = problem.totals(choice)
    while True:
        best, best_gain = None, 1e-15
        for i, o, trial in _moves(problem, choice, totals):
            gain = totals[problem.minimize] - trial[problem.minimize]
            if gain > best_gain and _violation(trial, limits) == 0:
                best, best_gain = (i, o, trial), gain
        if best is None:
            return choice
        choice[best[0]], totals = best[1], best[2]


def allocate(problem: Problem, limits: Limits) -> list[int] | None:
    """One option index per item meeting every bound of `limits` with the least objective, or None when the
    predictions say no configuration meets them (see the module example)."""
    choice = _improve(problem, _repair(problem, _lagrangian(problem, limits), limits), limits)
    return choice if _violation(problem.totals(choice), limits) == 0 else None


# --- what the items cost -------------------------------------------------------------------------------


def embedding_bytes(rows: int, dim: int, bits: int) -> int:
    """Bytes of a row-wise quantized table (codes + one float32 scale per row), or fp32 for bits 32.

    Example:
        >>> embedding_bytes(10, 4, 8), embedding_bytes(10, 5, 4), embedding_bytes(10, 4, 32)
        (80, 70, 160)
    """
    if bits == 32:
        return rows * dim * 4
    return rows * (dim if bits == 8 else (dim + 1) // 2) + rows * 4


@dataclass
class SyntheticLayers:
    """Packed synthetic weights of the shapes and options a model needs (size and latency lookups), made once."""

    group_sizes: dict[int, int | None]
    _packs: dict[tuple[int, int, object], object] = field(default_factory=dict)

    def packed(self, shape: tuple[int, int], option: object) -> object:
        key = (shape[0], shape[1], option)
        if key not in self._packs:
            self._packs[key] = synthetic_pack(shape, option, self.group_sizes)
        return self._packs[key]


def synthetic_pack(shape: tuple[int, int], option: object, group_sizes: dict[int, int | None]) -> object:
    """A random weight of `shape` pruned and quantized as `option` (a `sensitivity.LayerOption`), packed
    in the option's format: what a real layer of that shape and option costs in bytes and time.

    Example:
        >>> from sparsepress.sensitivity import LayerOption
        >>> synthetic_pack((8, 64), LayerOption(0.5, "unstructured", 8), {8: None}).nbytes  # mask 64 + values 256 + scales 32
        352
    """
    from .formats import FORMATS
    from .prune.masks import MaskSpec, select_mask
    from .recipe import Pattern

    generator = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    weight = torch.randn(shape, generator=generator)
    pattern = Pattern.parse(option.pattern)  # type: ignore[attr-defined]
    params: dict[str, int] = {}
    if option.sparsity > 0:  # type: ignore[attr-defined]
        spec = MaskSpec(pattern.kind, option.sparsity, pattern.n, pattern.m)  # type: ignore[attr-defined]
        weight = weight * select_mask(weight.abs(), spec)
        if pattern.kind == "nm":
            params = {"n": int(pattern.n), "m": int(pattern.m)}  # type: ignore[arg-type]
    bits = option.bits  # type: ignore[attr-defined]
    return FORMATS[option.format].pack(weight, dtype=f"int{bits}", group_size=group_sizes.get(bits), **params)  # type: ignore[attr-defined]


def kernel_ms(packs: Sequence[object], rows: int, rounds: int = 7) -> list[float]:
    """Median ms of the native kernel of each packed weight on `rows` random input rows (timed round-robin)."""
    from . import kernels
    from .evaluate import interleaved_ms

    runs = {}
    for index, packed in enumerate(packs):
        x = torch.randn(rows, packed.shape[1])  # type: ignore[attr-defined]
        runs[str(index)] = (lambda p, xx: (lambda: kernels.packed_linear(xx, p)))(packed, x)
    with torch.inference_mode():
        times = interleaved_ms(runs, rounds=rounds, warmup=1)
    for packed in packs:
        kernels.release_plan(packed)  # type: ignore[arg-type]
    return [times[str(i)] for i in range(len(packs))]


class NullLinear(nn.Module):
    """Stands in for a Linear when timing the rest of a forward: zeros of the right shape, no work."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def overhead_ms(model: nn.Module, names: Sequence[str], batch: int, seq_len: int, rounds: int = 7) -> float:
    """Median ms of a forward of `batch` x `seq_len` tokens with the Linears `names` doing nothing (on a copy)."""
    import copy

    from .attention import use_native_attention
    from .evaluate import median_ms
    from .models import replace_module

    twin = copy.deepcopy(model).eval()
    for name in names:
        replace_module(twin, name, NullLinear(twin.get_submodule(name).out_features))
    use_native_attention(twin)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000) or 1000)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run() -> None:
        with torch.inference_mode():
            twin(**inputs)

    return median_ms(run, repeats=rounds, warmup=2)
