"""Pareto fronts: the trials no other trial beats on both cost (size, latency) and quality.

Example:
    >>> pareto_front([(10, 0.9), (5, 0.95), (7, 0.99), (12, 0.99)])
    [1, 2]
"""

from __future__ import annotations

from typing import Sequence


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points with lowest cost (x) for their quality (y), sorted by cost.

    A point is on the front when no other point costs at most as much and is at least as good,
    being strictly better in one of the two. Equal points are all kept.

    Example:
        >>> pareto_front([(1, 5.0), (2, 4.0), (3, 6.0)], higher_is_better=False)
        [0, 1]
    """
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (cost, value) in enumerate(points):
        beaten = any(
            other_cost <= cost
            and sign * other_value >= sign * value
            and (other_cost < cost or sign * other_value > sign * value)
            for j, (other_cost, other_value) in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -sign * points[i][1]))
