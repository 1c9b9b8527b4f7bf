"""Uniform sampling of buffered rows in O(batch): pure index functions, and the node that serves batches."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchdata.nodes import BaseNode

from actvpipe.resume import ResumePlan, check_fingerprint, make_state, order_slots, plan_from_state
from actvpipe.spec import StreamSpec


def sample_positions(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``min(k, n)`` distinct positions drawn uniformly from ``range(n)``, in random order, in O(k).

    Draws with replacement and keeps the distinct values (a uniformly random subset by symmetry),
    topping up until there are enough; when ``k`` is over half of ``n``, ``n`` is O(k) anyway.
    """
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if 2 * k > n:
        return rng.permutation(n)[:k]
    picked = np.unique(rng.integers(0, n, size=k + k // 8 + 8))
    while len(picked) < k:
        picked = np.unique(np.concatenate([picked, rng.integers(0, n, size=k - len(picked) + 8)]))
    return rng.permutation(picked)[:k]


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


@dataclass
class TokenBatch:
    """A batch with provenance: ``acts[i]`` came from token ``token_ids[i]`` at position ``pos[i]`` of
    context ``seq[i]`` (the global index of the packed context)."""

    acts: torch.Tensor
    token_ids: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return len(self.acts)


class BufferBatcher(BaseNode):
    """Serves batches of uniformly random buffered rows from a running generator, with exact state.

    Each ``reset`` without state starts a fresh pass (a new generator) unless the current one has
    not served anything yet, so ``start()`` followed by iteration uses the started generator. The
    trainer publishes the generator's written rows into the sampleable set: all of them at once by
    default, or in deterministic mode exactly up to the fill threshold, so that which rows a batch
    is drawn from never depends on timing.
    """

    def __init__(
        self,
        spec: StreamSpec,
        size: int,
        launch,
        batch_size: int,
        drop_last: bool,
        min_fill: int,
        with_tokens: bool,
    ):
        super().__init__()
        self.spec = spec
        self.size = size
        self.launch = launch
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.min_fill = max(min_fill, batch_size)
        self.with_tokens = with_tokens
        self.run = None
        self._pass = 0

    def fingerprint(self) -> dict[str, Any]:
        return {**self.spec.fingerprint(), "buffer_size": self.size, "min_fill": self.min_fill}

    def start(self, state: dict | None = None) -> None:
        """Launch a generator for the next pass (or for the rest of a saved one) unless one waits unused."""
        if state is None and self.run is not None and not self.run.used:
            return
        self.close()
        if state is None:
            self._pass += 1
            plan, self._restoring = ResumePlan.fresh(), None
            self._rng = np.random.default_rng([self.spec.seed, self._pass])
            self._batches, self._frontier = 0, 0
        else:
            check_fingerprint(state["fingerprint"], self.fingerprint())
            plan, order = plan_from_state(state)
            self._restoring = (state, order)
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = state["rng"]
            self._pass, self._batches, self._frontier = state["pass"], state["batches"], state["frontier"]
        self.run = self.launch(plan)

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
        """Place the regenerated buffered rows (the generator writes them first) in the saved order."""
        _, order = self._restoring
        buffer = self.run.buffer
        self._wait(lambda: buffer.pending() >= len(order) or buffer.done())
        slots = buffer.pop_written(len(order))
        meta = buffer.meta_of(slots)
        buffer.append_full(order_slots(slots, meta["row_id"], order))
        self._restoring = None

    def _ready_to_serve(self) -> bool:
        buffer = self.run.buffer
        done = buffer.done()  # read first: the generator pushes its last rows, then sets done
        room = self.min_fill - buffer.fill() if self.spec.deterministic else self.size
        self._frontier += buffer.publish(room)
        fill = buffer.fill()
        if fill >= self.min_fill:
            return True
        if done and buffer.pending() == 0:
            if fill == 0 or (self.drop_last and fill < self.batch_size):
                raise StopIteration
            return True
        return False

    def next(self) -> torch.Tensor | TokenBatch:
        self.run.used = True
        if self._restoring is not None:
            self._finish_restore()
        self._wait(self._ready_to_serve)
        buffer = self.run.buffer
        slots = buffer.take(self.batch_size, self._rng)
        try:
            acts = buffer.gather(slots)
            out = TokenBatch(acts, **buffer.provenance(slots)) if self.with_tokens else acts
        finally:
            buffer.release(slots)
        self._batches += 1
        return out

    def get_state(self) -> dict[str, Any]:
        if self._restoring is not None:
            return self._restoring[0]
        buffer = self.run.buffer
        sampler = {"rng": self._rng.bit_generator.state, "pass": self._pass, "batches": self._batches}
        full = buffer.meta_of(buffer.full[: buffer.fill()])
        return make_state(self.fingerprint(), self._frontier, full, buffer.continuation(), sampler)
