"""P6: HDF5 cache IO against plain sequential file IO of the same bytes, measured in one run.

- write: rows/s through ``Hdf5RowWriter`` / rows/s of writing the same arrays to a plain file
- read: rows/s that ``from_hdf5`` moves into the shared buffer / rows/s of a plain sequential read

GPT-2-small rows ([2, 12, 768] float32, 73.7 KB). Both sides read from the page cache.
Run: python -m benchmarks.hdf5_io [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import torch

import actvpipe
from actvpipe.capture import RowBlock
from actvpipe.hdf5 import META_DATASETS, Hdf5RowWriter
from benchmarks.common import machine

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
    rows = sum(len(b) for b in data)
    nbytes = rows * int(np.prod(ROW)) * 4
    warm_memory(nbytes + (1 << 30))
    start = time.perf_counter()
    writer = Hdf5RowWriter(path, ROW, torch.float32, {"layers": list(range(12)), "d_model": 768})
    for block in data:
        writer.write(block)
    writer.finish()
    hdf5 = rows / (time.perf_counter() - start)
    plain_path = path.with_suffix(".bin")
    warm_memory(nbytes + (1 << 30))
    start = time.perf_counter()
    with open(plain_path, "wb") as f:
        for block in data:
            f.write(block.rows.numpy().data)
            for key in META_DATASETS:
                f.write(block.meta[key].data)
    plain = rows / (time.perf_counter() - start)
    plain_path.unlink()
    return hdf5, plain


def warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` of memory so both sides get RAM the machine has handed out before.

    On a VM that backs guest memory lazily, the first touch of never-used RAM costs several times a
    copy; without this, whichever side runs on fresh RAM loses, whatever its code does."""
    np.ones(nbytes, dtype=np.uint8)


def read_rates(path: Path, rows: int) -> tuple[float, float]:
    """Both read into a new shared-memory block, on warmed RAM (see ``warm_memory``)."""
    nbytes = os.path.getsize(path)
    warm_memory(nbytes + (1 << 30))
    loader = actvpipe.from_hdf5(path).buffer(rows).batch(1)
    with loader:
        while loader.counters()["written"] == 0:
            time.sleep(0.0005)
        start, first = time.perf_counter(), loader.counters()["written"]
        while loader.counters()["written"] < rows:
            time.sleep(0.0005)
        hdf5 = (rows - first) / (time.perf_counter() - start)
    warm_memory(nbytes + (1 << 30))
    block = SharedMemory(create=True, size=nbytes)
    try:
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            for at in range(0, nbytes, 64 << 20):
                f.readinto(block.buf[at : at + (64 << 20)])
        plain = rows / (time.perf_counter() - start)
    finally:
        block.close()
        block.unlink()
    return hdf5, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--rounds", type=int, default=5, help="paired read rounds (default 5)")
    args = parser.parse_args()
    n_rows = (256 << 20) // (np.prod(ROW) * 4) if args.quick else (1 << 30) // (np.prod(ROW) * 4)
    data = blocks(int(n_rows), 1024)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        write_hdf5, write_plain = write_rates(path, data)
        # Memory speed here drifts between runs: report the median of paired rounds.
        reads = [read_rates(path, int(n_rows)) for _ in range(args.rounds)]
    read_hdf5, read_plain = (statistics.median(r[k] for r in reads) for k in (0, 1))
    ratios = [ours / plain for ours, plain in reads]
    print(f"machine: {machine()}; {int(n_rows):,} rows of {list(ROW)} float32")
    print(f"{'measure':<40} {'actvpipe rows/s':>16} {'plain rows/s':>13} {'ratio':>6}  (target >= 0.7)")
    for name, ours, plain in (
        ("P6 write: Hdf5RowWriter / plain write", write_hdf5, write_plain),
        ("P6 read: from_hdf5 into buffer / plain", read_hdf5, read_plain),
    ):
        print(f"{name:<40} {ours:>16,.0f} {plain:>13,.0f} {ours / plain:>6.3f}")
    print(f"read ratio in each round: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"command: python -m benchmarks.hdf5_io{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
