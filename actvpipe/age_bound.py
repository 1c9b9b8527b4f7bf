"""An optional bound on a row's age in the buffer (``.buffer(max_age=...)``).

Uniform sampling leaves a few rows in the buffer for many turnovers (a row survives one with
probability 1/e), so the buffer holds survivors of ~ln(rows per block) buffers' worth of blocks and
a restore re-runs them all. With the bound, a row published ``max_rows`` publications ago is served
in the next batch, mixed in with uniformly drawn rows; the buffer then holds rows of the last
~``max_rows`` publications only.

Pure bookkeeping over slot numbers, O(batch) per batch: each slot's publish index, a log of slots
by publish index, and each slot's position in the buffer's list of sampleable slots.
"""

from __future__ import annotations

import numpy as np

from actvpipe.slots import sample_positions


class AgeBound:
    """Which sampleable slots are overdue, and batch positions that take them first."""

    def __init__(self, size: int, max_rows: int):
        self.max_rows = max_rows
        # A live row is at most max_rows + size + batch - 1 publications old (batch <= size), so its
        # entry outlives it.
        self.capacity = max_rows + 2 * size
        self.published_at = np.full(size, -1, dtype=np.int64)
        self.position = np.zeros(size, dtype=np.int64)
        self.log = np.zeros(self.capacity, dtype=np.int64)
        self.oldest = 0  # no live row was published before this index

    def published(self, slots: np.ndarray, first_index: int, first_position: int) -> None:
        """``slots`` became sampleable at list positions ``first_position...`` with publish indices
        ``first_index...``."""
        indices = first_index + np.arange(len(slots), dtype=np.int64)
        self.published_at[slots] = indices
        self.log[indices % self.capacity] = slots
        self.position[slots] = first_position + np.arange(len(slots), dtype=np.int64)

    def restored(self, slots: np.ndarray, indices: np.ndarray, first_position: int) -> None:
        """Restored rows, back at list positions ``first_position...`` with their saved indices."""
        self.published_at[slots] = indices
        self.log[indices % self.capacity] = slots
        self.position[slots] = first_position + np.arange(len(slots), dtype=np.int64)
        self.oldest = int(indices.min()) if len(indices) else 0

    def overdue(
        self, total_published: int, count: int, full: np.ndarray, n_full: int
    ) -> tuple[np.ndarray, int]:
        """Up to ``count`` live slots (sampleable, in ``full[:n_full]``, since the publication the log
        names) published before ``total_published - max_rows``, oldest first, and where the next
        search starts (the first live one left, or the cutoff)."""
        cutoff = total_published - self.max_rows
        found, start = [], self.oldest
        taken = 0
        while start < cutoff and taken < count:
            stop = min(cutoff, start + max(4 * count, 4096))
            indices = np.arange(start, stop, dtype=np.int64)
            slots = self.log[indices % self.capacity]
            at = self.position[slots]
            live = (self.published_at[slots] == indices) & (at < n_full)
            live[live] = full[at[live]] == slots[live]
            if taken + int(live.sum()) > count:
                last = np.flatnonzero(live)[count - taken]  # the first live one not taken
                found.append(slots[:last][live[:last]])
                return np.concatenate(found), int(indices[last])
            found.append(slots[live])
            taken += int(live.sum())
            start = stop
        over = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        return over, max(start, self.oldest)

    def positions(
        self, rng: np.random.Generator, n_full: int, over: np.ndarray, count: int, scratch: np.ndarray
    ) -> np.ndarray:
        """Distinct positions of a batch of ``min(count, n_full)``: the overdue slots' and a uniform
        draw from the other positions (in random order when any is overdue). The draw is over
        ``range(n_full - k)``, each overdue position below that bound standing for a non-overdue one
        above it."""
        k = len(over)
        taken = self.position[over]
        boundary = n_full - k
        drawn = sample_positions(rng, boundary, min(count, n_full) - k, scratch)
        holes = np.sort(taken[taken < boundary])
        if len(holes):
            fillers = np.setdiff1d(np.arange(boundary, n_full, dtype=np.int64), taken, assume_unique=True)
            at = np.minimum(np.searchsorted(holes, drawn), len(holes) - 1)
            hit = holes[at] == drawn
            drawn[hit] = fillers[at[hit]]
        out = np.concatenate([taken, drawn])
        return out[rng.permutation(len(out))] if k else out

    def removed(self, positions: np.ndarray, full: np.ndarray, n_full: int) -> None:
        """Rows left the list at ``positions`` (``remove_positions``, now ``n_full`` long): the
        positions of the slots moved into their places."""
        moved = positions[positions < n_full]
        self.position[full[moved]] = moved

    def unremoved(self, full: np.ndarray, n_full: int, n_before: int) -> None:
        """A removal was undone (the list is ``n_before`` long again): moved slots are back in the tail."""
        self.position[full[n_full:n_before]] = np.arange(n_full, n_before, dtype=np.int64)
