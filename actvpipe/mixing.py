"""How rows from several sources become sampleable: a pure policy, tested on its own.

Source 0 is the live stream; source 1, when present, reads HDF5 files. The trainer observes each
source's counts and asks the policy how many written rows to publish from each now (``allowances``)
and how many slots each may hold handed out but unpublished (``caps``, so that no source can take
the slots another needs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Observed:
    """What the trainer sees before publishing: sampleable rows, and per source the rows written but
    unpublished, whether it finished, and the rows published from it so far in the pass."""

    fill: int
    pending: tuple[int, ...]
    done: tuple[bool, ...]
    published: tuple[int, ...]


@dataclass(frozen=True)
class Decision:
    """Rows to publish from each source now (None: wait for more), and each source's cap."""

    allowances: tuple[int, ...] | None
    caps: tuple[int, ...]


@dataclass(frozen=True)
class Mixing:
    """The mixing policy of one buffer.

    Default: every written row is published at once. With a disk source, disk rows fill the buffer
    first (no live row is published until ``min(disk_rows, min_fill)`` disk rows are, the live
    source leaving them room), then make up at most ``fraction`` of the published rows beyond that
    warm-up (all the disk delivers when ``fraction`` is None). Deterministic: each top-up to
    ``min_fill`` takes exactly each source's share, waiting for it, so timing never changes which
    rows a batch is drawn from.
    """

    size: int
    min_fill: int
    n_sources: int = 1
    fraction: float | None = None
    deterministic: bool = False
    disk_rows: int = 0
    max_age_rows: int | None = None  # rows published before a row is served first (``AgeBound``)

    def initial_caps(self, published: tuple[int, ...]) -> tuple[int, ...]:
        """Caps for a run starting with ``published`` rows already published in the pass."""
        if self.n_sources == 1:
            return (self.size,)
        if self.deterministic:
            return self._deterministic_caps(self._shares(self.min_fill, published))
        disk = self.size if self.fraction is None else max(1, self.size // 4)
        return (self.size - self._warmup_left(published), disk)

    def decide(self, seen: Observed) -> Decision:
        if self.deterministic:
            return self._decide_deterministic(seen)
        if self.n_sources == 1:
            return Decision((self.size,), (self.size,))
        return self._decide_free(seen)

    def _warmup_left(self, published: tuple[int, ...]) -> int:
        """Disk rows still due before any live row is published."""
        return max(0, min(self.disk_rows, self.min_fill) - published[1])

    def _disk_quota(self, published_total: int, disk_published: int) -> int:
        """Disk rows still due: ``fraction`` of all rows published, beyond the warm-up fill."""
        return int(self.fraction * published_total) + self.min_fill - disk_published

    def _decide_free(self, seen: Observed) -> Decision:
        caps = self.initial_caps(seen.published)
        if not seen.done[1] and self._warmup_left(seen.published) > 0:
            live = 0
        else:
            live, caps = self.size, (self.size, caps[1])
        live_now = min(live, seen.pending[0])
        if self.fraction is None or (seen.done[0] and seen.pending[0] == live_now):
            disk = self.size
        elif seen.fill + live_now < self.min_fill and seen.pending[1] >= self.size - seen.fill - live_now:
            disk = self.size  # disk rows hold every slot not yet sampleable: yield rather than stall
        else:
            disk = self._disk_quota(sum(seen.published) + live_now, seen.published[1])
        return Decision((live, max(0, disk)), caps)

    def _shares(self, need: int, published: tuple[int, ...]) -> list[int]:
        """How many of the next ``need`` published rows each source gives."""
        if self.n_sources == 1:
            return [need]
        disk = min(need, max(0, self._disk_quota(sum(published) + need, published[1])))
        return [need - disk, disk]

    def _deterministic_caps(self, shares: list[int]) -> tuple[int, ...]:
        """Each share plus half the slots beyond the warm-up fill: the caps sum to at most the
        slots not sampleable, so each source can hold its share at once."""
        return tuple(share + (self.size - self.min_fill) // 2 for share in shares)

    def _decide_deterministic(self, seen: Observed) -> Decision:
        shares = self._shares(max(0, self.min_fill - seen.fill), seen.published)
        if self.n_sources == 1:
            return Decision(tuple(shares), (self.size,))
        for k in (0, 1):  # a finished source's shortfall passes to the other
            short = shares[k] - seen.pending[k]
            if seen.done[k] and short > 0:
                shares[k], shares[1 - k] = shares[k] - short, shares[1 - k] + short
        caps = self._deterministic_caps(shares)
        if any(not seen.done[k] and seen.pending[k] < share for k, share in enumerate(shares)):
            return Decision(None, caps)
        return Decision(tuple(shares), caps)
