"""The node that serves batches of uniformly random buffered rows, and what a batch with provenance holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torchdata.nodes import BaseNode

from actvpipe.cache import compute_stats
from actvpipe.device_copy import DeviceCopy
from actvpipe.mixing import Mixing
from actvpipe.outputs import OutputPool
from actvpipe.pass_run import PassRun
from actvpipe.resume import ResumePlan, check_fingerprint, make_state, plans_from_state
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
    pin_memory: bool = False
    device: torch.device | None = None  # where batches are handed over (None: host memory)


class BufferBatcher(BaseNode):
    """Serves batches of uniformly random buffered rows from a ``PassRun``, with exact state.

    Each ``reset`` without state starts a fresh pass (new generators) unless the current one has not
    served anything yet, so ``start()`` followed by iteration uses the started generators.
    """

    RNG_KEY, PASS_KEY, BATCHES_KEY = "rng", "pass", "batches"
    PUBLISHED_KEY, NORMALIZATION_KEY = "published", "normalization"

    def __init__(
        self,
        sources: Sequence[StreamSpec | Hdf5Spec],
        batching: Batching,
        mixing: Mixing,
        normalize: str | None = None,
        stats_rows: int = 100_000,
    ):
        super().__init__()
        self.sources = list(sources)
        self.batching = batching
        self.mixing = mixing
        self.normalize, self.stats_rows = normalize, stats_rows
        self.normalization: Normalization | None = None
        self.run: PassRun | None = None
        self._outputs: OutputPool | None = None
        self._copy = None if batching.device is None else DeviceCopy(batching.device)
        self._stats: ActivationStats | None = None
        self._started_with: dict | None = None
        self._rng = np.random.default_rng()
        self._pass = 0

    def fingerprint(self) -> dict[str, Any]:
        out = dict(self.sources[0].fingerprint())
        for k, source in enumerate(self.sources[1:], 1):
            out.update({f"source{k}.{key}": v for key, v in source.fingerprint().items()})
        return {
            **out,
            "buffer_size": self.mixing.size,
            "min_fill": self.mixing.min_fill,
            "hdf5_fraction": self.mixing.fraction,
            "normalize": self.normalize,
            "stats_rows": self.stats_rows if self.normalize else None,
        }

    def stats(self) -> ActivationStats:
        """Statistics of the first ``stats_rows`` rows of the (first source's) pass, computed once."""
        if self._stats is None:
            self._stats = compute_stats(self.sources[0], self.stats_rows)
        return self._stats

    def start(self, state: dict | None = None) -> None:
        """Launch generators for the next pass (or for the rest of a saved one) unless ones started for
        the same (or no) state wait unused."""
        if self.run is not None and not self.run.used and state is self._started_with:
            return
        self.close()
        self._started_with = state
        n = len(self.sources)
        if state is None:
            if self.normalize and self.normalization is None:
                self.normalization = Normalization.from_stats(self.normalize, self.stats())
            self._pass += 1
            self._rng = np.random.default_rng([self.sources[0].seed, self._pass])
            plans = [ResumePlan.fresh() for _ in self.sources]
            self.run = PassRun(self.sources, self.mixing, plans, [0] * n, [0] * n)
            return
        check_fingerprint(state["fingerprint"], self.fingerprint())
        plans, order = plans_from_state(state)
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state[self.RNG_KEY]
        self._pass = state[self.PASS_KEY]
        saved = state[self.NORMALIZATION_KEY]
        self.normalization = None if saved is None else Normalization.from_state(saved)
        published, batches = state[self.PUBLISHED_KEY], state[self.BATCHES_KEY]
        self.run = PassRun(self.sources, self.mixing, plans, state["frontiers"], published, batches, order)

    def close(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.start(initial_state)

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

    def next(self) -> torch.Tensor | TokenBatch:
        run = self.run
        run.used = True
        run.check_alive()  # a failure surfaces now, not once the buffered rows run out
        run.finish_restore()
        run.wait(self._ready)
        return run.serve(self.batching.size, self._rng, self._batch)

    def _batch(self, slots: np.ndarray) -> torch.Tensor | TokenBatch:
        buffer = self.run.buffer
        acts = buffer.gather(slots, self._output(len(slots)))
        if self.normalization is not None:
            self.normalization.apply_(acts)
        if not self.batching.with_tokens:
            return acts if self._copy is None else self._copy.to_device(acts)
        batch = TokenBatch(acts, **buffer.provenance(slots))
        if self._copy is None:
            return batch
        return TokenBatch(**{f.name: self._copy.to_device(getattr(batch, f.name)) for f in fields(batch)})

    def _output(self, n: int) -> torch.Tensor:
        """Where the next batch is gathered: a pooled tensor nothing else holds, or fresh pinned
        memory (torch's pinned-memory cache reuses it only once pending copies from it are done)."""
        shape, dtype = (n, *self.sources[0].row_shape), self.sources[0].dtype
        if self.batching.pin_memory or (self._copy is not None and self._copy.accelerated):
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        if self._outputs is None:
            self._outputs = OutputPool((self.batching.size, *shape[1:]), dtype)
        return self._outputs.take(n)

    def get_state(self) -> dict[str, Any]:
        ledger = self.run.ledger
        counts = ledger.counts
        if counts.restore is not None:
            return self._started_with
        sampler = {
            self.RNG_KEY: self._rng.bit_generator.state,
            self.PASS_KEY: self._pass,
            self.BATCHES_KEY: counts.batches,
            self.PUBLISHED_KEY: list(counts.pass_published),
            self.NORMALIZATION_KEY: None if self.normalization is None else self.normalization.to_state(),
        }
        return make_state(
            self.fingerprint(), list(counts.frontiers), ledger.full_meta(), ledger.continuations(), sampler
        )
