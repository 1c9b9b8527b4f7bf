"""One pass (or the rest of a saved one): its shared buffer, generator processes, ledger and restore.

The trainer publishes written rows per the mixing policy, draws batches, and hands freed slots back
to the sources. Every wait is a bounded poll that checks the generators between two sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from actvpipe.generator import MAX_WAIT, GeneratorError, GeneratorRun
from actvpipe.ledger import Ledger
from actvpipe.loader_state import tokens_digest
from actvpipe.mixing import Mixing, Observed
from actvpipe.resume import ResumePlan, order_slots
from actvpipe.shm import OPS, HeaderSnapshot, SharedBlock, TrainerView
from actvpipe.spec import GeneratorOptions, RowSource


class PassRun:
    """Starts one process per source on a fresh buffer. With ``saved_order`` (the saved buffer's row
    keys in order), each source first regenerates exactly its saved rows, which become sampleable in
    the saved order before anything else."""

    def __init__(
        self,
        sources: Sequence[RowSource],
        options: GeneratorOptions,
        mixing: Mixing,
        plans: Sequence[ResumePlan],
        frontiers: Sequence[int],
        published: Sequence[int],
        batches: int = 0,
        saved_order: np.ndarray | None = None,
        saved_tokens: str | None = None,
        saved_published: np.ndarray | None = None,
        *,
        progress_timeout: float,
    ):
        """``progress_timeout``: seconds a wait for rows may pass without any source producing one
        before it raises ``GeneratorError`` (a generator alive but stuck)."""
        self.mixing, self.progress_timeout, self.saved_tokens = mixing, progress_timeout, saved_tokens
        self.saved_published = saved_published
        self.sources, self.n_sources = list(sources), len(sources)
        dtype, row_shape = sources[0].dtype, sources[0].row_shape
        self._restore_counts = [len(plan.buffered) for plan in plans]
        # While restoring, each source gets exactly its saved rows' slots, so none can take another's.
        caps = self._restore_counts if saved_order is not None else mixing.initial_caps(tuple(published))
        # Where each source starts, for a state saved before it writes.
        starts = [tuple(int(v) for v in plan.blocks[-1]) for plan in plans]
        block = SharedBlock.create(mixing.size, row_shape, dtype, len(sources))
        try:
            self.buffer = TrainerView(block)
            self.ledger = Ledger(
                self.buffer,
                list(caps),
                list(frontiers),
                list(published),
                batches,
                saved_order,
                starts,
                mixing.max_age_rows,
            )
            self.generators = GeneratorRun(sources, options, self.buffer, plans)  # it owns the block now
        except BaseException:
            block.unlink()
            raise
        self.used = False

    def check_alive(self) -> None:
        self.generators.check_alive()

    def close(self) -> None:
        self.generators.close()

    def wait(self, ready: Callable[[], bool]) -> None:
        """Poll ``ready`` until it holds, checking the generators between two sleeps: a failure, a
        death, or no row from any of them for ``progress_timeout`` seconds raises."""
        if ready():  # the usual case, and the cheapest
            return
        backoff, seen = 1e-4, self._progress()
        quiet_since = time.monotonic()
        while not ready():
            self.check_alive()
            now = self._progress()
            if now != seen:
                seen, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since > self.progress_timeout:
                raise GeneratorError(self._stuck_message())
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_WAIT)

    def _progress(self) -> tuple[int, ...]:
        """Rows each source wrote and computed: any change is progress."""
        header = self.buffer.block.snapshot()
        return (*header.per_source("written"), *header.per_source("computed"))

    def _stuck_message(self) -> str:
        doing = []
        for k, source in enumerate(self.sources):
            if self.buffer.done(k):
                continue
            what = "HDF5 files" if source.from_disk else "the model over its data"
            operation = self.buffer.operation(k)
            if operation == OPS[0]:
                operation += " (reading its data or running the model)"
            doing.append(f"source {k} ({what}) was {operation}")
        return (
            f"the actvpipe generator made no progress for {self.progress_timeout:g} s: {'; '.join(doing)}. "
            "A dataset whose reads hang or a model that never returns does this; if a block really "
            "takes longer (a huge model on the CPU), pass a larger .buffer(progress_timeout=...)"
        )

    def finish_restore(self) -> None:
        """Place the regenerated buffered rows (each source writes them first) in the saved order."""
        ledger = self.ledger
        if ledger.counts.saved_order is None:
            return
        for k, count in enumerate(self._restore_counts):
            self.wait(lambda k=k, count=count: ledger.pending(k) >= count or self.buffer.done(k))

        def place(slots: np.ndarray) -> np.ndarray:
            meta = self.buffer.meta_of(slots)
            keys = meta["row_id"] * self.n_sources + meta["source"]
            ordered = order_slots(slots, keys, ledger.counts.saved_order)
            if tokens_digest(self.buffer.meta_of(ordered)["token_ids"]) != self.saved_tokens:
                raise RuntimeError(
                    "load_state_dict: the regenerated rows hold other tokens than the saved ones at the "
                    "same positions; the data changed since the state was saved (where its fingerprint, "
                    "a file's size, modification time and first and last MiB, does not look)"
                )
            return ordered

        ledger.publish_restored(self._restore_counts, place, self.saved_published)
        ledger.caps = list(self.mixing.initial_caps(ledger.counts.pass_published))
        ledger.grant()

    def top_up(self) -> tuple[bool, bool]:
        """Publish what the policy allows, and hand out freed slots unless a batch can be served:
        (ready to serve, every source done with nothing left to publish)."""
        ledger, buffer = self.ledger, self.buffer
        ledger.mirror()
        done = tuple(buffer.done(k) for k in range(self.n_sources))  # first: rows are pushed, then done
        pending = tuple(ledger.pending(k) for k in range(self.n_sources))
        decision = self.mixing.decide(Observed(ledger.fill(), pending, done, ledger.counts.pass_published))
        ledger.caps = list(decision.caps)
        if decision.allowances is not None:
            for k, allowance in enumerate(decision.allowances):
                ledger.publish(k, min(allowance, pending[k]))
        ready = ledger.fill() >= self.mixing.min_fill
        if not ready:  # when ready, the sampler hands freed slots out after its gather
            ledger.grant()
        finished = all(done) and all(ledger.pending(k) == 0 for k in range(self.n_sources))
        return ready, finished

    def snapshot(self) -> RunSnapshot:
        """The run as monitoring sees it: one copy of the shared header, and the processes to measure."""
        pids = [p.pid for p in self.generators.processes if p.pid is not None]
        return RunSnapshot(self.buffer.block.snapshot(), pids)


@dataclass(frozen=True)
class RunSnapshot:
    """A run at one instant: its shared header and its generator processes."""

    header: HeaderSnapshot
    generator_pids: list[int]
