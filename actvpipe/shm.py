"""The shared buffer: one named shared-memory block of rows, slot lists and counters, and its lifetime.

Layout: a header of int64 counters, an error-text area, the dense list of full slots, the stack of
free slots, the FIFO of written slots, per-slot provenance and the rows. A slot is free, claimed
and being written by the generator, written (in the FIFO, in generation order), full (sampleable),
or being served. The generator claims, writes and pushes; the trainer publishes FIFO slots into the
full list, takes, copies out and releases. The lock guards only O(k) index updates, never a copy.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from actvpipe.capture import FileRange, RowBlock
from actvpipe.slots import remove_positions, sample_positions

SHM_DIR = "/dev/shm"
NEXT_BLOCK = ("next_block_seq", "next_block_record", "next_block_offset")
# free[:identity] is implicitly free[i] == i: never written, so creating a buffer touches no page.
HEADER = ("n_full", "n_free", "failed", "stop", "served", "error_len", "identity")
# Each source (a generator process) has its own FIFO and these counters, from header index 16 on.
SOURCE_FIELDS = ("written", "published", "done", "computed", "cap", "on_gpu", *NEXT_BLOCK)
MAX_SOURCES = 4
HEADER_BYTES = 512
ERROR_BYTES = 64 * 1024
META = ("row_id", "source", "seq", "pos", "token_ids", "block_seq", "block_record", "block_offset")


def _layout(size: int, n_sources: int) -> tuple[dict[str, int], int]:
    offsets, at = {}, HEADER_BYTES + ERROR_BYTES
    for name in ("full", "free", *(f"fifo{k}" for k in range(n_sources)), *META):
        offsets[name] = at
        at += 8 * size
    offsets["rows"] = at
    return offsets, at


def buffer_nbytes(size: int, row_shape: tuple[int, ...], dtype: torch.dtype, n_sources: int = 1) -> int:
    """Bytes of shared memory a buffer of ``size`` rows takes, index lists included."""
    row_bytes = int(np.prod(row_shape)) * torch.empty((), dtype=dtype).element_size()
    return _layout(size, n_sources)[1] + size * row_bytes


class SharedRowBuffer:
    """``size`` rows ``row_shape`` of ``dtype`` in named shared memory; pickles as its name and shape only."""

    def __init__(
        self,
        name: str,
        size: int,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        lock: Any,
        n_sources: int = 1,
    ):
        self.name, self.size, self.row_shape, self.dtype = name, size, tuple(row_shape), dtype
        self.lock, self.n_sources = lock, n_sources
        self._shm: SharedMemory | None = None
        nbytes = buffer_nbytes(size, self.row_shape, dtype, n_sources)
        block = torch.from_file(os.path.join(SHM_DIR, name), shared=True, size=nbytes, dtype=torch.uint8)
        offsets, rows_at = _layout(size, n_sources)
        self.header = block[:HEADER_BYTES].view(torch.int64).numpy()
        self._error = block[HEADER_BYTES : HEADER_BYTES + ERROR_BYTES].numpy()
        arrays = {k: block[at : at + 8 * size].view(torch.int64) for k, at in offsets.items() if k != "rows"}
        self.full, self.free = arrays["full"].numpy(), arrays["free"].numpy()
        self.fifos = [arrays[f"fifo{k}"].numpy() for k in range(n_sources)]
        self.meta = {k: arrays[k] for k in META}
        self.rows = block[rows_at:].view(dtype).view(size, *self.row_shape)
        self._rows_at, self._row_bytes = rows_at, self.rows[0].nbytes if size else 0

    @classmethod
    def create(
        cls, size: int, row_shape: tuple[int, ...], dtype: torch.dtype, lock: Any, n_sources: int = 1
    ) -> SharedRowBuffer:
        """Allocate a new block (pages are touched only when written) with every slot free."""
        if not os.path.isdir(SHM_DIR):
            raise OSError(f"{SHM_DIR} not found: actvpipe's shared buffer needs Linux POSIX shared memory")
        if not 1 <= n_sources <= MAX_SOURCES:
            raise ValueError(f"a buffer takes 1 to {MAX_SOURCES} sources, not {n_sources}")
        name = f"actvpipe_{os.getpid()}_{secrets.token_hex(6)}"
        nbytes = buffer_nbytes(size, tuple(row_shape), dtype, n_sources)
        shm = SharedMemory(name=name, create=True, size=nbytes)
        shm.close()
        buffer = cls(name, size, row_shape, dtype, lock, n_sources)
        buffer._shm = shm
        buffer._set("n_free", size)
        buffer._set("identity", size)
        for k in range(n_sources):
            buffer._set("cap", size, k)
        return buffer

    def __reduce__(self):
        return (
            SharedRowBuffer,
            (self.name, self.size, self.row_shape, self.dtype, self.lock, self.n_sources),
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
        """A global counter, or with ``source`` one of that source's (see ``SOURCE_FIELDS``)."""
        return int(self.header[self._index(field, source)])

    def total(self, field: str) -> int:
        """A per-source counter summed over the sources."""
        return sum(self.get(field, k) for k in range(self.n_sources))

    def _set(self, field: str, value: int, source: int | None = None) -> None:
        self.header[self._index(field, source)] = value

    def fill(self) -> int:
        return self.get("n_full")

    def done(self, source: int = 0) -> bool:
        return bool(self.get("done", source))

    # generator side
    def claim(self, k: int) -> np.ndarray:
        """Take up to ``k`` free slots to write into (possibly none)."""
        with self.lock:
            n_free, identity = self.get("n_free"), self.get("identity")
            lo = n_free - min(k, n_free)
            implicit = np.arange(lo, min(n_free, identity), dtype=np.int64)
            slots = np.concatenate([implicit, self.free[max(lo, identity) : n_free]])
            self._set("n_free", lo)
            self._set("identity", min(identity, lo))
        return slots

    def write(self, slots: np.ndarray, block: RowBlock, lo: int, hi: int, source: int = 0) -> None:
        """Copy rows ``lo:hi`` of ``block`` and their provenance into claimed slots (no lock: the
        slots are ours). Disk blocks copy file to file into the buffer when the slots are contiguous."""
        index = torch.from_numpy(slots)
        if block.read_into is None:
            self.rows.index_copy_(0, index, block.rows[lo:hi].to(self.dtype))
        elif np.all(np.diff(slots) == 1):
            fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDWR)
            try:
                block.read_into(FileRange(fd, self._rows_at + int(slots[0]) * self._row_bytes), lo, hi)
            finally:
                os.close(fd)
        else:
            staged = torch.empty((hi - lo, *self.row_shape), dtype=self.dtype)
            block.read_into(staged.view(torch.uint8).numpy(), lo, hi)
            self.rows.index_copy_(0, index, staged)
        meta = {k: v[lo:hi] for k, v in block.meta.items()}
        meta["source"] = np.full(hi - lo, source, dtype=np.int64)
        for key, values in meta.items():
            self.meta[key].index_copy_(0, index, torch.from_numpy(values))

    def push(
        self, slots: np.ndarray, next_block: tuple[int, int, int] | None = None, source: int = 0
    ) -> None:
        """Append written slots to the source's FIFO; at a block's end, record where the next one starts."""
        with self.lock:
            written = self.get("written", source)
            self.fifos[source][(written + np.arange(len(slots))) % self.size] = slots
            self._set("written", written + len(slots), source)
            if next_block is not None:
                for field, value in zip(NEXT_BLOCK, next_block, strict=True):
                    self._set(field, value, source)

    def set_cap(self, source: int, rows: int) -> None:
        """How many of the source's rows may wait written but unpublished."""
        self._set("cap", rows, source)

    def set_field(self, field: str, value: int, source: int) -> None:
        """Set one of a source's counters that only that source writes (such as ``on_gpu``)."""
        self._set(field, value, source)

    def count_computed(self, rows: int, source: int = 0) -> None:
        """Add to the rows the source has produced (filtered-out regenerated rows included)."""
        self._set("computed", self.get("computed", source) + rows, source)

    def request_stop(self) -> None:
        """Ask the generator to stop at its next check (training side)."""
        self._set("stop", 1)

    def stop_requested(self) -> bool:
        return bool(self.get("stop"))

    def finish(self, source: int = 0) -> None:
        self._set("done", 1, source)

    def fail(self, text: str) -> None:
        data = text.encode()[-ERROR_BYTES:]
        self._error[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._set("error_len", len(data))
        self._set("failed", 1)

    def error_text(self) -> str | None:
        if not self.get("failed"):
            return None
        return self._error[: self.get("error_len")].tobytes().decode(errors="replace")

    # trainer side
    def pending(self, source: int = 0) -> int:
        """Rows written by the source and not yet published."""
        return self.get("written", source) - self.get("published", source)

    def pop_written(self, max_rows: int, source: int = 0) -> np.ndarray:
        """Remove up to ``max_rows`` of the source's oldest written slots, in generation order."""
        with self.lock:  # also orders the generator's FIFO stores before our reads
            published = self.get("published", source)
            k = max(0, min(max_rows, self.get("written", source) - published))
            slots = self.fifos[source][(published + np.arange(k)) % self.size]
            self._set("published", published + k, source)
        return slots

    def append_full(self, slots: np.ndarray) -> None:
        """Make ``slots`` sampleable (the full list is the trainer's alone)."""
        n_full = self.get("n_full")
        self.full[n_full : n_full + len(slots)] = slots
        self._set("n_full", n_full + len(slots))

    def publish(self, max_rows: int, source: int = 0) -> np.ndarray:
        """Move up to ``max_rows`` of the source's written slots, oldest first, into the full list."""
        slots = self.pop_written(max_rows, source)
        self.append_full(slots)
        return slots

    def continuation(self, source: int = 0) -> tuple[int, int, int]:
        """(seq, record, offset) starting the block of the source's oldest unpublished row, or of the
        block it writes next when every written row is published (read as one snapshot)."""
        with self.lock:
            if self.pending(source) > 0:
                slot = self.fifos[source][self.get("published", source) % self.size]
                return tuple(int(self.meta[k][slot]) for k in ("block_seq", "block_record", "block_offset"))
            return tuple(self.get(f, source) for f in NEXT_BLOCK)

    def take(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """Remove up to ``k`` uniformly random full slots from the full list, in O(k)."""
        n_full = self.get("n_full")
        positions = sample_positions(rng, n_full, k)
        slots = self.full[positions]
        remove_positions(self.full, n_full, positions)
        self._set("n_full", n_full - len(slots))
        return slots

    def meta_of(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        return {key: self.meta[key].numpy()[slots] for key in META}

    def gather(self, slots: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy rows out with ``index_select`` (into ``out`` when given) on one thread: an OpenMP
        gather would leave worker threads spinning on the cores the generator's forward needs, and
        one thread already copies at memory speed."""
        if out is None:
            out = torch.empty((len(slots), *self.row_shape), dtype=self.dtype)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.index_select(self.rows, 0, torch.from_numpy(slots), out=out)
        finally:
            torch.set_num_threads(threads)
        return out

    def provenance(self, slots: np.ndarray) -> dict[str, torch.Tensor]:
        """``seq``, ``pos``, ``token_ids`` and ``source`` of the rows in ``slots``."""
        index = torch.from_numpy(slots)
        return {
            key: torch.index_select(self.meta[key], 0, index) for key in ("seq", "pos", "token_ids", "source")
        }

    def release(self, slots: np.ndarray) -> None:
        """Return served slots to the free stack."""
        with self.lock:
            n_free = self.get("n_free")
            self.free[n_free : n_free + len(slots)] = slots
            self._set("n_free", n_free + len(slots))
            self._set("served", self.get("served") + len(slots))
