"""P6: HDF5 cache IO against plain sequential file IO of the same bytes, measured in one run.

- write: rows/s through ``Hdf5RowWriter`` as ``to_hdf5`` writes a file (with the statistics pass
  it always makes) / rows/s of writing the same arrays to a plain file, each from open to close,
  timed ABBA
- read: rows/s that ``from_hdf5`` moves into the shared buffer, from ``start()`` to the last row /
  rows/s of opening the file and ``sendfile``-ing it into a new shared-memory block

GPT-2-small rows ([2, 12, 768] float32, 73.7 KB). Both sides read from the page cache.
Run: python -m benchmarks.hdf5_io [--quick]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import torch

import actvpipe
from actvpipe.hdf5 import META_DATASETS
from actvpipe.hdf5_writer import Hdf5RowWriter
from actvpipe.records import RowBlock
from benchmarks.common import Result, cli, warm_memory

ROW = (2, 12, 768)


def blocks(n_rows: int, block_rows: int) -> list[RowBlock]:
    """In-memory blocks of random rows with provenance, as the capture stage produces them."""
    out, gen = [], torch.Generator().manual_seed(0)
    for start in range(0, n_rows, block_rows):
        n = min(block_rows, n_rows - start)
        meta = {k: np.arange(start, start + n, dtype=np.int64) for k in (*META_DATASETS, "row_id")}
        out.append(RowBlock(torch.randn((n, *ROW), generator=gen), meta))
    return out


def write_rates(path: Path, data: list[RowBlock]) -> tuple[float, float]:
    """Rows/s of ``Hdf5RowWriter`` and of writing the same arrays to a plain file, each from opening
    the file to closing it, timed ours, plain, plain, ours on warmed RAM."""
    rows = sum(len(b) for b in data)
    nbytes = rows * int(np.prod(ROW)) * 4

    def ours() -> float:
        start = time.perf_counter()
        writer = Hdf5RowWriter(path, ROW, torch.float32, {"layers": list(range(12)), "d_model": 768})
        for block in data:
            writer.write(block)
        writer.finish()  # as to_hdf5 finishes a file: with its statistics pass
        return time.perf_counter() - start

    def plain() -> float:
        start = time.perf_counter()
        with open(path.with_suffix(".bin"), "wb") as f:
            for block in data:
                f.write(block.rows.numpy().data)
                for key in META_DATASETS:
                    f.write(block.meta[key].data)
        return time.perf_counter() - start

    seconds = {ours: 0.0, plain: 0.0}
    for side in (ours, plain, plain, ours):
        warm_memory(nbytes + (1 << 30))
        seconds[side] += side()
    path.with_suffix(".bin").unlink()
    return 2 * rows / seconds[ours], 2 * rows / seconds[plain]


def read_rates(path: Path, rows: int) -> tuple[float, float]:
    """Both timed from start to finish into a new shared-memory block, on warmed RAM (see
    ``warm_memory``): ours from ``start()`` (the generator opens the file) until every row has
    landed in the buffer; the plain side opens the file and ``sendfile``s it into the block's file,
    as the HDF5 reader moves contiguous rows."""
    nbytes = os.path.getsize(path)
    warm_memory(nbytes + (1 << 30))
    loader = actvpipe.from_hdf5(path).buffer(rows).batch(1)
    with loader:
        start = time.perf_counter()
        loader.start()
        while loader.counters()["written"] < rows:
            time.sleep(0.0005)
        hdf5 = rows / (time.perf_counter() - start)
    warm_memory(nbytes + (1 << 30))
    block = SharedMemory(create=True, size=nbytes)
    try:
        start = time.perf_counter()
        with open(path, "rb") as src, open(f"/dev/shm/{block.name.lstrip('/')}", "r+b") as dst:
            sent = 0
            while sent < nbytes:
                sent += os.sendfile(dst.fileno(), src.fileno(), sent, nbytes - sent)
        plain = rows / (time.perf_counter() - start)
    finally:
        block.close()
        block.unlink()
    return hdf5, plain


def results(quick: bool, rounds: int = 5) -> list[Result]:
    n_rows = int((256 << 20 if quick else 1 << 30) // (np.prod(ROW) * 4))
    data = blocks(n_rows, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        write_hdf5, write_plain = write_rates(path, data)
        # Memory speed here drifts between runs: report the median of paired rounds, after one
        # untimed round (the first start in a process also launches the fork server).
        reads = [read_rates(path, n_rows) for _ in range(rounds + 1)][1:]
    read_hdf5, read_plain = (statistics.median(r[k] for r in reads) for k in (0, 1))
    each = ", ".join(f"{ours / plain:.2f}" for ours, plain in reads)
    size = f"{n_rows:,} GPT-2-small rows"
    return [
        Result(
            "P6 HDF5 write: Hdf5RowWriter / plain sequential write",
            f"{write_hdf5:,.0f} rows/s",
            f"{write_plain:,.0f} rows/s",
            write_hdf5 / write_plain,
            ">= 0.7",
            f"{size}; with the statistics pass to_hdf5 makes (the plain side writes the rows only)",
        ),
        Result(
            "P6 HDF5 read: from_hdf5 into the buffer / plain read",
            f"{read_hdf5:,.0f} rows/s",
            f"{read_plain:,.0f} rows/s",
            read_hdf5 / read_plain,
            ">= 0.7",
            f"median of rounds {each}",
        ),
    ]


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.hdf5_io")
