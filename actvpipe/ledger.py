"""The trainer's side of the shared buffer: which slots are full, pooled, or handed to each source.

Every change is prepared where nothing reads it yet and then committed by one assignment of an
immutable ``Counts``, so an exception at any point (a ``KeyboardInterrupt`` included) leaves the
ledger as it was before or as it is after, never in between. The counters the generators and the
monitor read are copied into the shared header after each commit (``mirror``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from actvpipe.age_bound import AgeBound
from actvpipe.shm import TrainerView, fence
from actvpipe.slots import remove_positions, sample_positions


class Counts(NamedTuple):
    """The trainer's counters, per source where a tuple (a named tuple: replaced on every batch,
    several times faster than a frozen dataclass)."""

    n_full: int  # sampleable slots: full[:n_full]
    pool: int  # slots not handed out: pool[:pool], plus the never-used slots [fresh, size)
    fresh: int
    granted: tuple[int, ...]  # free-ring entries handed to each source
    published: tuple[int, ...]  # FIFO entries taken from each source (this run)
    pass_published: tuple[int, ...]  # rows published from each source in the whole pass
    frontiers: tuple[int, ...]  # one past the id of each source's latest published row
    served: int
    batches: int
    oldest: int = 0  # the age bound's search start (see ``AgeBound.overdue``)
    saved_order: np.ndarray | None = None  # the saved buffer's row keys in order, until its rows are back


def initial_grants(caps: list[int], size: int) -> list[int]:
    """Slots each source gets before it starts: its cap, the last source first, as far as they go."""
    grants, left = [0] * len(caps), size
    for k in reversed(range(len(caps))):
        grants[k] = max(0, min(caps[k], left))
        left -= grants[k]
    return grants


@dataclass(frozen=True)
class Draw:
    """A batch's slots, drawn but not yet removed, and how to put the sampler back if serving fails."""

    slots: np.ndarray
    positions: np.ndarray
    rng_state: dict[str, Any]
    oldest: int = 0


class Ledger:
    """The trainer's bookkeeping of one run's buffer; ``caps[k]`` bounds the slots source ``k`` holds
    (handed out and not yet published)."""

    def __init__(
        self,
        buffer: TrainerView,
        caps: list[int],
        frontiers: list[int],
        pass_published: list[int],
        batches: int = 0,
        saved_order: np.ndarray | None = None,
        next_blocks: list[tuple[int, int, int]] | None = None,
        max_age_rows: int | None = None,
    ):
        """``next_blocks``: where each source starts (seq, record, offset), what a state saved before it
        writes anything records. ``max_age_rows``: the age bound, if any (see ``AgeBound``)."""
        self.buffer = buffer
        self.caps = list(caps)
        n = buffer.n_sources
        next_blocks = next_blocks or [(0, 0, 0)] * n
        grants = initial_grants(self.caps, buffer.size)
        base = 0
        for k in reversed(range(n)):
            buffer.start_source(k, grants[k], base, next_blocks[k])
            base += grants[k]
        self.pool = np.empty(buffer.size, dtype=np.int64)  # pages are touched only as slots return
        self.scratch = np.empty(buffer.size, dtype=np.int32)  # for ``sample_positions``
        self.age = None if max_age_rows is None else AgeBound(buffer.size, max_age_rows)
        self.counts = Counts(
            n_full=0,
            pool=0,
            fresh=base,
            granted=tuple(grants),
            published=(0,) * n,
            pass_published=tuple(pass_published),
            frontiers=tuple(frontiers),
            served=0,
            batches=batches,
            saved_order=saved_order,
        )

    def _commit(self, **changes: Any) -> None:
        self.counts = self.counts._replace(**changes)
        self.mirror()

    def mirror(self) -> None:
        """Copy the counters other processes read into the shared header."""
        c = self.counts
        self.buffer.mirror(c.n_full, c.served, c.published, c.granted)

    def pending(self, source: int) -> int:
        """Rows the source wrote that are not yet published."""
        return self.buffer.written(source) - self.counts.published[source]

    def fill(self) -> int:
        return self.counts.n_full

    def publish(self, source: int, max_rows: int) -> int:
        """Make up to ``max_rows`` of the source's oldest written rows sampleable; returns how many."""
        c = self.counts
        n = max(0, min(max_rows, self.pending(source)))
        if n == 0:
            return 0
        slots = self.buffer.written_slots(source, c.published[source], n)
        self.buffer.full[c.n_full : c.n_full + n] = slots
        if self.age is not None:
            self.age.published(slots, sum(c.pass_published), c.n_full)
        frontier = int(self.buffer.meta["row_id"][slots[-1]]) + 1  # generation order: the last is newest
        self._commit(
            n_full=c.n_full + n,
            published=_plus(c.published, source, n),
            pass_published=_plus(c.pass_published, source, n),
            frontiers=_with(c.frontiers, source, frontier),
        )
        return n

    def publish_restored(self, counts: list[int], place: Any, published_at: np.ndarray | None) -> None:
        """Make the first ``counts[k]`` rows of each source sampleable in the order ``place(slots)``
        gives (the restored buffer's order), with their saved publish indices (for the age bound).
        They were buffered before the save: no frontier moves."""
        c = self.counts
        slots = np.concatenate(
            [self.buffer.written_slots(k, c.published[k], n) for k, n in enumerate(counts)]
        )
        ordered = place(slots)
        self.buffer.full[c.n_full : c.n_full + len(ordered)] = ordered
        oldest = c.oldest
        if self.age is not None:
            self.age.restored(ordered, published_at, c.n_full)
            oldest = self.age.oldest
        published = tuple(p + n for p, n in zip(c.published, counts, strict=True))
        self._commit(n_full=c.n_full + len(ordered), published=published, saved_order=None, oldest=oldest)

    def draw(self, n: int, rng: np.random.Generator) -> Draw:
        """Pick up to ``n`` uniformly random full slots (nothing changes until ``remove``)."""
        c, state = self.counts, rng.bit_generator.state
        if self.age is None:
            positions = sample_positions(rng, c.n_full, n, self.scratch)
            return Draw(self.buffer.full[positions], positions, state)
        self.age.oldest = c.oldest
        over, oldest = self.age.overdue(sum(c.pass_published), min(n, c.n_full), self.buffer.full, c.n_full)
        positions = self.age.positions(rng, c.n_full, over, n, self.scratch)
        return Draw(self.buffer.full[positions], positions, state, oldest)

    def remove(self, draw: Draw) -> None:
        """Take a drawn batch's slots out of the full list into the pool (the rows were copied out).

        The commit is the last statement: once it has run, the batch counts as served. The shared
        header catches up at the next ``mirror``.
        """
        c = self.counts
        n = len(draw.slots)
        self.pool[c.pool : c.pool + n] = draw.slots
        try:
            remove_positions(self.buffer.full, c.n_full, draw.positions)  # one store into the list
            if self.age is not None:
                self.age.removed(draw.positions, self.buffer.full, c.n_full - n)
            served, batches, oldest = c.served + n, c.batches + 1, max(c.oldest, draw.oldest)
            self.counts = c._replace(
                n_full=c.n_full - n, pool=c.pool + n, served=served, batches=batches, oldest=oldest
            )
        except BaseException:
            if self.counts is c:  # interrupted before the commit: put the drawn slots back
                self.buffer.full[draw.positions] = draw.slots
                if self.age is not None:
                    self.age.unremoved(self.buffer.full, c.n_full - n, c.n_full)
            raise

    def grant(self) -> None:
        """Hand pooled slots to each source up to its cap, the last source first; take back the
        unused slots of sources that finished."""
        for k in reversed(range(self.buffer.n_sources)):
            if self.buffer.done(k):
                self._reclaim(k)
                continue
            c = self.counts
            room = self.caps[k] - (c.granted[k] - c.published[k])
            n = min(room, c.pool + self.buffer.size - c.fresh)
            if n <= 0:
                continue
            from_pool = min(n, c.pool)
            slots = np.concatenate(
                [self.pool[c.pool - from_pool : c.pool], np.arange(c.fresh, c.fresh + n - from_pool)]
            )
            self.buffer.hand_out(k, c.granted[k], slots)
            self._commit(
                pool=c.pool - from_pool, fresh=c.fresh + n - from_pool, granted=_plus(c.granted, k, n)
            )

    def _reclaim(self, k: int) -> None:
        c = self.counts
        claimed = self.buffer.claimed(k)
        unused = c.granted[k] - claimed
        if unused <= 0:
            return
        fence()
        slots = self.buffer.free_slots(k, claimed, unused)
        self.pool[c.pool : c.pool + unused] = slots
        self._commit(pool=c.pool + unused, granted=_with(c.granted, k, claimed))

    def full_meta(self) -> dict[str, np.ndarray]:
        """Provenance of every sampleable row, in the full list's order."""
        return self.buffer.meta_of(self.buffer.full[: self.counts.n_full])

    def published_indices(self) -> np.ndarray | None:
        """Publish index of every sampleable row, in the full list's order (with an age bound)."""
        if self.age is None:
            return None
        return self.age.published_at[self.buffer.full[: self.counts.n_full]]

    def continuations(self) -> list[tuple[int, int, int]]:
        return [self.buffer.continuation(k, self.counts.published[k]) for k in range(self.buffer.n_sources)]


def _plus(values: tuple[int, ...], k: int, n: int) -> tuple[int, ...]:
    return _with(values, k, values[k] + n)


def _with(values: tuple[int, ...], k: int, value: int) -> tuple[int, ...]:
    return (*values[:k], value, *values[k + 1 :])
