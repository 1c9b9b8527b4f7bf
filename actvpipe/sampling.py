"""Uniform sampling of buffered rows in O(batch): pure index functions, and the node that serves batches."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchdata.nodes import BaseNode


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
    """Serves batches of uniformly random buffered rows from a running generator.

    Each ``reset`` without state starts a fresh pass (a new generator) unless the current one has not
    served anything yet, so ``start()`` followed by iteration uses the started generator.
    """

    def __init__(self, launch, batch_size: int, drop_last: bool, min_fill: int, seed: int, with_tokens: bool):
        super().__init__()
        self.launch = launch
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.min_fill = max(min_fill, batch_size)
        self.seed = seed
        self.with_tokens = with_tokens
        self.run = None
        self._pass = 0

    def start(self) -> None:
        """Launch the generator for the next pass if none is waiting unused."""
        if self.run is None or self.run.used:
            self.close()
            self.run = self.launch()
            self._pass += 1
            self._rng = np.random.default_rng([self.seed, self._pass])
            self._batches = 0

    def close(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.start()

    def next(self) -> torch.Tensor | TokenBatch:
        run = self.run
        buffer = run.buffer
        backoff = 1e-4
        while True:
            done = buffer.done()  # read before fill: the generator publishes its last rows, then sets done
            fill = buffer.fill()
            if fill >= self.min_fill or (
                done and fill > 0 and not (self.drop_last and fill < self.batch_size)
            ):
                break
            if done:
                raise StopIteration
            run.check_alive()
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.005)
        run.used = True
        slots = buffer.take(self.batch_size, self._rng)
        try:
            acts = buffer.gather(slots)
            out = TokenBatch(acts, **buffer.provenance(slots)) if self.with_tokens else acts
        finally:
            buffer.release(slots)
        self._batches += 1
        return out

    def get_state(self) -> dict[str, Any]:
        return {"pass": self._pass, "batches": self._batches}
