"""HDF5 activation cache: the file format, validation, and the node that reads rows back (the
writer is ``hdf5_writer``).

A file holds ``activations [N, k, n_layers, d_model]`` (``[N, n_models, k, ...]`` for several
models; chunked by several MiB, uncompressed), ``token_ids``, ``seq`` and ``pos`` ``[N]``, and
attributes describing how the rows were made.
float32 and float16 are stored natively; bfloat16 as its raw 16 bits (``uint16``) with
``storage = "bfloat16-as-uint16"``. ``to_hdf5`` writes under a temporary name and renames the file
when complete; a write-through cache is written in place in HDF5's SWMR mode, which keeps the file
valid whenever the writer dies, with ``complete = False`` and ``row_count`` the rows committed.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch

from actvpipe.capture import capture_points
from actvpipe.generator_node import PlannedNode
from actvpipe.records import FileRange, RowBlock

FORMAT = "actvpipe-activations/1"
CHUNK_BYTES = 4 << 20
READ_BYTES = 64 << 20
BF16_STORAGE = "bfloat16-as-uint16"
META_DATASETS = ("token_ids", "seq", "pos")
MATCHED_ATTRS = ("format", "n_models", "capture", "layers", "d_model", "dtype")
ATTR_DEFAULTS = {"n_models": 1}  # what a file without the attribute means


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def storage_dtype(dtype: torch.dtype) -> np.dtype:
    """How rows of ``dtype`` are stored: natively, or bfloat16 as its raw bits."""
    if dtype == torch.bfloat16:
        return np.dtype(np.uint16)
    if dtype not in (torch.float32, torch.float16, torch.float64):
        raise ValueError(
            f"dtype: {dtype} cannot be stored; use torch.float32, torch.float16 or torch.bfloat16"
        )
    return np.dtype(dtype_name(dtype))


def to_storage(rows: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    rows = rows.to(dtype)
    return rows.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else rows.numpy()


def from_storage(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@dataclass(frozen=True)
class Hdf5File:
    """A validated cache file: its path, row count and attributes."""

    path: str
    rows: int
    attrs: dict[str, Any]
    plugin_filters: tuple[int, ...] = ()  # HDF5 filters of the rows that only a plugin decodes

    @property
    def row_shape(self) -> tuple[int, ...]:
        models = (self.n_models,) if self.n_models > 1 else ()
        return (*models, len(self.capture), len(self.attrs["layers"]), int(self.attrs["d_model"]))

    @property
    def n_models(self) -> int:
        """Models side by side in each row (files of one model have no models axis)."""
        return int(self.attrs.get("n_models", 1))

    @property
    def capture(self) -> list[str]:
        return capture_points(self.attrs["capture"])

    @property
    def complete(self) -> bool:
        """False for a write-through cache still being written, or left by a run that stopped."""
        return bool(self.attrs.get("complete", True))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.attrs["dtype"])


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A path, a glob pattern, or a list of either, in order; a pattern must match something."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out = []
    for item in map(os.fspath, items):
        if glob.has_magic(item):
            matched = sorted(glob.glob(item))
            if not matched:
                raise FileNotFoundError(f"hdf5: the pattern {item!r} matches no file")
            out += matched
        else:
            out.append(item)
    if not out:
        raise ValueError("hdf5: no files given; pass a path, a list of paths or a glob pattern")
    return out


def open_cache_file(path: str) -> Hdf5File:
    """Open and validate one file, naming the file and the problem on any failure."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"hdf5: no such file {path!r}")
    try:
        with open_h5(path) as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            shapes = {k: f[k].shape for k in ("activations", *META_DATASETS) if k in f}
            filters = _filters(f["activations"]) if "activations" in f else ()
    except OSError as exc:
        raise ValueError(
            f"hdf5: {path!r} is not a readable HDF5 file (corrupt or truncated?): {exc}"
        ) from exc
    if attrs.get("format") != FORMAT:
        raise ValueError(
            f"hdf5: {path!r} is not an actvpipe activation file (format {attrs.get('format')!r})"
        )
    missing = [k for k in ("activations", *META_DATASETS) if k not in shapes]
    if missing:
        raise ValueError(f"hdf5: {path!r} lacks datasets {missing}; the file is damaged, write it again")
    rows = attrs.get("row_count")
    lengths = [shapes[k][0] for k in ("activations", *META_DATASETS)]
    whole = attrs.get("complete", True)
    if not isinstance(rows, int) or (any(n != rows for n in lengths) if whole else min(lengths) < rows):
        raise ValueError(
            f"hdf5: {path!r} is truncated or incomplete: row_count={rows!r} but activations has "
            f"{lengths[0]} rows; write it again"
        )
    plugins = tuple(sorted({code for code, _ in filters if code >= FIRST_PLUGIN_FILTER}))
    missing = [f"{name or 'unnamed'} (filter {code})" for code, name in filters if not decodable(code)]
    if missing:
        raise ValueError(
            f"hdf5: {path!r} stores its rows with {', '.join(missing)}, which this HDF5 cannot decode; "
            "pip install hdf5plugin (actvpipe imports it when a file needs it)"
        )
    file = Hdf5File(path, rows, attrs, plugins)
    if shapes["activations"][1:] != file.row_shape:
        raise ValueError(
            f"hdf5: {path!r} has rows {shapes['activations'][1:]}, its attributes say {file.row_shape}"
        )
    return file


FIRST_PLUGIN_FILTER = 256  # HDF5's own filters (deflate, shuffle, scale-offset, ...) have lower ids


def _filters(dataset: h5py.Dataset) -> list[tuple[int, str]]:
    """(id, name) of each filter in the dataset's creation property list."""
    plist = dataset.id.get_create_plist()
    return [
        (int(info[0]), info[3].decode(errors="replace").split(";")[0])
        for info in map(plist.get_filter, range(plist.get_nfilters()))
    ]


def decodable(code: int) -> bool:
    """Whether this process can decode HDF5 filter ``code``, importing ``hdf5plugin`` (which
    registers the common plugin filters) when a plugin's is needed and it is installed."""
    if h5py.h5z.filter_avail(code):
        return True
    if code >= FIRST_PLUGIN_FILTER:
        with contextlib.suppress(ImportError):
            import hdf5plugin  # noqa: F401

    return bool(h5py.h5z.filter_avail(code))


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open a file for reading; a write-through cache whose writer is running or died is opened in
    SWMR mode (a plain open refuses a file marked as open for writing)."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise
        return h5py.File(path, "r", swmr=True)


def check_matching(files: Sequence[Hdf5File], expected: dict[str, Any], what: str) -> None:
    """Every file must match ``expected`` (attributes of the first file, or of a live stream)."""
    for file in files:
        held = {k: file.attrs.get(k, ATTR_DEFAULTS.get(k)) for k in MATCHED_ATTRS}
        wanted = {k: expected.get(k, ATTR_DEFAULTS.get(k)) for k in MATCHED_ATTRS}
        diffs = [
            f"{k}: {_shown(k, held[k])} vs {_shown(k, wanted[k])}"
            for k in MATCHED_ATTRS
            if held[k] != wanted[k]
        ]
        if diffs:
            raise ValueError(f"hdf5: {file.path!r} does not match {what}: {'; '.join(diffs)}")


def _shown(key: str, value: Any) -> str:
    """An attribute in an error message: capture descriptions as their list of points."""
    return repr(capture_points(value) if key == "capture" and isinstance(value, str) else value)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class Hdf5Rows(PlannedNode[RowBlock]):
    """Reads files' rows in large contiguous ranges, in order, as one pass with row ids across files.

    With a resume plan it first reads back the saved buffered rows, then continues at the frontier.
    Blocks carry ``read_into``: rows go from the file straight into their destination, by ``preadv``
    at each chunk's byte offset (chunks are uncompressed and span whole rows), bypassing HDF5's
    hyperslab machinery; other layouts fall back to ``read_direct``.
    """

    def __init__(self, files: Sequence[Hdf5File], buffered: np.ndarray, frontier: int):
        super().__init__()
        self.files = list(files)
        self.starts = np.cumsum([0] + [f.rows for f in self.files])
        self.buffered = buffered
        self.frontier = frontier
        self.row_bytes = int(np.prod(self.files[0].row_shape)) * storage_dtype(self.files[0].dtype).itemsize
        self.read_rows = max(1, READ_BYTES // self.row_bytes)
        self._open: dict[int, _OpenFile] = {}  # file index -> open file, oldest first

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.close()
        self._ranges = iter(self._plan_ranges())

    def _file(self, i: int) -> _OpenFile:
        """File ``i``, opened on first use; at most ``MAX_OPEN_FILES`` stay open (a pass reads its
        files in order), so thousands of files never reach the descriptor limit."""
        file = self._open.pop(i, None)
        if file is None:
            if len(self._open) >= MAX_OPEN_FILES:
                self._open.pop(next(iter(self._open))).close()
            file = _OpenFile.of(self.files[i])
        self._open[i] = file
        return file

    def _plan_ranges(self):
        """(start, stop) global row ranges: runs of buffered rows, then the rest of the pass."""
        ids = self.buffered
        if len(ids):
            breaks = np.flatnonzero(np.diff(ids) != 1) + 1
            for run in np.split(ids, breaks):
                yield from self._split(int(run[0]), int(run[-1]) + 1)
        yield from self._split(self.frontier, int(self.starts[-1]))

    def _split(self, start: int, stop: int):
        """Cut a global range at file boundaries and at ``read_rows``."""
        while start < stop:
            i = int(np.searchsorted(self.starts, start, side="right")) - 1
            end = min(stop, int(self.starts[i + 1]), start + self.read_rows)
            yield start, end
            start = end

    def _read(self, i: int, first: int, dest: np.ndarray | FileRange, lo: int, hi: int) -> None:
        """Rows ``first + lo : first + hi`` of file ``i`` into ``dest`` (whole rows).

        Into a file, raw chunks go by ``sendfile``: a kernel copy from the page cache, with none of
        the page faults that writing fresh shared memory through a mapping costs."""
        a, b = first + lo, first + hi
        file = self._file(i)
        table = file.chunks
        if table is None:
            acts = file.h5["activations"]
            out = np.empty((b - a) * self.row_bytes, np.uint8) if isinstance(dest, FileRange) else dest
            acts.read_direct(out.view(acts.dtype).reshape(b - a, *acts.shape[1:]), np.s_[a:b])
            if isinstance(dest, FileRange):
                _write_all(dest.fd, memoryview(out), dest.offset)
            return
        copy_raw_rows(file.fd, table, self.row_bytes, a, b, dest, self.files[i].path)

    def close(self) -> None:
        """Close the files (at the end of the pass, or when the reader is abandoned)."""
        for file in self._open.values():
            file.close()
        self._open = {}

    def next(self) -> RowBlock:
        try:
            start, stop = next(self._ranges)
        except StopIteration:
            self.close()
            raise
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        a, b = start - int(self.starts[i]), stop - int(self.starts[i])
        f, n = self._file(i).h5, stop - start
        meta = {k: f[k][a:b] for k in META_DATASETS}
        meta["row_id"] = np.arange(start, stop, dtype=np.int64)
        meta.update({k: np.zeros(n, dtype=np.int64) for k in ("block_seq", "block_record", "block_offset")})
        return RowBlock(None, meta, computed=n, read_into=functools.partial(self._read, i, a))


MAX_OPEN_FILES = 32


@dataclass
class _OpenFile:
    """A cache file open for reading: through h5py, and by descriptor for raw chunk reads."""

    h5: h5py.File
    fd: int
    chunks: tuple[int, np.ndarray] | None  # see ``_chunk_table``

    @classmethod
    def of(cls, file: Hdf5File) -> _OpenFile:
        h5 = open_h5(file.path)
        return cls(h5, os.open(file.path, os.O_RDONLY), _chunk_table(h5["activations"], file.rows))

    def close(self) -> None:
        self.h5.close()
        os.close(self.fd)


def copy_raw_rows(
    fd: int,
    table: tuple[int, np.ndarray],
    row_bytes: int,
    a: int,
    b: int,
    dest: np.ndarray | FileRange,
    path: str,
) -> None:
    """Rows ``a:b`` of an unfiltered file (``fd``, its ``_chunk_table``) into ``dest``, chunk by chunk:
    by ``preadv`` into an array, by ``sendfile`` into a ``FileRange``."""
    chunk_rows, offsets = table
    row = a
    while row < b:
        c = row // chunk_rows
        end = min(b, (c + 1) * chunk_rows)
        at, nbytes = (row - a) * row_bytes, (end - row) * row_bytes
        src = int(offsets[c]) + (row - c * chunk_rows) * row_bytes
        if isinstance(dest, FileRange):
            got = _send_all(dest.fd, fd, src, nbytes, dest.offset + at)
        else:
            got = os.preadv(fd, [dest.reshape(-1)[at : at + nbytes]], src)
        if got != nbytes:
            raise OSError(f"hdf5: short read from {path!r}; the file changed while reading")
        row = end


def _send_all(out_fd: int, in_fd: int, src: int, nbytes: int, dst: int) -> int:
    """Copy ``nbytes`` at ``src`` of ``in_fd`` to ``dst`` of ``out_fd`` in the kernel; bytes copied."""
    os.lseek(out_fd, dst, os.SEEK_SET)
    done = 0
    while done < nbytes:
        sent = os.sendfile(out_fd, in_fd, src + done, nbytes - done)
        if sent == 0:
            break
        done += sent
    return done


def _write_all(fd: int, data: memoryview, at: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, at)
        data, at = data[written:], at + written


def _chunk_table(acts: h5py.Dataset, rows: int) -> tuple[int, np.ndarray] | None:
    """(rows per chunk, byte offset of each chunk in row order) when the first ``rows`` rows can be
    read raw: chunks of whole rows, no filter of any kind in the dataset's creation property list
    (compression, shuffle, scale-offset, n-bit, plugins), and each of their chunks allocated. Else
    None: read through h5py."""
    if acts.chunks is None or acts.chunks[1:] != acts.shape[1:]:
        return None
    if acts.id.get_create_plist().get_nfilters():
        return None
    chunk_rows = acts.chunks[0]
    offsets = np.full(-(-rows // chunk_rows), -1, dtype=np.int64)

    def record(info) -> None:
        chunk = info.chunk_offset[0] // chunk_rows
        if chunk < len(offsets):
            offsets[chunk] = info.byte_offset

    try:
        acts.id.chunk_iter(record)
    except (AttributeError, NotImplementedError):  # h5py built on an HDF5 older than 1.12.3
        return None
    return None if (offsets < 0).any() else (chunk_rows, offsets)
