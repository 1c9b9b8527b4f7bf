"""The shared buffer: one named shared-memory block of rows, slot rings and a header, and its lifetime.

There is no lock: every shared value has exactly one writing process, and the header's layout
(``HEADER``) says which: the trainer's fields and each source's (generator's) fields are separate
records. Each side gets a view that writes only its own fields: ``TrainerView`` in the training
process, ``GeneratorView`` in source ``k``'s generator process. Each source has two
single-producer/single-consumer rings of slot numbers: ``free`` (the trainer hands it empty slots)
and ``fifo`` (it hands back written slots, in generation order). A producer stores the entries, then
the count; a consumer reads the count, then the entries. The list of full (sampleable) slots is the
trainer's alone. So a process that dies at any instant holds nothing the other waits on, and every
wait, on either side, is a bounded poll that re-checks the other process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

from actvpipe.records import FileRange, RowBlock

SHM_DIR = "/dev/shm"
MAX_SOURCES = 4
# Where a source's next block starts, (seq, record, offset): a multi-word value the trainer reads
# while the source may be writing it. The source writes each new start into the next entry of a
# small ring and then publishes it with one store of ``next_blocks``, the count of starts written;
# the trainer reads the count, then the entry, so it never pairs one start's fields with another's.
NEXT_RING = 4
_I8 = "<i8"
# Per source, written by the trainer (``implicit``/``base`` only before the source starts).
TRAINER_FIELDS = np.dtype([(name, _I8) for name in ("published", "granted", "implicit", "base")])
# Per source, written by that source's generator process.
GENERATOR_FIELDS = np.dtype(
    [
        (name, _I8)
        for name in ("written", "done", "computed", "claimed", "on_gpu", "failed", "error_len", "op")
    ]
    + [("next_blocks", _I8), ("next_block_ring", _I8, (NEXT_RING, 3))]
)
HEADER = np.dtype(
    [
        ("n_full", _I8),  # the trainer's: sampleable rows
        ("stop", _I8),  # the trainer's: generators stop at their next check
        ("served", _I8),  # the trainer's: rows served this run
        ("trainer", TRAINER_FIELDS, (MAX_SOURCES,)),
        ("generator", GENERATOR_FIELDS, (MAX_SOURCES,)),
    ]
)
HEADER_BYTES = 1024
assert HEADER.itemsize <= HEADER_BYTES
# What a source is doing to the buffer (field ``op``), so that a death can be reported with it.
OPS = ("computing or waiting", "claiming slots", "writing rows", "pushing rows", "waiting for free slots")
ERROR_BYTES = 16 * 1024  # per source
PARALLEL_GATHER_BYTES = 8 << 20  # a batch this large is gathered on torch's intra-op threads
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


class SharedBlock:
    """``size`` rows ``row_shape`` of ``dtype`` in named shared memory, with the header, the slot
    lists and each row's provenance: the layout and the block's lifetime, nothing else. Pickles as
    its name and shape only; each process then takes the view of its side."""

    def __init__(
        self, name: str, size: int, row_shape: tuple[int, ...], dtype: torch.dtype, n_sources: int = 1
    ):
        self.name, self.size, self.row_shape, self.dtype = name, size, tuple(row_shape), dtype
        self.n_sources = n_sources
        self._shm: SharedMemory | None = None
        nbytes = buffer_nbytes(size, self.row_shape, dtype, n_sources)
        block = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)
        offsets, rows_at = _layout(size, n_sources)
        self.header = block[: HEADER.itemsize].numpy().view(HEADER)[0]  # a record over the shared bytes
        self.trainer = self.header["trainer"]  # [MAX_SOURCES] records, one per source
        self.generator = self.header["generator"]
        self.errors = block[HEADER_BYTES : HEADER_BYTES + ERROR_BYTES * n_sources].numpy()
        arrays = {k: block[at : at + 8 * size].view(torch.int64) for k, at in offsets.items() if k != "rows"}
        self.full = arrays["full"].numpy()
        self.free_rings = [arrays[f"free{k}"].numpy() for k in range(n_sources)]
        self.fifos = [arrays[f"fifo{k}"].numpy() for k in range(n_sources)]
        self.meta = {k: arrays[k] for k in META}
        self.rows = block[rows_at:].view(dtype).view(size, *self.row_shape)
        self.rows_at, self.row_bytes = rows_at, self.rows[0].nbytes if size else 0

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(
        cls, size: int, row_shape: tuple[int, ...], dtype: torch.dtype, n_sources: int = 1
    ) -> SharedBlock:
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
        block = cls(name, size, row_shape, dtype, n_sources)
        block._shm = shm
        return block

    def __reduce__(self):
        return (SharedBlock, (self.name, self.size, self.row_shape, self.dtype, self.n_sources))

    def unlink(self) -> None:
        """Remove the block's name (owner only); the memory goes once every mapping is gone."""
        if self._shm is not None:
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()
            self._shm = None

    def free_slots(self, source: int, start: int, n: int) -> np.ndarray:
        """Entries ``start:start+n`` of the source's free ring. Positions below ``implicit`` were
        handed out when the buffer was made, without being written: they hold ``base + position``."""
        at = start + np.arange(n, dtype=np.int64)
        ring = self.free_rings[source][at % self.size]
        mine = self.trainer[source]
        return np.where(at < mine["implicit"], at + mine["base"], ring)

    def snapshot(self) -> HeaderSnapshot:
        """A copy of the header, for monitoring: one read, no reference into the live block."""
        return HeaderSnapshot(self.header.copy(), self.size, self.n_sources)


@dataclass(frozen=True)
class HeaderSnapshot:
    """The header as it was at one instant (see ``HEADER``)."""

    values: np.void
    size: int
    n_sources: int

    def per_source(self, field: str) -> list[int]:
        """A generator field of each source."""
        return [int(v) for v in self.values["generator"][field][: self.n_sources]]

    @property
    def fill(self) -> int:
        """Sampleable rows."""
        return int(self.values["n_full"])

    @property
    def held(self) -> int:
        """Rows sampleable or written and waiting to be published."""
        published = self.values["trainer"]["published"][: self.n_sources]
        return self.fill + int((self.values["generator"]["written"][: self.n_sources] - published).sum())

    @property
    def done(self) -> bool:
        """Every source finished its pass."""
        return all(self.per_source("done"))


class GeneratorView:
    """What source ``source``'s generator process does to the buffer; it writes only its own fields.

    ``pause`` (seconds, tests only) makes each buffer operation stop halfway, so a kill or a save can
    be aimed inside one.
    """

    def __init__(self, block: SharedBlock, source: int, pause: float = 0.0):
        self.block, self.source, self.pause = block, source, pause
        self.mine = block.generator[source]
        self.theirs = block.trainer[source]  # the trainer's record for this source: read only here

    def _set(self, field: str, value: int) -> None:
        self.mine[field] = value

    @contextlib.contextmanager
    def _op(self, name: str):
        """Mark the source as inside a buffer operation (and pause there, for tests)."""
        self._set("op", OPS.index(name))
        yield
        self._set("op", 0)

    def _paused(self) -> None:
        if self.pause:
            time.sleep(self.pause)

    @contextlib.contextmanager
    def waiting_for_slots(self):
        """Mark the source as holding rows it cannot write until the trainer frees slots."""
        with self._op("waiting for free slots"):
            yield

    def claim(self, n: int) -> np.ndarray:
        """Take up to ``n`` of the free slots the trainer handed this source (possibly none)."""
        with self._op("claiming slots"):
            claimed = int(self.mine["claimed"])
            fence()
            n = min(n, int(self.theirs["granted"]) - claimed)
            fence()
            slots = self.block.free_slots(self.source, claimed, max(n, 0))
            self._paused()
            fence()
            self._set("claimed", claimed + len(slots))
            return slots

    def write(self, slots: np.ndarray, block: RowBlock, lo: int, hi: int) -> None:
        """Copy rows ``lo:hi`` of ``block`` and their provenance into claimed slots. Disk blocks copy
        file to file into the buffer when the slots are contiguous."""
        with self._op("writing rows"):
            self._write(slots, block, lo, hi)

    def _write(self, slots: np.ndarray, block: RowBlock, lo: int, hi: int) -> None:
        shared = self.block
        index = torch.from_numpy(slots)
        if block.read_into is None:
            shared.rows.index_copy_(0, index, block.rows[lo:hi].to(shared.dtype))
        elif np.all(np.diff(slots) == 1):
            fd = os.open(shared.path, os.O_RDWR)
            try:
                block.read_into(FileRange(fd, shared.rows_at + int(slots[0]) * shared.row_bytes), lo, hi)
            finally:
                os.close(fd)
        else:
            staged = torch.empty((hi - lo, *shared.row_shape), dtype=shared.dtype)
            block.read_into(staged.view(torch.uint8).numpy(), lo, hi)
            shared.rows.index_copy_(0, index, staged)
        self._paused()
        meta = {k: v[lo:hi] for k, v in block.meta.items()}
        meta["source"] = np.full(hi - lo, self.source, dtype=np.int64)
        for key, values in meta.items():
            shared.meta[key].index_copy_(0, index, torch.from_numpy(values))

    def push(self, slots: np.ndarray, next_block: tuple[int, int, int] | None = None) -> None:
        """Append written slots to the source's FIFO; at a block's end, record where the next one starts.

        ``next_block`` is published after the count of written rows, so a reader that sees the count
        unchanged around its read of the start never sees a start past rows it has not counted, and
        by one store (see ``NEXT_RING``), so it never sees half of one. The test pause stops between
        each two of these stores.
        """
        with self._op("pushing rows"):
            written = int(self.mine["written"])
            self.block.fifos[self.source][(written + np.arange(len(slots))) % self.block.size] = slots
            self._paused()
            fence()
            self._set("written", written + len(slots))
            if next_block is not None:
                self._paused()
                count = int(self.mine["next_blocks"]) + 1
                ring = self.mine["next_block_ring"]
                for i, value in enumerate(next_block):
                    ring[count % NEXT_RING, i] = value
                    self._paused()
                fence()
                self._set("next_blocks", count)

    def count_computed(self, rows: int) -> None:
        """Add to the rows the source has produced (filtered-out regenerated rows included)."""
        self._set("computed", int(self.mine["computed"]) + rows)

    def report_device(self, on_gpu: bool) -> None:
        self._set("on_gpu", int(on_gpu))

    def finish(self) -> None:
        fence()
        self._set("done", 1)

    def fail(self, text: str) -> None:
        data = text.encode()[-ERROR_BYTES:]
        at = self.source * ERROR_BYTES
        self.block.errors[at : at + len(data)] = np.frombuffer(data, np.uint8)
        self._set("error_len", len(data))
        fence()
        self._set("failed", 1)

    def fill_fraction(self) -> float:
        """How full the buffer is, as the generator's device policy sees it."""
        return self.block.snapshot().held / self.block.size

    def stop_requested(self) -> bool:
        return bool(self.block.header["stop"])


class TrainerView:
    """What the training process does to the buffer; it writes only the trainer's fields."""

    def __init__(self, block: SharedBlock):
        self.block = block
        self.size, self.n_sources = block.size, block.n_sources
        self.full, self.meta = block.full, block.meta

    def written(self, source: int) -> int:
        return int(self.block.generator[source]["written"])

    def claimed(self, source: int) -> int:
        return int(self.block.generator[source]["claimed"])

    def done(self, source: int) -> bool:
        return bool(self.block.generator[source]["done"])

    def operation(self, source: int) -> str:
        """What the source was last doing to the buffer (see ``OPS``)."""
        return OPS[int(self.block.generator[source]["op"])]

    def start_source(self, source: int, granted: int, base: int, next_block: tuple[int, int, int]) -> None:
        """Before the source starts: the slots ``base .. base + granted`` are its, handed out
        implicitly (no ring entry is written), and ``next_block`` is where it starts (what a state
        saved before it writes records)."""
        mine = self.block.trainer[source]
        mine["implicit"], mine["base"], mine["granted"] = granted, base, granted
        theirs = self.block.generator[source]  # the source writes these once it runs
        theirs["next_block_ring"][0] = next_block
        theirs["next_blocks"] = 0

    def mirror(self, n_full: int, served: int, published: tuple[int, ...], granted: tuple[int, ...]) -> None:
        """Copy the trainer's counters that other processes read into the header."""
        header = self.block.header
        fence()
        header["n_full"], header["served"] = n_full, served
        for k in range(self.n_sources):
            mine = self.block.trainer[k]
            mine["published"], mine["granted"] = published[k], granted[k]

    def request_stop(self) -> None:
        """Ask the generators to stop at their next check."""
        self.block.header["stop"] = 1

    def free_slots(self, source: int, start: int, n: int) -> np.ndarray:
        return self.block.free_slots(source, start, n)

    def written_slots(self, source: int, start: int, n: int) -> np.ndarray:
        """Entries ``start:start+n`` of the source's FIFO (the caller checked ``written``)."""
        fence()
        return self.block.fifos[source][(start + np.arange(n)) % self.size]

    def hand_out(self, source: int, start: int, slots: np.ndarray) -> None:
        """Store free-ring entries from position ``start`` on (``granted``, stored next, publishes them)."""
        self.block.free_rings[source][(start + np.arange(len(slots))) % self.size] = slots
        fence()

    def error_text(self) -> str | None:
        """The traceback of the first source that failed, if any did."""
        for source in range(self.n_sources):
            theirs = self.block.generator[source]
            if theirs["failed"]:
                fence()
                at = source * ERROR_BYTES
                return (
                    self.block.errors[at : at + int(theirs["error_len"])].tobytes().decode(errors="replace")
                )
        return None

    def continuation(self, source: int, published: int) -> tuple[int, int, int]:
        """(seq, record, offset) starting the block of the source's oldest unpublished row, or of the
        block it writes next when all ``published`` rows are every row it wrote."""
        theirs = self.block.generator[source]
        while True:
            written = int(theirs["written"])
            fence()
            if written > published:
                slot = self.block.fifos[source][published % self.size]
                return tuple(int(self.meta[k][slot]) for k in ("block_seq", "block_record", "block_offset"))
            count = int(theirs["next_blocks"])
            fence()
            start = tuple(int(v) for v in theirs["next_block_ring"][count % NEXT_RING])
            fence()
            overwritten = int(theirs["next_blocks"]) - count >= NEXT_RING - 1
            if int(theirs["written"]) == written and not overwritten:
                return start

    def meta_of(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        return {key: self.meta[key].numpy()[slots] for key in META}

    def gather(self, slots: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy rows out (into ``out`` when given). A large batch is copied by ``index_select`` on
        torch's intra-op threads (as many as the caller's ``torch.get_num_threads()``, never changed
        here); a small one on this thread, where waking the thread pool would cost more than the
        copy (and far more when another process, such as the generator, holds the other cores)."""
        block = self.block
        if out is None:
            out = torch.empty((len(slots), *block.row_shape), dtype=block.dtype)
        if len(slots) * block.row_bytes >= PARALLEL_GATHER_BYTES and torch.get_num_threads() > 1:
            flat = block.rows.view(block.size, -1)
            torch.index_select(flat, 0, torch.from_numpy(slots), out=out.view(len(slots), -1))
            return out
        raw = block.rows.view(torch.uint8).view(block.size, block.row_bytes).numpy()  # any dtype
        dest = out.view(torch.uint8).view(len(slots), block.row_bytes).numpy()
        np.take(raw, slots, axis=0, out=dest, mode="clip")  # in range: "clip" skips a bounds pass
        return out

    def provenance(self, slots: np.ndarray) -> dict[str, torch.Tensor]:
        """``seq``, ``pos``, ``token_ids`` and ``source`` of the rows in ``slots``."""
        index = torch.from_numpy(slots)
        return {
            key: torch.index_select(self.meta[key], 0, index) for key in ("seq", "pos", "token_ids", "source")
        }
