"""O(batch) slot-list operations: uniform sampling without replacement, and removal keeping a list dense."""

from __future__ import annotations

import numpy as np


def sample_positions(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``min(count, n)`` distinct positions drawn uniformly from ``range(n)``, in random order, in
    O(count): numpy's sampling without replacement uses a hash set when ``count`` is small next to
    ``n`` and a partial shuffle otherwise (then ``n`` is O(count))."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(n, min(count, n), replace=False).astype(np.int64, copy=False)


def remove_positions(slots: np.ndarray, n: int, positions: np.ndarray) -> None:
    """Remove ``positions`` from the dense list ``slots[:n]`` in O(len(positions)), keeping it dense.

    Holes below the new end are filled with the unselected entries of the tail.
    """
    count = len(positions)
    tail = n - count
    in_tail = positions >= tail
    keep = np.ones(count, dtype=bool)
    keep[positions[in_tail] - tail] = False
    slots[positions[~in_tail]] = slots[tail:n][keep]
