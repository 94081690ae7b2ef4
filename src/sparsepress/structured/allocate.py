"""Which units each block keeps, given their scores: the same count in every block (`uniform`), or the
globally least important units wherever they are (`sensitivity`: scores normalised by their block's
mean, so blocks of different scale compare; every block keeps at least one unit).

Example:
    >>> import torch
    >>> scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([4.0, 1.0, 1.0, 1.0])]
    >>> kept_units(scores, 0.5, "uniform")
    [[2, 3], [0, 1]]
    >>> kept_units(scores, 0.5, "sensitivity")
    [[1, 2, 3], [0]]
"""

from __future__ import annotations

import torch


def removed_count(total: int, fraction: float) -> int:
    """Whole units removed out of `total` for `fraction`, rounded, leaving at least one.

    Example:
        >>> removed_count(12, 1 / 3), removed_count(2, 0.9)
        (4, 1)
    """
    return min(int(round(total * fraction)), total - 1)


def _top(scores: torch.Tensor, count: int) -> list[int]:
    # Stable order: ties keep the lower index, so the choice is deterministic.
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:count])


def kept_units(scores: list[torch.Tensor], fraction: float, allocation: str) -> list[list[int]]:
    """The kept unit indices of every block (see the module example)."""
    if allocation == "uniform":
        return [_top(s, len(s) - removed_count(len(s), fraction)) for s in scores]
    if allocation != "sensitivity":
        raise ValueError(f"allocation {allocation!r}: uniform | sensitivity")
    normalised = [s.double() / s.double().mean().clamp(min=1e-30) for s in scores]
    total = sum(len(s) for s in scores)
    drop = removed_count(total, fraction)
    ranked = sorted(((float(v), b, i) for b, s in enumerate(normalised) for i, v in enumerate(s)))
    left = [len(s) for s in scores]
    removed: set[tuple[int, int]] = set()
    for _value, block, index in ranked:
        if len(removed) == drop:
            break
        if left[block] > 1:
            removed.add((block, index))
            left[block] -= 1
    return [[i for i in range(len(s)) if (b, i) not in removed] for b, s in enumerate(scores)]
