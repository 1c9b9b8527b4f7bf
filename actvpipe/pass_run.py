"""One pass (or the rest of a saved one): its shared buffer, generator processes, ledger and restore.

The trainer publishes written rows per the mixing policy, draws batches, and hands freed slots back
to the sources. Every wait is a bounded poll that checks the generators between two sleeps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from actvpipe.generator import MAX_WAIT, PAUSE_VARIABLE, GeneratorRun, Source
from actvpipe.ledger import Ledger
from actvpipe.mixing import Mixing, Observed
from actvpipe.resume import ResumePlan, order_slots
from actvpipe.shm import NEXT_BLOCK, SharedRowBuffer


class PassRun:
    """Starts one process per source on a fresh buffer. With ``restore`` (the saved buffer's row keys
    in order), each source first regenerates exactly its saved rows, which become sampleable in the
    saved order before anything else."""

    def __init__(
        self,
        sources: Sequence[Source],
        mixing: Mixing,
        plans: Sequence[ResumePlan],
        frontiers: Sequence[int],
        published: Sequence[int],
        batches: int = 0,
        restore: np.ndarray | None = None,
    ):
        self.mixing = mixing
        self.n_sources = len(sources)
        pause = float(os.environ.get(PAUSE_VARIABLE, 0))
        dtype, row_shape = sources[0].dtype, sources[0].row_shape
        self.buffer = SharedRowBuffer.create(mixing.size, row_shape, dtype, len(sources), pause)
        self._restore_counts = [len(plan.buffered) for plan in plans]
        # While restoring, each source gets exactly its saved rows' slots, so none can take another's.
        caps = self._restore_counts if restore is not None else mixing.initial_caps(tuple(published))
        try:
            self.ledger = Ledger(self.buffer, list(caps), list(frontiers), list(published), batches, restore)
            for k, plan in enumerate(plans):  # where each source starts, for a state saved before it writes
                for field, value in zip(NEXT_BLOCK, plan.blocks[-1], strict=True):
                    self.buffer.set(field, int(value), k)
            self.generators = GeneratorRun(sources, self.buffer, plans)  # from here on it owns the block
        except BaseException:
            self.buffer.unlink()
            raise
        self.used = False

    def check_alive(self) -> None:
        self.generators.check_alive()

    def close(self) -> None:
        self.generators.close()

    def wait(self, ready: Callable[[], bool]) -> None:
        backoff = 1e-4
        while not ready():
            self.check_alive()
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_WAIT)

    def finish_restore(self) -> None:
        """Place the regenerated buffered rows (each source writes them first) in the saved order."""
        ledger = self.ledger
        if ledger.counts.restore is None:
            return
        for k, count in enumerate(self._restore_counts):
            self.wait(lambda k=k, count=count: ledger.pending(k) >= count or self.buffer.done(k))

        def place(slots: np.ndarray) -> np.ndarray:
            meta = self.buffer.meta_of(slots)
            return order_slots(slots, meta["row_id"] * self.n_sources + meta["source"], ledger.counts.restore)

        ledger.publish_restored(self._restore_counts, place)
        ledger.caps = list(self.mixing.initial_caps(ledger.counts.pass_published))
        ledger.grant()

    def top_up(self) -> tuple[bool, bool]:
        """Publish what the policy allows and hand out freed slots: (ready to serve, every source done
        with nothing left to publish)."""
        ledger, buffer = self.ledger, self.buffer
        ledger.mirror()
        done = tuple(buffer.done(k) for k in range(self.n_sources))  # first: rows are pushed, then done
        pending = tuple(ledger.pending(k) for k in range(self.n_sources))
        decision = self.mixing.decide(Observed(ledger.fill(), pending, done, ledger.counts.pass_published))
        ledger.caps = list(decision.caps)
        if decision.allowances is not None:
            for k, allowance in enumerate(decision.allowances):
                ledger.publish(k, min(allowance, pending[k]))
        ledger.grant()
        finished = all(done) and all(ledger.pending(k) == 0 for k in range(self.n_sources))
        return ledger.fill() >= self.mixing.min_fill, finished

    def serve(self, k: int, rng: np.random.Generator, gather: Callable[[np.ndarray], Any]) -> Any:
        """Draw up to ``k`` uniformly random sampleable rows and return ``gather(slots)``. If anything
        raises, the rows stay buffered and ``rng`` is put back: as if no batch had been drawn. Their
        slots go back to the sources at the next ``top_up``."""
        ledger = self.ledger
        before = ledger.counts
        draw = ledger.draw(k, rng)
        try:
            out = gather(draw.slots)
            ledger.remove(draw)
        except BaseException:
            if ledger.counts is before:
                rng.bit_generator.state = draw.rng_state
            raise
        return out
