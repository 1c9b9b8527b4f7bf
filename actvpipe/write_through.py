"""Write-through cache: the live generator appends every row it generates to an HDF5 file, in
generation order, before the row can be served, so one pass both streams and caches.

The file is written in place and durably (``Hdf5RowWriter(durable=True)``): a kill leaves it valid
up to its last committed block with ``complete = False``. Any later pass of the same stream, restored
from a saved state or started afresh, continues it after its last row: rows a restore regenerates
that the file already holds are not written again, so it has no gap and no duplicate.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torchdata.nodes import BaseNode

from actvpipe.generator_node import PlannedNode
from actvpipe.hdf5 import FORMAT, dtype_name, open_cache_file, open_h5
from actvpipe.hdf5_writer import Hdf5RowWriter
from actvpipe.records import RowBlock

if TYPE_CHECKING:
    from actvpipe.spec import StreamSpec

IGNORED_ATTRS = ("actvpipe_version", "row_count", "complete", "storage")


def check_write_target(path: str | os.PathLike, spec: StreamSpec) -> str:
    """The file this rank writes, checked before any work: its directory exists, and a file already
    there holds rows of this same stream (to continue or, if complete, leave as it is)."""
    text, rank, world_size = os.fspath(path), spec.rank, spec.world_size
    if world_size > 1:
        if "{rank}" not in text:
            raise ValueError(
                f"write_hdf5: with {world_size} ranks each writes its own file; put {{rank}} in the path, "
                f"e.g. {text.removesuffix('.h5')}-{{rank}}.h5"
            )
        text = text.format(rank=rank)
    target = Path(text).expanduser()
    if not target.parent.is_dir():
        raise FileNotFoundError(f"write_hdf5: no such directory {str(target.parent)!r}; create it first")
    if target.exists():
        held = open_cache_file(str(target)).attrs
        attrs = {**spec.file_attrs(), "format": FORMAT, "dtype": dtype_name(spec.dtype)}
        keys = sorted((set(attrs) | set(held)) - set(IGNORED_ATTRS))
        diffs = [
            f"{k}: file {held.get(k)!r}, stream {attrs.get(k)!r}" for k in keys if held.get(k) != attrs.get(k)
        ]
        if diffs:
            raise ValueError(
                f"write_hdf5: {str(target)!r} holds rows of another stream ({'; '.join(diffs)}); "
                "pass a new path, or delete the file to write it again"
            )
    return str(target)


def row_id(seq: int, pos: int, context_length: int, first_pos: int) -> int:
    """The id of the row at position ``pos`` of context ``seq`` (see ``capture.row_provenance``)."""
    return seq * (context_length - first_pos) + pos - first_pos


def check_continuation(spec: StreamSpec, path: str, frontier: int) -> None:
    """A restored pass continues the file its run wrote, which holds every row published before the
    save (rows are committed before they are published): a file missing those rows would keep a gap.
    Row ids are contiguous unless tokens are excluded, contexts padded or ranks interleaved; then
    only a missing or empty file is caught."""
    if frontier == 0:
        return
    rows = open_cache_file(path).rows if os.path.exists(path) else 0
    last = -1
    if rows:
        with open_h5(path) as f:
            seq, pos = int(f["seq"][rows - 1]), int(f["pos"][rows - 1])
        last = row_id(seq, pos, spec.context_length, spec.first_pos)
    contiguous = not spec.exclude_tokens and spec.packing == "concat" and spec.world_size == 1
    if last < 0 or (contiguous and last + 1 < frontier):
        raise ValueError(
            f"write_hdf5: {path!r} holds {rows:,} rows, but the state was saved after {frontier:,} rows of "
            "the pass had been published; a restored pass continues the file its run wrote. Pass that "
            "file's path, or a new path without restoring the state (a fresh pass writes it whole)"
        )


class WriteThrough(PlannedNode[RowBlock]):
    """Passes blocks through unchanged, first appending the rows the file does not hold yet; at the
    end of the pass adds the statistics and marks the file complete.

    Row ids ascend through a pass, so "not held yet" is "after the file's last row" (its ``seq`` and
    ``pos`` give its id, ``row_id``). A block's rows are written on a background thread while the
    next block is computed, and the block is returned once they are committed: the write costs the
    pass little time, at the price of one more block in memory and a block's delay before its rows
    can be served.
    """

    def __init__(
        self,
        source: BaseNode[RowBlock],
        path: str,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        attrs: dict[str, Any],
        context_length: int,
        first_pos: int,
    ):
        super().__init__()
        self.source = source
        self.path, self.row_shape, self.dtype, self.attrs = path, row_shape, dtype, attrs
        self.context_length, self.first_pos = context_length, first_pos
        self._writer: Hdf5RowWriter | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._pending: _Pending | None = None
        self._last = -1

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state)
        if self._pending is not None and self._pending.written is not None:
            self._pending.written.result()  # a write in flight ends (or raises) before the restart
        self._pending = None
        if self._writer is not None:
            return
        if not os.path.exists(self.path):
            self._writer = Hdf5RowWriter(self.path, self.row_shape, self.dtype, self.attrs, durable=True)
        elif not open_cache_file(self.path).complete:
            self._writer = Hdf5RowWriter.continue_file(self.path)
        else:
            return  # the file already holds the whole pass
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="actvpipe-write-through")
        last = self._writer.last_row
        if last is not None:
            self._last = row_id(last["seq"], last["pos"], self.context_length, self.first_pos)

    def next(self) -> RowBlock:
        current = self._pending or self._pull()
        if current is _END:
            self._pending = _END
            self._finish()
            raise StopIteration
        self._pending = self._pull()  # the next forward runs while this block is written
        if current.written is not None:
            current.written.result()
        return current.block

    def _pull(self) -> _Pending:
        """The source's next block, its new rows handed to the writer thread (``_END`` at the end)."""
        try:
            block = next(self.source)
        except StopIteration:
            return _END
        written = None
        if self._writer is not None and len(block):
            ids = block.meta["row_id"]
            new = ids > self._last
            if new.any():
                written = self._thread.submit(self._writer.write, block if new.all() else block.select(new))
                self._last = int(ids[new][-1])
        return _Pending(block, written)

    def _finish(self) -> None:
        if self._writer is not None:
            self._thread.shutdown()
            self._writer.finish()
            self._writer = self._thread = None


@dataclass
class _Pending:
    """A block pulled from the source, ``written`` while the next one is computed."""

    block: RowBlock
    written: Future | None


_END = _Pending(None, None)  # the source ended
