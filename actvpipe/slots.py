"""O(batch) slot-list operations: uniform sampling without replacement, and removal keeping a list dense."""

from __future__ import annotations

import numpy as np


def sample_positions(
    rng: np.random.Generator, n: int, count: int, scratch: np.ndarray | None = None
) -> np.ndarray:
    """``min(count, n)`` distinct positions drawn uniformly from ``range(n)``, in random order, in
    O(count).

    With ``scratch`` (an integer array of at least ``n`` entries, its contents unused) and ``count``
    small next to ``n``: independent uniform draws, each repeat drawn again until none is left,
    found through ``scratch`` without a sort or a hash set. Which of two equal draws is drawn again
    depends on their places in the batch, never on their values, so every set of ``count``
    positions is equally likely. Otherwise numpy's sampling without replacement."""
    count = min(count, n)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if scratch is None or count * 4 > n:
        return rng.choice(n, count, replace=False).astype(np.int64, copy=False)
    picked = rng.integers(0, n, count, dtype=np.int64)
    places = np.arange(count, dtype=scratch.dtype)
    while True:
        scratch[picked] = places  # of equal draws, one place is stored
        repeated = scratch[picked] != places
        if not repeated.any():
            return picked
        picked[repeated] = rng.integers(0, n, int(repeated.sum()), dtype=np.int64)


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
