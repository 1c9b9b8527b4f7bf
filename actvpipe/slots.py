"""O(k) slot-list operations: uniform sampling without replacement, and removal keeping a list dense."""

from __future__ import annotations

import numpy as np


def sample_positions(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``min(k, n)`` distinct positions drawn uniformly from ``range(n)``, in random order, in O(k):
    numpy's sampling without replacement uses a hash set when ``k`` is small next to ``n`` and a
    partial shuffle otherwise (then ``n`` is O(k))."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(n, min(k, n), replace=False).astype(np.int64, copy=False)


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
