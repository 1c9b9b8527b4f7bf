"""O(k) slot-list operations: uniform sampling without replacement, and removal keeping a list dense."""

from __future__ import annotations

import numpy as np


def sample_positions(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``min(k, n)`` distinct positions drawn uniformly from ``range(n)``, in random order, in O(k).

    Draws with replacement and keeps the distinct values (a uniformly random subset by symmetry),
    topping up until there are enough; when ``k`` is over half of ``n``, ``n`` is O(k) anyway.
    """
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if 2 * k > n:
        return rng.permutation(n)[:k]
    picked = np.unique(rng.integers(0, n, size=k + k // 8 + 8))
    while len(picked) < k:
        picked = np.unique(np.concatenate([picked, rng.integers(0, n, size=k - len(picked) + 8)]))
    return rng.permutation(picked)[:k]


def remove_positions(slots: np.ndarray, n: int, positions: np.ndarray) -> None:
    """Remove ``positions`` from the dense list ``slots[:n]`` in O(len(positions)), keeping it dense.

    Holes below the new end are filled with the unselected entries of the tail.
    """
    k = len(positions)
    tail = n - k
    in_tail = positions >= tail
    keep = np.ones(k, dtype=bool)
    keep[positions[in_tail] - tail] = False
    slots[positions[~in_tail]] = slots[tail:n][keep]
