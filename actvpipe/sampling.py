"""The node that samples batches of uniformly random rows from the shared buffer of the current pass."""

from __future__ import annotations

from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from actvpipe.batches import Batch, Batching, TokenBatch
from actvpipe.ledger import Counts, Draw
from actvpipe.loader_state import BufferState
from actvpipe.outputs import BatchMemory
from actvpipe.pass_run import PassRun
from actvpipe.passes import Passes


class BufferSampler(BaseNode[Batch]):
    """Draws batches of uniformly random sampleable rows from the pass ``passes`` runs, and gathers
    them (with their provenance when ``with_tokens``). Its state is a ``BufferState``.

    A batch is committed (its rows leave the buffer) only once the whole chain has handed it on:
    ``commit()``, which the loader calls after the last node returned; a failure anywhere before
    that is undone by ``roll_back()``, as if the batch had never been drawn. The next draw or a
    state read commits a batch nobody rolled back.
    """

    def __init__(self, passes: Passes, batching: Batching, memory: BatchMemory, seed: int):
        super().__init__()
        self.passes, self.batching, self.memory, self.seed = passes, batching, memory, seed
        self._rng = np.random.default_rng()
        self._pending: tuple[Draw, Counts] | None = None  # a drawn batch, and the ledger before it

    @property
    def run(self) -> PassRun:
        return self.passes.run

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._pending = None
        self.passes.start(initial_state)
        if initial_state is None:  # a pass's RNG depends on its number alone
            self._rng = np.random.default_rng([self.seed, self.passes.pass_number])
        else:
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = BufferState.from_dict(initial_state).rng

    def _ready(self) -> bool:
        ready, finished = self.run.top_up()
        if ready:
            return True
        if finished:
            fill = self.run.ledger.fill()
            if fill == 0 or (self.batching.drop_last and fill < self.batching.size):
                raise StopIteration
            return True
        return False

    def next(self) -> Batch:
        self.commit()
        run = self.run
        run.used = True
        run.check_alive()  # a failure surfaces now, not once the buffered rows run out
        run.finish_restore()
        run.wait(self._ready)
        rng_state = self._rng.bit_generator.state
        try:
            draw = run.ledger.draw(self.batching.size, self._rng)
            batch = self._gather(draw.slots)
            run.ledger.grant()  # freed slots go back after the gather, so the refill does not slow it
        except BaseException:
            self._rng.bit_generator.state = rng_state
            raise
        self._pending = draw, run.ledger.counts
        return batch

    def _gather(self, slots: np.ndarray) -> Batch:
        buffer = self.run.buffer
        acts = buffer.gather(slots, self.memory.take(len(slots)))
        if not self.batching.with_tokens:
            return acts
        return TokenBatch(acts, **buffer.provenance(slots))

    def commit(self) -> None:
        """The batch last drawn reached the training loop: its rows leave the buffer. (Their slots
        go back to the generators at the next draw: nothing that could raise may follow this.)"""
        if self._pending is not None:
            self.run.ledger.remove(self._pending[0])  # the ledger's own commit: all or nothing
            self._pending = None

    def roll_back(self) -> None:
        """The batch last drawn never reached the training loop: its rows stay, the RNG goes back
        (unless the commit had already happened when the interruption came)."""
        if self._pending is not None:
            draw, before = self._pending
            self._pending = None
            if self.run is not None and self.run.ledger.counts is before:
                self._rng.bit_generator.state = draw.rng_state

    def get_state(self) -> dict[str, Any]:
        self.commit()
        counts, ledger = self.run.ledger.counts, self.run.ledger
        if counts.saved_order is not None:  # nothing served since the restore: the state restored
            return self.passes.started_for
        return BufferState.capture(
            rng=self._rng.bit_generator.state,
            pass_number=self.passes.pass_number,
            batches=counts.batches,
            published=list(counts.pass_published),
            frontiers=list(counts.frontiers),
            buffered_meta=ledger.full_meta(),
            continuations=ledger.continuations(),
            published_at=ledger.published_indices(),
        ).to_dict()
