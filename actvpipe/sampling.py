"""The node that serves batches of uniformly random buffered rows, and what a batch with provenance holds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchdata.nodes import BaseNode

from actvpipe.cache import compute_stats
from actvpipe.generator import GeneratorRun
from actvpipe.resume import ResumePlan, check_fingerprint, make_state, order_slots, plans_from_state
from actvpipe.spec import Hdf5Spec, StreamSpec
from actvpipe.stats import ActivationStats, Normalization


@dataclass
class TokenBatch:
    """A batch with provenance: ``acts[i]`` came from token ``token_ids[i]`` at position ``pos[i]`` of
    context ``seq[i]`` (the global index of the packed context), produced by ``source[i]`` (0: the
    stream itself, 1: the HDF5 files mixed in with ``.buffer(hdf5=...)``)."""

    acts: torch.Tensor
    token_ids: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor
    source: torch.Tensor

    def __len__(self) -> int:
        return len(self.acts)


@dataclass(frozen=True)
class Batching:
    """How batches are cut and handed out: ``.batch()``'s arguments."""

    size: int
    drop_last: bool = False
    with_tokens: bool = False
    reuse: bool = False
    pin_memory: bool = False

    @property
    def preallocated(self) -> bool:
        """Gather into two preallocated tensors in turn (``reuse``, implied by ``pin_memory``)."""
        return self.reuse or self.pin_memory


class BufferBatcher(BaseNode):
    """Serves batches of uniformly random buffered rows from running generators, with exact state.

    Each ``reset`` without state starts a fresh pass (new generators) unless the current one has not
    served anything yet, so ``start()`` followed by iteration uses the started generators. The
    trainer publishes each source's written rows into the sampleable set: all at once by default;
    for a second (disk) source at ``fraction`` of the published rows, beyond the warm-up fill; in
    deterministic mode exactly up to the fill threshold, so which rows a batch is drawn from never
    depends on timing.
    """

    def __init__(
        self,
        sources: Sequence[StreamSpec | Hdf5Spec],
        size: int,
        batching: Batching,
        min_fill: int,
        fraction: float | None = None,
        normalize: str | None = None,
        stats_rows: int = 100_000,
    ):
        super().__init__()
        self.sources = list(sources)
        self.size = size
        self.batching = batching
        self.min_fill = max(min_fill, batching.size)
        self.fraction = fraction
        self.normalize, self.stats_rows = normalize, stats_rows
        self._outputs: list[torch.Tensor] = []
        self.normalization: Normalization | None = None
        self._stats: ActivationStats | None = None
        self.deterministic = self.sources[0].deterministic
        self.run = None
        self._started_with: dict | None = None
        self._pass = 0

    def fingerprint(self) -> dict[str, Any]:
        out = dict(self.sources[0].fingerprint())
        for k, source in enumerate(self.sources[1:], 1):
            out.update({f"source{k}.{key}": v for key, v in source.fingerprint().items()})
        return {
            **out,
            "buffer_size": self.size,
            "min_fill": self.min_fill,
            "hdf5_fraction": self.fraction,
            "normalize": self.normalize,
            "stats_rows": self.stats_rows if self.normalize else None,
        }

    def stats(self) -> ActivationStats:
        """Statistics of the first ``stats_rows`` rows of the (first source's) pass, computed once."""
        if self._stats is None:
            self._stats = compute_stats(self.sources[0], self.stats_rows)
        return self._stats

    def caps(self) -> list[int]:
        """Rows each source may hold written but unpublished: a rationed disk source gets a quarter.

        Deterministic mixing waits for each source's exact share, so each may hold its share plus half
        the slots beyond the warm-up fill: then neither can take the slots the other's share needs.
        """
        if self.deterministic and len(self.sources) > 1:
            return self._deterministic_caps(self._shares(self.min_fill))
        disk = [self.size if self.fraction is None else max(1, self.size // 4)] * (len(self.sources) - 1)
        return [self.size - self._disk_warmup_left(), *disk]

    def _disk_warmup_left(self) -> int:
        """Disk rows still due before any live row is published: disk rows fill the buffer first.
        Until then the live source leaves them room (its cap), so neither can block the other."""
        if len(self.sources) == 1:
            return 0
        target = min(sum(f.rows for f in self.sources[1].files), self.min_fill)
        return max(0, target - self._published[1])

    def _deterministic_caps(self, shares: list[int]) -> list[int]:
        return [share + (self.size - self.min_fill) // 2 for share in shares]

    def _disk_quota(self, extra: int = 0) -> int:
        """Disk rows still due: ``fraction`` of all rows published (and ``extra``), beyond a warm-up fill."""
        return int(self.fraction * (sum(self._published) + extra)) + self.min_fill - self._published[1]

    def _shares(self, need: int) -> list[int]:
        """How many of the next ``need`` published rows each source gives, in deterministic mode."""
        if len(self.sources) == 1:
            return [need]
        disk = min(need, max(0, self._disk_quota(need)))
        return [need - disk, disk]

    def start(self, state: dict | None = None) -> None:
        """Launch generators for the next pass (or for the rest of a saved one) unless ones started for
        the same (or no) state wait unused."""
        if self.run is not None and not self.run.used and state is self._started_with:
            return
        self.close()
        self._started_with = state
        if state is None and self.normalize and self.normalization is None:
            self.normalization = Normalization.from_stats(self.normalize, self.stats())
        if state is None:
            self._pass += 1
            plans, self._restoring = [ResumePlan.fresh() for _ in self.sources], None
            self._rng = np.random.default_rng([self.sources[0].seed, self._pass])
            self._batches = 0
            self._frontiers, self._published = [0] * len(self.sources), [0] * len(self.sources)
        else:
            check_fingerprint(state["fingerprint"], self.fingerprint())
            plans, order = plans_from_state(state)
            self._restoring = (state, order, [len(p.buffered) for p in plans])
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = state["rng"]
            self._pass, self._batches = state["pass"], state["batches"]
            self._frontiers, self._published = list(state["frontiers"]), list(state["published"])
            saved = state["normalization"]
            self.normalization = None if saved is None else Normalization.from_state(saved)
        # While restoring, each source writes exactly its regenerated rows (then waits), so no source
        # can take the slots another needs for its own; ``_finish_restore`` lifts the caps.
        caps = self.caps() if state is None else [len(plan.buffered) for plan in plans]
        self.run = GeneratorRun(self.sources, self.size, plans, caps)

    def close(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.start(initial_state)

    def _wait(self, ready) -> None:
        backoff = 1e-4
        while not ready():
            self.run.check_alive()
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.005)

    def _finish_restore(self) -> None:
        """Place the regenerated buffered rows (each source writes them first) in the saved order."""
        _, order, counts = self._restoring
        buffer = self.run.buffer
        # Every source's rows first, then pop: a popped source may write again, into slots another needs.
        for k, count in enumerate(counts):
            self._wait(lambda k=k, count=count: buffer.pending(k) >= count or buffer.done(k))
        slots = np.concatenate([buffer.pop_written(count, k) for k, count in enumerate(counts)])
        meta = buffer.meta_of(slots)
        keys = meta["row_id"] * len(self.sources) + meta["source"]
        buffer.append_full(order_slots(slots, keys, order))
        for k, cap in enumerate(self.caps()):
            buffer.set_cap(k, cap)
        self._restoring = None

    def _allowance(self, k: int, done: list[bool]) -> int:
        """How many of source ``k``'s written rows may be published now (not deterministic)."""
        buffer = self.run.buffer
        if k == 0 and len(self.sources) > 1:
            if not done[1] and self._disk_warmup_left() > 0:
                return 0
            buffer.set_cap(0, self.size)
        if k == 0 or self.fraction is None or (done[0] and buffer.pending(0) == 0):
            return self.size
        if buffer.fill() < self.min_fill and buffer.pending(k) >= buffer.size - buffer.fill():
            return self.size  # disk rows hold every slot not yet served: yield rather than stall
        return self._disk_quota()

    def _deterministic_allowances(self, done: list[bool]) -> list[int] | None:
        """Each source's exact share of the rows that top the buffer up to the warm-up fill, or None
        while a share is not written yet. A finished source's shortfall passes to the other."""
        buffer = self.run.buffer
        shares = self._shares(max(0, self.min_fill - buffer.fill()))
        if len(shares) == 2:
            for k in (0, 1):
                short = shares[k] - buffer.pending(k)
                if done[k] and short > 0:
                    shares[k], shares[1 - k] = shares[k] - short, shares[1 - k] + short
            for k, cap in enumerate(self._deterministic_caps(shares)):
                buffer.set_cap(k, cap)
            if any(not done[k] and buffer.pending(k) < share for k, share in enumerate(shares)):
                return None
        return shares

    def _ready_to_serve(self) -> bool:
        buffer = self.run.buffer
        done = [buffer.done(k) for k in range(len(self.sources))]  # first: rows are pushed, then done
        if self.deterministic:
            allowances = self._deterministic_allowances(done)
            if allowances is None:
                return False
        else:
            allowances = [self._allowance(k, done) for k in range(len(self.sources))]
        for k, allowance in enumerate(allowances):
            slots = buffer.publish(allowance, k)
            if len(slots):  # rows are published in generation order; ids may skip filtered rows
                self._frontiers[k] = int(buffer.meta["row_id"][slots[-1]]) + 1
                self._published[k] += len(slots)
        fill = buffer.fill()
        if fill >= self.min_fill:
            return True
        if all(done) and all(buffer.pending(k) == 0 for k in range(len(self.sources))):
            if fill == 0 or (self.batching.drop_last and fill < self.batching.size):
                raise StopIteration
            return True
        return False

    def next(self) -> torch.Tensor | TokenBatch:
        self.run.used = True
        self.run.check_alive()  # a failure surfaces now, not once the buffered rows run out
        if self._restoring is not None:
            self._finish_restore()
        self._wait(self._ready_to_serve)
        buffer = self.run.buffer
        slots = buffer.take(self.batching.size, self._rng)
        try:
            acts = buffer.gather(slots, self._output(len(slots)) if self.batching.preallocated else None)
            if self.normalization is not None:
                self.normalization.apply_(acts)
            out = TokenBatch(acts, **buffer.provenance(slots)) if self.batching.with_tokens else acts
        finally:
            buffer.release(slots)
        self._batches += 1
        return out

    def _output(self, n: int) -> torch.Tensor:
        """The next of two preallocated (optionally pinned) batch tensors: a batch stays valid until
        the batch after next is drawn."""
        if not self._outputs:
            shape = (self.batching.size, *self.sources[0].row_shape)
            dtype = self.sources[0].dtype
            self._outputs = [
                torch.empty(shape, dtype=dtype, pin_memory=self.batching.pin_memory) for _ in range(2)
            ]
        self._outputs.reverse()
        return self._outputs[0][:n]

    def get_state(self) -> dict[str, Any]:
        if self._restoring is not None:
            return self._restoring[0]
        buffer = self.run.buffer
        sampler = {
            "rng": self._rng.bit_generator.state,
            "pass": self._pass,
            "batches": self._batches,
            "published": list(self._published),
            "normalization": None if self.normalization is None else self.normalization.to_state(),
        }
        full = buffer.meta_of(buffer.full[: buffer.fill()])
        continuations = [buffer.continuation(k) for k in range(len(self.sources))]
        return make_state(self.fingerprint(), self._frontiers, full, continuations, sampler)
