"""Restore from the write-through cache: the saved buffer's rows are read back from the file the run
wrote (every row is committed there before it can be served) instead of re-running the blocks that
produced them; only the block streaming continues from is computed again.

The file holds rows of this very stream: its attributes, the weights' and data's content digest
included, matched the stream's before the run started (``check_write_target``). Rows it does not
hold (a file cut short) are regenerated from their blocks as without a cache.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from actvpipe.generator_node import PlannedNode
from actvpipe.hdf5 import META_DATASETS, READ_BYTES, _chunk_table, copy_raw_rows, open_h5
from actvpipe.records import FileRange, RowBlock
from actvpipe.resume import ResumePlan
from actvpipe.write_through import row_id

META_PIECE = 1 << 20  # file rows whose seq/pos are read at a time while looking up the buffered rows


@dataclass(frozen=True)
class CachedRows:
    """Buffered rows found in a cache file: their file rows (ascending) and their ``RowBlock`` meta."""

    path: str
    file_rows: np.ndarray
    meta: dict[str, np.ndarray]
    chunks: tuple[int, np.ndarray]  # ``_chunk_table`` of the file's activations
    row_bytes: int


def split_plan(
    path: str, plan: ResumePlan, context_length: int, first_pos: int
) -> tuple[ResumePlan, CachedRows | None]:
    """The buffered rows of ``plan`` that the file at ``path`` holds, and the plan for the rest: only
    the blocks holding rows the file lacks, and the block streaming continues from."""
    wanted = plan.buffered
    if len(wanted) == 0 or not os.path.exists(path):
        return plan, None
    per_context = context_length - first_pos
    with open_h5(path) as f:
        rows = int(f.attrs["row_count"])
        acts = f["activations"]
        chunks = _chunk_table(acts, rows) if rows else None
        if chunks is None:  # filtered or unreadable raw: recompute, as without a cache
            return plan, None
        row_bytes = int(np.prod(acts.shape[1:])) * acts.dtype.itemsize
        found_ids, file_rows, meta = _lookup(f, rows, wanted, context_length, first_pos)
    found = np.isin(wanted, found_ids, assume_unique=True)
    starts = plan.blocks[:, 0]
    block_of = np.searchsorted(starts, meta["seq"], side="right") - 1
    for i, key in enumerate(("block_seq", "block_record", "block_offset")):
        meta[key] = plan.blocks[block_of, i]
    meta["row_id"] = found_ids
    rest = wanted[~found]
    needed = np.unique(np.searchsorted(starts, rest // per_context, side="right") - 1)
    blocks = plan.blocks[np.union1d(needed, [len(starts) - 1])]
    cached = CachedRows(path, file_rows, meta, chunks, row_bytes) if len(found_ids) else None
    return ResumePlan(plan.frontier, rest, blocks), cached


def _lookup(f, rows: int, wanted: np.ndarray, context_length: int, first_pos: int):
    """(ids found, their file rows, their seq/pos/token_ids), reading the file's ids backwards from
    the newest row that can hold the largest wanted id (ids ascend, so row ``k`` has id >= first + k)
    until past the smallest."""
    seq, pos = f["seq"], f["pos"]

    def ids(lo: int, hi: int) -> np.ndarray:
        return row_id(seq[lo:hi], pos[lo:hi], context_length, first_pos)

    first = int(ids(0, 1)[0])
    hi = max(0, min(rows, int(wanted[-1]) - first + 1))
    pieces = []
    while hi > 0:
        lo = max(0, hi - META_PIECE)
        held = ids(lo, hi)
        at = np.searchsorted(held, wanted)
        hit = at < len(held)
        hit[hit] = held[at[hit]] == wanted[hit]
        if hit.any():
            index = lo + at[hit]
            pieces.append((wanted[hit], index, {k: f[k][lo:hi][at[hit]] for k in META_DATASETS}))
        if held[0] <= wanted[0]:
            break
        hi = lo
    pieces.reverse()
    found = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int64)
    file_rows = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
    meta = {
        k: np.concatenate([p[2][k] for p in pieces]) if pieces else np.zeros(0, np.int64)
        for k in META_DATASETS
    }
    return found, file_rows, meta


class CachedThenComputed(PlannedNode[RowBlock]):
    """The cached buffered rows, read from the file by raw chunk offsets straight into the buffer,
    then the rows of ``rest`` (the graph computing the rest of the plan)."""

    def __init__(self, cached: CachedRows, rest: PlannedNode[RowBlock]):
        super().__init__()
        self.cached, self.rest = cached, rest
        self.block_rows = max(1, READ_BYTES // cached.row_bytes)
        self._fd: int | None = None

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._close_file()
        self._fd = os.open(self.cached.path, os.O_RDONLY)
        self._next = 0
        self.rest.reset(initial_state)

    def next(self) -> RowBlock:
        lo = self._next
        if lo >= len(self.cached.file_rows):
            try:
                return next(self.rest)
            except StopIteration:
                self._close_file()
                raise
        hi = self._next = min(len(self.cached.file_rows), lo + self.block_rows)
        meta = {k: v[lo:hi] for k, v in self.cached.meta.items()}
        read = functools.partial(self._read, self._fd, self.cached.file_rows[lo:hi])
        return RowBlock(None, meta, read_into=read)

    def _read(self, fd: int, file_rows: np.ndarray, dest: np.ndarray | FileRange, lo: int, hi: int) -> None:
        """Rows ``lo:hi`` of a block (file rows ``file_rows``) into ``dest``, a read per run of
        consecutive file rows."""
        c, part = self.cached, file_rows[lo:hi]
        cuts = np.flatnonzero(np.diff(part) != 1) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(part)], strict=True):
            into = (
                FileRange(dest.fd, dest.offset + a * c.row_bytes)
                if isinstance(dest, FileRange)
                else dest.reshape(-1)[a * c.row_bytes : b * c.row_bytes]
            )
            copy_raw_rows(fd, c.chunks, c.row_bytes, int(part[a]), int(part[b - 1]) + 1, into, c.path)

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_file()
        self.rest.close()
