"""P2 and P5: serving batches through the real loader, its generator running (refilling the buffer
from an HDF5 cache in its own process), against the physical limit of the same work, in one run.

- P2: GB/s of batches of 5000 GPT-2-small rows ([2, 12, 768] float32, 73.7 KB) ÷ GB/s of ``copy_``
  of the same bytes between two preallocated tensors; at one torch thread and at every core (the
  same ``torch.set_num_threads`` on both sides).
- P5: seconds per batch of 1024 rows of [2, 2, 16] with 10 million buffered rows ÷ an
  ``index_select`` of 1024 random rows of the same shared buffer into a preallocated tensor
  (indices drawn outside the timed call), same threads.

Steady state: one pass, whose first buffer's worth of rows is served untimed (each slot's first
read in a pass maps its pages into the trainer). Each loader window then starts from a full buffer
(the generator has refilled it) and times only the ``next()`` calls, the generator refilling while
they run. Sides alternate (ABBA), 8 windows a side (4 with ``--quick``), the median reported.
Run: python -m benchmarks.serving [--quick]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

import actvpipe
from actvpipe.hdf5 import META_DATASETS
from actvpipe.hdf5_writer import Hdf5RowWriter
from actvpipe.records import RowBlock
from benchmarks.common import Result, cli, warm_memory

GPT2_SMALL_ROW = (2, 12, 768)
SMALL_ROW = (2, 2, 16)


def cache_file(path: Path, rows: int, row_shape: tuple[int, ...]) -> Path:
    """An actvpipe cache of ``rows`` random rows (one random block written over and over)."""
    block_rows = min(rows, max(1, (64 << 20) // (int(np.prod(row_shape)) * 4)))
    data = torch.randn((block_rows, *row_shape), generator=torch.Generator().manual_seed(0))
    attrs = {"layers": list(range(row_shape[1])), "d_model": row_shape[-1]}
    writer = Hdf5RowWriter(path, row_shape, torch.float32, attrs)
    for start in range(0, rows, block_rows):
        n = min(block_rows, rows - start)
        meta = {k: np.arange(start, start + n, dtype=np.int64) for k in (*META_DATASETS, "row_id")}
        writer.write(RowBlock(data[:n], meta))
    return writer.finish(with_stats=False)


def wait_until_full(loader, size: int, batch: int, timeout: float = 300.0) -> None:
    """Until the generator has written a row into every slot but the last batch's (which the
    loader hands back to it in the next call)."""
    deadline = time.monotonic() + timeout
    while (counters := loader.counters())["written"] - counters["served"] < size - batch:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the buffer did not fill in {timeout:g} s: {counters}")
        time.sleep(0.002)


def loader_window(loader, batches: Iterator, size: int, batch: int, n: int, refilled: bool = False) -> float:
    """Seconds per batch of ``n`` ``next()`` calls from a full buffer; only the calls are timed.
    ``refilled``: before each call (untimed, as during a training step long enough for it) the
    generator refills the buffer; otherwise it refills while the calls run."""
    wait_until_full(loader, size, batch)
    timed = 0.0
    for i in range(n):
        if refilled and i:
            wait_until_full(loader, size, batch)
        start = time.perf_counter()
        served = next(batches)
        timed += time.perf_counter() - start
        del served  # the training step is done: the pool may reuse its tensor
    return timed / n


def repeated(step: Callable[[], object], n: int) -> float:
    """Seconds per call of ``step`` over ``n`` calls."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def abba(sides: dict[str, Callable[[], float]], windows: int) -> dict[str, float]:
    """The median of ``windows`` windows a side, the sides alternated A B B A ..., after one
    untimed window of each."""
    a, b = sides
    sides[a](), sides[b]()
    order = [a, b, b, a] * (windows // 2)
    times: dict[str, list[float]] = {a: [], b: []}
    for side in order:
        times[side].append(sides[side]())
    return {side: statistics.median(t) for side, t in times.items()}


def with_threads(threads: int, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def served_stream(directory: Path, name: str, rows: int, file_rows: int, row_shape: tuple[int, ...]):
    """A stream of ``rows`` rows: one cache file of ``file_rows`` rows read as often as needed (one
    copy in the page cache, however long the run)."""
    path = cache_file(directory / name, file_rows, row_shape)
    warm_memory(2 * os.path.getsize(path))
    return actvpipe.from_hdf5([path] * -(-rows // file_rows))


def warmed(loader, batches: Iterator, size: int) -> Iterator:
    """Serve ``size`` rows untimed: every slot has then been read once by this process (a slot's
    first read maps its pages into the trainer, once per pass)."""
    served = 0
    while served < size:
        served += len(next(batches))
    return batches


def p2(quick: bool, directory: Path) -> dict[tuple[int, bool], dict[str, float]]:
    """Per thread count: seconds per batch through the loader (the buffer refilled before each
    batch, and refilling during the batches) and of the plain copy."""
    batch, size = 5000, 20_000  # a window of two batches keeps the fill above the warm-up's half
    windows, per_window = (4 if quick else 8), 2
    thread_counts = sorted({1, os.cpu_count() or 1})
    rows = 2 * size + 2 * len(thread_counts) * (2 * windows + 2) * per_window * batch
    stream = served_stream(directory, "p2.h5", rows, size, GPT2_SMALL_ROW)
    src, dst = torch.randn(batch, *GPT2_SMALL_ROW), torch.empty(batch, *GPT2_SMALL_ROW)
    out = {}
    with stream.buffer(size).batch(batch) as loader:
        batches = warmed(loader, iter(loader), size)
        for threads in thread_counts:

            def copy() -> float:  # with the generator idle too: the last window's refill done
                wait_until_full(loader, size, batch)
                return repeated(lambda: dst.copy_(src), 10)

            for refilled in (True, False):
                sides = {
                    "ours": lambda r=refilled: loader_window(loader, batches, size, batch, per_window, r),
                    "copy": copy,
                }
                out[threads, refilled] = with_threads(threads, lambda sides=sides: abba(sides, windows))
    return out


def p5(quick: bool, directory: Path) -> dict[str, float]:
    """Seconds per batch through the loader with ``size`` buffered rows and of the plain gather."""
    size, batch = 2_000_000 if quick else 10_000_000, 1024
    windows, per_window = (4 if quick else 8), 300
    rows = 2 * size + (2 * windows + 2) * per_window * batch
    stream = served_stream(directory, "p5.h5", rows, size // 4, SMALL_ROW)
    out = torch.empty(batch, int(np.prod(SMALL_ROW)))
    rng = np.random.default_rng(1)
    with stream.buffer(size).batch(batch) as loader:
        batches = warmed(loader, iter(loader), size)
        flat = loader._passes.run.buffer.block.rows.view(size, -1)  # the same memory as the loader's

        def plain() -> float:  # with the generator idle too: the last window's refill done
            wait_until_full(loader, size, batch)
            indices = iter([torch.from_numpy(rng.integers(0, size, batch)) for _ in range(per_window)])
            return repeated(lambda: torch.index_select(flat, 0, next(indices), out=out), per_window)

        sides = {"ours": lambda: loader_window(loader, batches, size, batch, per_window), "plain": plain}
        return abba(sides, windows)


def results(quick: bool) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="actvpipe-serving-") as tmp:
        gathers = p2(quick, Path(tmp))
        per_batch = p5(quick, Path(tmp))
    nbytes = 5000 * int(np.prod(GPT2_SMALL_ROW)) * 4
    rows = [
        Result(
            f"P2 serving, batch 5000 GPT-2-small rows, {threads} thread{'s' * (threads > 1)} / copy_",
            f"{nbytes / t['ours'] / 1e9:.2f} GB/s",
            f"{nbytes / t['copy'] / 1e9:.2f} GB/s",
            t["copy"] / t["ours"],
            ">= 0.8" if refilled else "-",
            "refilled between batches" if refilled else "the generator refilling during the gathers",
        )
        for (threads, refilled), t in gathers.items()
    ]
    rows.append(
        Result(
            "P5 per-batch cost, 10M-row buffer / index_select of as many random rows",
            f"{per_batch['ours'] * 1e3:.3f} ms",
            f"{per_batch['plain'] * 1e3:.3f} ms",
            per_batch["ours"] / per_batch["plain"],
            "<= 1.2",
            f"batch 1024 of [2, 2, 16] rows, {torch.get_num_threads()} threads (ours gathers on one: "
            "a small batch)",
        )
    )
    return rows


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.serving")
