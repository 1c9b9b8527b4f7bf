"""Writing the HDF5 cache format (see ``hdf5``): ``Hdf5RowWriter`` appends row blocks whole chunk by
whole chunk, under a temporary name (``to_hdf5``) or durably in place (the write-through cache), and
adds the statistics of the rows when the file is finished."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from actvpipe.capture import DEFAULT_CAPTURE, describe_capture
from actvpipe.hdf5 import (
    BF16_STORAGE,
    CHUNK_BYTES,
    FORMAT,
    META_DATASETS,
    READ_BYTES,
    dtype_name,
    from_storage,
    storage_dtype,
    to_storage,
)
from actvpipe.records import RowBlock
from actvpipe.stats import ActivationStats, Welford


class Hdf5RowWriter:
    """Appends row blocks to a new file; ``finish()`` adds the statistics and marks it complete.

    Activations go to disk a whole chunk at a time with ``write_direct_chunk`` (no hyperslab
    selection, no read-modify-write of a chunk split between blocks). By default the file is written
    under a temporary name, renamed into place by ``finish()``, and a partial chunk waits in memory.
    With ``durable=True`` it is written in place in SWMR mode and every ``write`` commits: the partial
    chunk is written too, the file flushed, then ``row_count`` moved on, so a writer killed at any
    instant leaves a valid file holding every committed row (``continue_file`` resumes it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        attrs: dict,
        durable: bool = False,
    ):
        self.path = Path(path)
        self.tmp = self.path if durable else self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        file = h5py.File(self.tmp, "w", libver="latest" if durable else None)
        stored = storage_dtype(dtype)
        chunk_rows = max(1, -(-CHUNK_BYTES // (int(np.prod(row_shape)) * stored.itemsize)))
        file.create_dataset(
            "activations",
            (0, *row_shape),
            stored,
            maxshape=(None, *row_shape),
            chunks=(chunk_rows, *row_shape),
        )
        for k in META_DATASETS:
            file.create_dataset(k, (0,), np.int64, maxshape=(None,), chunks=(chunk_rows,))
        attrs = {
            "capture": describe_capture(DEFAULT_CAPTURE),
            **attrs,
            "format": FORMAT,
            "dtype": dtype_name(dtype),
            "row_count": 0,
            "complete": False,
        }
        attrs["storage"] = BF16_STORAGE if dtype == torch.bfloat16 else "native"
        file.attrs.update(attrs)
        self._attach(file, dtype, 0, durable)

    @classmethod
    def continue_file(cls, path: str | os.PathLike) -> Hdf5RowWriter:
        """Reopen an incomplete durable file (left by a writer that stopped or died) after its last
        committed row."""
        writer = cls.__new__(cls)
        writer.path = writer.tmp = Path(path)
        file = _open_for_append(writer.path)
        writer._attach(file, getattr(torch, file.attrs["dtype"]), int(file.attrs["row_count"]), True)
        first = writer.rows - writer._in_partial
        writer._partial[: writer._in_partial] = writer.acts[first : writer.rows]
        return writer

    def _attach(self, file: h5py.File, dtype: torch.dtype, rows: int, durable: bool) -> None:
        self.file, self.dtype, self.rows, self.durable = file, dtype, rows, durable
        self.acts = file["activations"]
        self.meta = {k: file[k] for k in META_DATASETS}
        self.chunk_rows = self.acts.chunks[0]
        self._partial = np.zeros((self.chunk_rows, *self.acts.shape[1:]), self.acts.dtype)
        self._in_partial = rows % self.chunk_rows
        if durable:
            file.swmr_mode = True

    @property
    def last_row(self) -> dict[str, int] | None:
        """``seq`` and ``pos`` of the last committed row (None when there is none)."""
        if self.rows == 0:
            return None
        return {k: int(self.meta[k][self.rows - 1]) for k in ("seq", "pos")}

    def write(self, block: RowBlock, limit: int | None = None) -> int:
        """Append up to ``limit`` rows of ``block``; returns how many were written."""
        n = len(block) if limit is None else min(limit, len(block))
        end = self.rows + n
        self.acts.resize(end, axis=0)
        rows = to_storage(block.rows[:n], self.dtype)
        first = self.rows - self._in_partial  # first row of the chunk being filled
        if self._in_partial:
            take = min(n, self.chunk_rows - self._in_partial)
            self._partial[self._in_partial : self._in_partial + take] = rows[:take]
            self._in_partial += take
            rows = rows[take:]
            if self._in_partial == self.chunk_rows:
                self._write_chunk(first, self._partial)
                first, self._in_partial = first + self.chunk_rows, 0
        whole = len(rows) - len(rows) % self.chunk_rows
        for at in range(0, whole, self.chunk_rows):
            self._write_chunk(first + at, rows[at : at + self.chunk_rows])
        rest = len(rows) - whole
        if rest:
            self._partial[:rest] = rows[whole:]
            self._in_partial = rest
        for key, dataset in self.meta.items():
            dataset.resize(end, axis=0)
            dataset[self.rows : end] = block.meta[key][:n]
        self.rows = end
        if self.durable:
            self._commit()
        return n

    def _commit(self) -> None:
        """Put every written row on disk, then count it: ``row_count`` never names a row that a
        kill could lose (the rows of the partial chunk are rewritten with the same bytes later)."""
        if self._in_partial:
            self._partial[self._in_partial :] = 0
            self._write_chunk(self.rows - self._in_partial, self._partial)
        self.file.flush()
        self.file.attrs["row_count"] = self.rows
        self.file.flush()

    def _write_chunk(self, row: int, rows: np.ndarray) -> None:
        self.acts.id.write_direct_chunk((row, *[0] * (rows.ndim - 1)), np.ascontiguousarray(rows))

    def finish(self, with_stats: bool = True) -> Path:
        """Write the statistics of the file's rows (see ``file_stats``; a pass over the rows that costs
        more than writing them), mark the file complete, close it and move it into place."""
        if self._in_partial:
            self._partial[self._in_partial :] = 0
            self._write_chunk(self.rows - self._in_partial, self._partial)
        stats = file_stats(self.acts, self.dtype, self.rows) if self.rows and with_stats else None
        if self.durable:  # SWMR mode creates no objects: reopen plainly (for milliseconds) to add them
            self.file.close()
            self.file = h5py.File(self.tmp, "r+")
            for dataset in (self.file["activations"], *(self.file[k] for k in META_DATASETS)):
                dataset.resize(self.rows, axis=0)  # drop rows written after the last commit
        if stats is not None:
            group = self.file.create_group("stats")
            group.attrs["rows"] = stats.rows
            for key in ("mean", "std", "mean_norm"):
                group.create_dataset(key, data=getattr(stats, key).numpy())
        self.file.attrs.update({"row_count": self.rows, "complete": True})
        self.file.close()
        if self.tmp != self.path:
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        if self.tmp != self.path:
            self.tmp.unlink(missing_ok=True)


def file_stats(acts: h5py.Dataset, dtype: torch.dtype, rows: int) -> ActivationStats:
    """Statistics of a file's first ``rows`` rows, read back in fixed pieces: a function of the file's
    content alone, so a file written in one go and one written through a stream and its resumes hold
    the same statistics. Datasets ``stats/mean``, ``stats/std`` ``[k, n_layers, d_model]`` and
    ``stats/mean_norm`` ``[k, n_layers]`` with attribute ``rows`` (HDF5 limits attributes to 64 KiB)."""
    welford = Welford()
    step = max(1, READ_BYTES // (int(np.prod(acts.shape[1:])) * acts.dtype.itemsize))
    for lo in range(0, rows, step):
        welford.update(from_storage(acts[lo : min(rows, lo + step)], dtype))
    return welford.result()


# HDF5's file-access property that h5clear sets to open a file whose writer died in SWMR mode
# (its superblock still says "open for writing"); set through the public H5Pset.
CLEAR_STATUS_FLAGS = b"clear_status_flags"


def _open_for_append(path: Path) -> h5py.File:
    """Open a durable file for writing, clearing the "open for writing" mark a killed writer left."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    library = ctypes.CDLL(h5py.h5p.__file__)  # dlsym searches the extension's libhdf5 too
    clear = ctypes.c_bool(True)
    if library.H5Pset(ctypes.c_int64(fapl.id), CLEAR_STATUS_FLAGS, ctypes.byref(clear)) < 0:
        raise OSError(f"hdf5: cannot reopen {str(path)!r} to append (HDF5 refused {CLEAR_STATUS_FLAGS!r})")
    return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl))
