"""The shared buffer: one named shared-memory block of rows, slot rings and counters, and its lifetime.

There is no lock: every shared value has exactly one writing process. Each source (a generator
process) has two single-producer/single-consumer rings of slot numbers: ``free`` (the trainer hands
it empty slots) and ``fifo`` (it hands back written slots, in generation order). A producer stores
the entries, then the count; a consumer reads the count, then the entries. The list of full
(sampleable) slots is the trainer's alone. So a process that dies at any instant holds nothing the
other waits on, and every wait, on either side, is a bounded poll that re-checks the other process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

from actvpipe.records import FileRange, RowBlock

SHM_DIR = "/dev/shm"
NEXT_BLOCK = ("next_block_seq", "next_block_record", "next_block_offset")
# Written by the trainer.
HEADER = ("n_full", "stop", "served")
# Per source, from header index 16 on. The trainer writes ``published`` and ``granted`` (and
# ``implicit``/``base`` before the source starts); the source writes the rest.
SOURCE_FIELDS = (
    "written", "published", "done", "computed", "granted", "claimed", "implicit", "base",
    "on_gpu", "failed", "error_len", "op", *NEXT_BLOCK,
)  # fmt: skip
# What a source is doing to the buffer (field ``op``), so that a death can be reported with it.
OPS = ("computing or waiting", "claiming slots", "writing rows", "pushing rows")
MAX_SOURCES = 4
HEADER_BYTES = 1024
ERROR_BYTES = 16 * 1024  # per source
META = ("row_id", "source", "seq", "pos", "token_ids", "block_seq", "block_record", "block_offset")

_fence_lock = threading.Lock()


def fence() -> None:
    """Order this process's earlier shared-memory stores and loads before its later ones.

    x86-64 keeps stores in order anyway; on weakly ordered processors (aarch64) a release followed
    by an acquire of a lock is a full barrier. Python gives no fence of its own.
    """
    _fence_lock.acquire()
    _fence_lock.release()
    _fence_lock.acquire()
    _fence_lock.release()


def _layout(size: int, n_sources: int) -> tuple[dict[str, int], int]:
    offsets, at = {}, HEADER_BYTES + ERROR_BYTES * n_sources
    rings = [f"{ring}{k}" for k in range(n_sources) for ring in ("free", "fifo")]
    for name in ("full", *rings, *META):
        offsets[name] = at
        at += 8 * size
    offsets["rows"] = at
    return offsets, at


def buffer_nbytes(size: int, row_shape: tuple[int, ...], dtype: torch.dtype, n_sources: int = 1) -> int:
    """Bytes of shared memory a buffer of ``size`` rows takes, slot rings included."""
    row_bytes = int(np.prod(row_shape)) * torch.empty((), dtype=dtype).element_size()
    return _layout(size, n_sources)[1] + size * row_bytes


class SharedRowBuffer:
    """``size`` rows ``row_shape`` of ``dtype`` in named shared memory; pickles as its name and shape only.

    ``pause`` (seconds, tests only) makes each of the generator's buffer operations stop halfway, so a
    kill can be aimed inside one.
    """

    def __init__(
        self,
        name: str,
        size: int,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        n_sources: int = 1,
        pause: float = 0.0,
    ):
        self.name, self.size, self.row_shape, self.dtype = name, size, tuple(row_shape), dtype
        self.n_sources, self.pause = n_sources, pause
        self._shm: SharedMemory | None = None
        nbytes = buffer_nbytes(size, self.row_shape, dtype, n_sources)
        block = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)
        offsets, rows_at = _layout(size, n_sources)
        self.header = block[:HEADER_BYTES].view(torch.int64).numpy()
        self._errors = block[HEADER_BYTES : HEADER_BYTES + ERROR_BYTES * n_sources].numpy()
        arrays = {k: block[at : at + 8 * size].view(torch.int64) for k, at in offsets.items() if k != "rows"}
        self.full = arrays["full"].numpy()
        self.free_rings = [arrays[f"free{k}"].numpy() for k in range(n_sources)]
        self.fifos = [arrays[f"fifo{k}"].numpy() for k in range(n_sources)]
        self.meta = {k: arrays[k] for k in META}
        self.rows = block[rows_at:].view(dtype).view(size, *self.row_shape)
        self._rows_at, self._row_bytes = rows_at, self.rows[0].nbytes if size else 0

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(
        cls, size: int, row_shape: tuple[int, ...], dtype: torch.dtype, n_sources: int = 1, pause: float = 0.0
    ) -> SharedRowBuffer:
        """Allocate a new block (pages are touched only when written), all zero."""
        if not os.path.isdir(SHM_DIR):
            raise OSError(f"{SHM_DIR} not found: actvpipe's shared buffer needs Linux POSIX shared memory")
        if not 1 <= n_sources <= MAX_SOURCES:
            raise ValueError(f"a buffer takes 1 to {MAX_SOURCES} sources, not {n_sources}")
        name = f"actvpipe_{os.getpid()}_{secrets.token_hex(6)}"
        nbytes = buffer_nbytes(size, tuple(row_shape), dtype, n_sources)
        # The resource tracker removes the block if this process dies. Register the name before the
        # block exists: SharedMemory registers it only after creating and mapping it, and a process
        # killed in between would leave a block that nobody knows about. (Killed before the block
        # exists, the tracker finds nothing to remove, and says so.)
        resource_tracker.register(f"/{name}", "shared_memory")
        shm = SharedMemory(name=name, create=True, size=nbytes)
        shm.close()
        buffer = cls(name, size, row_shape, dtype, n_sources, pause)
        buffer._shm = shm
        return buffer

    def __reduce__(self):
        return (
            SharedRowBuffer,
            (self.name, self.size, self.row_shape, self.dtype, self.n_sources, self.pause),
        )

    def unlink(self) -> None:
        """Remove the block's name (owner only); the memory goes once every mapping is gone."""
        if self._shm is not None:
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()
            self._shm = None

    @staticmethod
    def _index(field: str, source: int | None) -> int:
        if source is None:
            return HEADER.index(field)
        return 16 + len(SOURCE_FIELDS) * source + SOURCE_FIELDS.index(field)

    def get(self, field: str, source: int | None = None) -> int:
        """A trainer counter (``HEADER``), or with ``source`` one of that source's (``SOURCE_FIELDS``)."""
        return int(self.header[self._index(field, source)])

    def set(self, field: str, value: int, source: int | None = None) -> None:
        """Store a counter; only the process that owns it (see ``SOURCE_FIELDS``) may."""
        self.header[self._index(field, source)] = value

    def total(self, field: str) -> int:
        """A per-source counter summed over the sources."""
        return sum(self.get(field, k) for k in range(self.n_sources))

    def fill(self) -> int:
        """Sampleable rows."""
        return self.get("n_full")

    def held(self) -> int:
        """Rows sampleable or written and waiting to be published."""
        return self.fill() + sum(
            self.get("written", k) - self.get("published", k) for k in range(self.n_sources)
        )

    def done(self, source: int = 0) -> bool:
        return bool(self.get("done", source))

    @contextlib.contextmanager
    def _op(self, name: str, source: int):
        """Mark the source as inside a buffer operation (and pause there, for tests)."""
        self.set("op", OPS.index(name), source)
        yield
        self.set("op", 0, source)

    def _paused(self) -> None:
        if self.pause:
            time.sleep(self.pause)

    def operation(self, source: int) -> str:
        """What the source was last doing to the buffer (see ``OPS``)."""
        return OPS[self.get("op", source)]

    # generator side
    def claim(self, k: int, source: int = 0) -> np.ndarray:
        """Take up to ``k`` of the free slots the trainer handed this source (possibly none)."""
        with self._op("claiming slots", source):
            return self._claim(k, source)

    def _claim(self, k: int, source: int) -> np.ndarray:
        claimed = self.get("claimed", source)
        fence()
        n = min(k, self.get("granted", source) - claimed)
        fence()
        slots = self.free_slots(source, claimed, max(n, 0))
        self._paused()
        fence()
        self.set("claimed", claimed + len(slots), source)
        return slots

    def write(self, slots: np.ndarray, block: RowBlock, lo: int, hi: int, source: int = 0) -> None:
        """Copy rows ``lo:hi`` of ``block`` and their provenance into claimed slots. Disk blocks copy
        file to file into the buffer when the slots are contiguous."""
        with self._op("writing rows", source):
            self._write(slots, block, lo, hi, source)

    def _write(self, slots: np.ndarray, block: RowBlock, lo: int, hi: int, source: int) -> None:
        index = torch.from_numpy(slots)
        if block.read_into is None:
            self.rows.index_copy_(0, index, block.rows[lo:hi].to(self.dtype))
        elif np.all(np.diff(slots) == 1):
            fd = os.open(self.path, os.O_RDWR)
            try:
                block.read_into(FileRange(fd, self._rows_at + int(slots[0]) * self._row_bytes), lo, hi)
            finally:
                os.close(fd)
        else:
            staged = torch.empty((hi - lo, *self.row_shape), dtype=self.dtype)
            block.read_into(staged.view(torch.uint8).numpy(), lo, hi)
            self.rows.index_copy_(0, index, staged)
        self._paused()
        meta = {k: v[lo:hi] for k, v in block.meta.items()}
        meta["source"] = np.full(hi - lo, source, dtype=np.int64)
        for key, values in meta.items():
            self.meta[key].index_copy_(0, index, torch.from_numpy(values))

    def push(
        self, slots: np.ndarray, next_block: tuple[int, int, int] | None = None, source: int = 0
    ) -> None:
        """Append written slots to the source's FIFO; at a block's end, record where the next one starts.

        ``next_block`` is stored after the count, so a reader that sees it unchanged around its read
        of ``next_block`` never sees a start past rows it has not counted (see ``continuation``).
        """
        with self._op("pushing rows", source):
            self._push(slots, next_block, source)

    def _push(self, slots: np.ndarray, next_block: tuple[int, int, int] | None, source: int) -> None:
        written = self.get("written", source)
        self.fifos[source][(written + np.arange(len(slots))) % self.size] = slots
        self._paused()
        fence()
        self.set("written", written + len(slots), source)
        if next_block is not None:
            self._paused()
            for field, value in zip(NEXT_BLOCK, next_block, strict=True):
                self.set(field, value, source)

    def count_computed(self, rows: int, source: int = 0) -> None:
        """Add to the rows the source has produced (filtered-out regenerated rows included)."""
        self.set("computed", self.get("computed", source) + rows, source)

    def finish(self, source: int = 0) -> None:
        fence()
        self.set("done", 1, source)

    def fail(self, text: str, source: int = 0) -> None:
        data = text.encode()[-ERROR_BYTES:]
        self._errors[source * ERROR_BYTES : source * ERROR_BYTES + len(data)] = np.frombuffer(data, np.uint8)
        self.set("error_len", len(data), source)
        fence()
        self.set("failed", 1, source)

    def fill_fraction(self) -> float:
        """How full the buffer is, as the generator's device policy sees it."""
        return self.held() / self.size

    def stop_requested(self) -> bool:
        return bool(self.get("stop"))

    # trainer side
    def request_stop(self) -> None:
        """Ask the generators to stop at their next check."""
        self.set("stop", 1)

    def error_text(self) -> str | None:
        """The traceback of the first source that failed, if any did."""
        for source in range(self.n_sources):
            if self.get("failed", source):
                fence()
                at = source * ERROR_BYTES
                return (
                    self._errors[at : at + self.get("error_len", source)].tobytes().decode(errors="replace")
                )
        return None

    def free_slots(self, source: int, start: int, n: int) -> np.ndarray:
        """Entries ``start:start+n`` of the source's free ring. Positions below ``implicit`` were
        handed out when the buffer was made, without being written: they hold ``base + position``."""
        at = start + np.arange(n, dtype=np.int64)
        ring = self.free_rings[source][at % self.size]
        return np.where(at < self.get("implicit", source), at + self.get("base", source), ring)

    def written_slots(self, source: int, start: int, n: int) -> np.ndarray:
        """Entries ``start:start+n`` of the source's FIFO (the caller checked ``written``)."""
        fence()
        return self.fifos[source][(start + np.arange(n)) % self.size]

    def hand_out(self, source: int, start: int, slots: np.ndarray) -> None:
        """Store free-ring entries from position ``start`` on (``granted``, stored next, publishes them)."""
        self.free_rings[source][(start + np.arange(len(slots))) % self.size] = slots
        fence()

    def continuation(self, source: int, published: int) -> tuple[int, int, int]:
        """(seq, record, offset) starting the block of the source's oldest unpublished row, or of the
        block it writes next when all ``published`` rows are every row it wrote."""
        while True:
            written = self.get("written", source)
            fence()
            if written > published:
                slot = self.fifos[source][published % self.size]
                return tuple(int(self.meta[k][slot]) for k in ("block_seq", "block_record", "block_offset"))
            start = tuple(self.get(f, source) for f in NEXT_BLOCK)
            fence()
            if self.get("written", source) == written:
                return start

    def meta_of(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        return {key: self.meta[key].numpy()[slots] for key in META}

    def gather(self, slots: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy rows out (into ``out`` when given) on the calling thread: ``np.take`` over raw bytes
        copies as fast as a one-thread ``index_select`` without touching torch's process-wide thread
        count, and leaves no OpenMP workers spinning on the cores the generator's forward needs."""
        if out is None:
            out = torch.empty((len(slots), *self.row_shape), dtype=self.dtype)
        raw = self.rows.view(torch.uint8).view(self.size, self._row_bytes).numpy()
        dest = out.view(torch.uint8).view(len(slots), self._row_bytes).numpy()
        np.take(raw, slots, axis=0, out=dest, mode="clip")  # slots are in range; "clip" skips a buffer
        return out

    def provenance(self, slots: np.ndarray) -> dict[str, torch.Tensor]:
        """``seq``, ``pos``, ``token_ids`` and ``source`` of the rows in ``slots``."""
        index = torch.from_numpy(slots)
        return {
            key: torch.index_select(self.meta[key], 0, index) for key in ("seq", "pos", "token_ids", "source")
        }
