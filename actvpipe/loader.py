"""The loader: the trainer's chain of nodes over the shared buffer, driven by a ``torchdata`` ``Loader``.

    BufferSampler -> [Normalizer] -> [Mapper(DeviceCopy)] -> Loader

``BufferSampler`` draws and gathers batches from the pass ``Passes`` runs (generators and shared
block); ``Normalizer`` applies the statistics' normalisation; torchdata's ``Mapper`` hands batches
over to an accelerator. The loader creates everything that opens a process, a file or a stream
(passes, monitor) when it starts, never when it is described.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torchdata.nodes import BaseNode, Loader, Mapper

from actvpipe.batches import Batch, Batching
from actvpipe.device_copy import DeviceCopy
from actvpipe.loader_state import STATE_VERSION, LoaderState, check_fingerprint
from actvpipe.local_pass import compute_stats
from actvpipe.mixing import Mixing
from actvpipe.monitor import Monitor
from actvpipe.normalizing import Normalizer
from actvpipe.outputs import BatchMemory
from actvpipe.passes import Passes
from actvpipe.sampling import BufferSampler
from actvpipe.stats import ActivationStats, Normalization
from actvpipe.write_through import check_continuation

if TYPE_CHECKING:
    from actvpipe.pass_run import PassRun
    from actvpipe.stream import BufferedStream


class HandOver:
    """The iterator a loader returns: each batch the chain gives is committed (its rows leave the
    buffer) as the last step before it is handed over, after the monitor has seen it; anything
    raised on the way rolls the draw back, and the same iterator can go on (it is no generator,
    which an exception would end). When the pass ends or the iterator is dropped, the monitor gives
    stdout back."""

    def __init__(
        self,
        batches: Iterator[Batch],
        sampler: BufferSampler,
        monitor: Monitor,
        run: Callable[[], PassRun | None],
    ):
        self._batches, self._sampler, self._monitor, self._run = batches, sampler, monitor, run
        self.live = True  # until the pass ends or the iterator is dropped

    def __iter__(self) -> HandOver:
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        try:
            batch = next(self._batches)
            if self._monitor.active:
                self._monitor.after_batch(self._run(), len(batch), time.perf_counter() - start)
            self._sampler.commit()
        except StopIteration:
            self.close()
            raise
        except BaseException:
            self._sampler.roll_back()
            raise
        return batch

    def close(self) -> None:
        if self.live:
            self.live = False
            self._monitor.end_pass()

    def __del__(self) -> None:
        self.close()


def _unchanged(batch: Batch) -> Batch:
    """The hand-over without a device: batches stay in host memory."""
    return batch


class ActivationLoader:
    """Iterable of batches ``[batch, k, n_layers, d_model]`` (see the module for its nodes).

    ``start()`` launches the generator and returns at once; iterating starts it implicitly; each new
    iteration after a finished pass starts a new pass. ``close()`` (or leaving a ``with`` block)
    stops the generator and frees the shared memory. ``state_dict()`` / ``load_state_dict()``
    checkpoint the loader exactly (see README, "Checkpointing").
    """

    def __init__(self, buffered: BufferedStream, batching: Batching):
        self.buffered, self.batching = buffered, batching
        self.spec, self.options = buffered.spec, buffered.options
        self.buffer_size, self.batch_size = buffered.size, batching.size
        self.sources = [self.spec, *buffered.disk]
        mixing = Mixing(
            size=buffered.size,
            min_fill=max(1, round(buffered.warmup * buffered.size), batching.size),
            n_sources=len(self.sources),
            fraction=buffered.hdf5_fraction,
            deterministic=self.spec.deterministic,
            disk_rows=sum(f.rows for disk in buffered.disk for f in disk.files),
            max_age_rows=None if buffered.max_age is None else math.ceil(buffered.max_age * buffered.size),
        )
        self._mixing = mixing
        self._passes = Passes(self.sources, self.options, mixing, buffered.progress_timeout)
        memory = BatchMemory(batching.size, self.spec.row_shape, self.spec.dtype, batching.pinned)
        self._sampler = BufferSampler(self._passes, batching, memory, self.spec.seed)
        root: BaseNode[Batch] = self._sampler
        self._normalizer = None
        if buffered.normalize is not None:
            root = self._normalizer = Normalizer(root, self._normalization_from_stats)
        # Always in the chain, so that a state saved with a device restores without one, and back.
        root = Mapper(root, DeviceCopy(batching.device) if batching.device is not None else _unchanged)
        self._root = root
        self._loader = Loader(root)
        self._loaded: LoaderState | None = None
        self._iterated = False  # since the last load: before, the state is the loaded (or a fresh) one
        self._final: dict[str, Any] | None = None  # the state when the loader closed
        self._stats: ActivationStats | None = None
        self._monitor: Monitor | None = None
        self._handing_over: HandOver | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must match: the sources' identities and the buffer's options."""
        out = dict(self.sources[0].fingerprint())
        for k, source in enumerate(self.sources[1:], 1):
            out.update({f"source{k}.{key}": v for key, v in source.fingerprint().items()})
        buffered = self.buffered
        return {
            **out,
            "buffer_size": self._mixing.size,
            "batch_size": self.batching.size,
            "drop_last": self.batching.drop_last,
            "min_fill": self._mixing.min_fill,
            "hdf5_fraction": self._mixing.fraction,
            "normalize": buffered.normalize,
            "stats_rows": buffered.stats_rows if buffered.normalize else None,
            "max_age": buffered.max_age,
        }

    def start(self) -> ActivationLoader:
        """Launch the generators (for the loaded state, if any) and return at once; with
        ``normalize=`` and no saved state, the statistics pass runs first, in this process. While an
        iteration is under way its pass is running already: nothing to do."""
        if self._handing_over is not None and self._handing_over.live and self._passes.run is not None:
            return self
        loaded = self._loaded
        if self._normalizer is not None:
            self._normalizer.prepare(None if loaded is None else loaded.find(Normalizer.NORMALIZATION_KEY))
        self._passes.start(None if loaded is None else loaded.sampler_state())
        return self

    def __iter__(self) -> Iterator[Batch]:
        if self._monitor is None:
            buffered = self.buffered
            self._monitor = Monitor(
                buffered.log_dir,
                buffered.progress,
                buffered.refresh_interval,
                disk_sources=tuple(s.from_disk for s in self.sources),
                watermarks=None if self.spec.from_disk else self.options.watermarks,
            )
        try:
            batches = iter(self._loader)  # after a load, torchdata draws the first batch here
        except BaseException:
            self._sampler.roll_back()
            if self._loaded is not None:  # torchdata dropped the loaded state: load it again
                self._loader = Loader(self._root)
                self._loader.load_state_dict(self._loaded.nodes)
            raise
        self._loaded, self._iterated, self._final = None, True, None
        self._handing_over = HandOver(batches, self._sampler, self._monitor, lambda: self._passes.run)
        return self._handing_over

    def state_dict(self) -> dict[str, Any]:
        """Plain picklable state (a ``LoaderState``): a few integers and 4-9 bytes per buffered row.

        Works at any moment and starts nothing: before the first batch it is the loaded state (or
        the start of a pass: ``nodes`` None), after ``close()`` the state the loader closed in."""
        if self._final is not None:
            return self._final
        if not self._iterated:
            return (
                self._loaded.to_dict()
                if self._loaded
                else LoaderState(STATE_VERSION, self.fingerprint()).to_dict()
            )
        return LoaderState(STATE_VERSION, self.fingerprint(), self._loader.state_dict()).to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` at the next iteration (call before iterating).

        Raises ``ValueError`` at once if ``state`` is of another schema version, listing each
        difference if it was saved by a loader built with other arguments, or if ``write_hdf5``
        names a file that does not hold the rows served before the save (it would be left with a gap).
        """
        loaded = LoaderState.from_dict(state)
        check_fingerprint(loaded.fingerprint, self.fingerprint())
        if self.options.write_hdf5 is not None and loaded.nodes is not None:
            check_continuation(self.spec, self.options.write_hdf5, int(loaded.buffer.frontiers[0]))
        self._loader = Loader(self._root)  # torchdata 0.11 ignores a load after an earlier state_dict()
        if loaded.nodes is not None:
            self._loader.load_state_dict(loaded.nodes)
        # What start() launches the generators for, and what state_dict() says until iterated.
        self._loaded = None if loaded.nodes is None else loaded
        self._iterated, self._final = False, None

    def stats(self) -> ActivationStats:
        """Statistics of the first ``stats_rows`` rows (see ``.buffer``), computed once in this process
        (without the write-through file, which only the generator writes): tensors, and ``.to_json()``."""
        if self._stats is None:
            self._stats = compute_stats(self.spec, self.options.in_process(), self.buffered.stats_rows)
        return self._stats

    def _normalization_from_stats(self) -> Normalization:
        return Normalization.from_stats(self.buffered.normalize, self.stats())

    @property
    def normalization(self) -> Normalization | None:
        """The ``(x - shift) * scale`` applied to served batches, once started (None: raw rows)."""
        return None if self._normalizer is None else self._normalizer.normalization

    def close(self) -> None:
        """Stop the generators and free the shared memory, keeping the state for ``state_dict()``
        (recording it reads the buffered rows' ids: O(buffered rows))."""
        try:
            if self._iterated and self._final is None and self._passes.run is not None:
                self._final = self.state_dict()
        finally:
            if self._monitor is not None:
                self._monitor.close()
            self._passes.close()

    def __enter__(self) -> ActivationLoader:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def counters(self) -> dict[str, int]:
        """Rows ``written`` by the generators, ``published`` (sampleable), ``served``, ``computed`` by the
        sources, and the current ``fill``, for the current pass (all zero before ``start()``)."""
        run = self._passes.run
        if run is None:
            return dict.fromkeys(("written", "published", "served", "computed", "fill"), 0)
        header, counts = run.snapshot().header, run.ledger.counts
        return {
            "written": sum(header.per_source("written")),
            "computed": sum(header.per_source("computed")),
            "published": sum(counts.published),
            "served": counts.served,
            "fill": counts.n_full,
        }

    @property
    def generator_pid(self) -> int | None:
        """PID of the current generator process (None before ``start()``)."""
        run = self._passes.run
        return run.generators.process.pid if run is not None else None

    @property
    def on_gpu(self) -> bool:
        """Whether the live generator runs its model on a GPU now (``device="auto"`` moves it)."""
        run = self._passes.run
        return run is not None and bool(run.snapshot().header.per_source("on_gpu")[0])
