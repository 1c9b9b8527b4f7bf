"""P2 and P5: the cost of serving batches from a full buffer, through the serving path's own code
(the ledger's ``draw`` -> the buffer's ``gather`` -> ``remove`` -> ``grant``, the refill pushed
back through the slot rings and published) on a real shared buffer, in this process.

- P2: GB/s of batches of 5000 GPT-2-small rows ([2, 12, 768] float32, 73.7 KB), gathered as the
  loader does by default (into its ``OutputPool``) ÷ GB/s of a plain one-thread ``copy_`` of the
  same number of bytes between two preallocated tensors (the gather runs on one thread), in the
  same run, sides alternated; and the same into a fresh tensor per batch, for reference.
- P5: seconds per batch of 1024 small rows with 10 million buffered rows ÷ a plain one-thread
  ``index_select`` of 1024 random rows from the same 10M rows (the physical limit of a gather).

Run: python -m benchmarks.serving [--quick]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from actvpipe.ledger import Ledger
from actvpipe.outputs import OutputPool
from actvpipe.shm import GeneratorView, SharedBlock, TrainerView
from benchmarks.common import Result, cli, warm_memory

GPT2_SMALL_ROW = (2, 12, 768)
SMALL_ROW = (2, 2, 16)


def full_buffer(size: int, row_shape: tuple[int, ...]) -> tuple[SharedBlock, Ledger]:
    """A buffer whose every slot holds a row and is sampleable, as after the warm-up."""
    block = SharedBlock.create(size, row_shape, torch.float32)
    for lo in range(0, size, 4096):
        rows = block.rows[lo : lo + 4096]
        rows.copy_(torch.randn(rows.shape))
    ledger = Ledger(TrainerView(block), [size], [0], [0])
    generator = GeneratorView(block, 0)
    generator.push(generator.claim(size))
    ledger.publish(0, size)
    return block, ledger


def seconds_per_batch(
    block: SharedBlock, ledger: Ledger, batch: int, seconds: float, pool: OutputPool | None
) -> float:
    """The training side's serving path per batch (draw, gather, remove, grant, publish), holding
    each batch until the next is drawn as a training loop does: gathered into ``pool`` (the loader's
    default; one pool for the whole run, as a loader keeps its own, so windows after the warm-up
    time the steady state), or into a fresh tensor each time (``None``). The refill the generator
    would do (claim and push the granted slots) runs between batches, untimed."""
    rng = np.random.default_rng(0)
    buffer, generator = ledger.buffer, GeneratorView(block, 0)
    n, timed, served = 0, 0.0, None
    while timed < seconds:
        start = time.perf_counter()
        draw = ledger.draw(batch, rng)
        served = buffer.gather(draw.slots, None if pool is None else pool.take(batch))
        ledger.remove(draw)
        ledger.grant()
        timed += time.perf_counter() - start
        generator.push(generator.claim(batch))  # the generator's part
        start = time.perf_counter()
        ledger.publish(0, batch)
        timed += time.perf_counter() - start
        n += 1
    del served
    return timed / n


def one_thread_seconds(step: Callable[[], object], seconds: float) -> float:
    """Seconds per call of ``step`` repeated for ``seconds`` on one torch thread, as the serving
    path gathers on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            n += 1
        return (time.perf_counter() - start) / n
    finally:
        torch.set_num_threads(threads)


def p2(quick: bool) -> tuple[float, float, float]:
    """(served GB/s by default, into a fresh tensor per batch, plain copy GB/s) at batch 5000; the
    three timed in the order default, fresh, copy, copy, fresh, default, after a warm-up of each."""
    batch, size = 5000, 10_000 if quick else 40_000
    row_bytes = int(np.prod(GPT2_SMALL_ROW)) * 4
    warm_memory((size + 6 * batch) * row_bytes)  # the buffer, the pool's and copy_'s tensors: see P6
    buffer, ledger = full_buffer(size, GPT2_SMALL_ROW)
    src, dst = torch.randn(batch, *GPT2_SMALL_ROW), torch.empty(batch, *GPT2_SMALL_ROW)

    pool = OutputPool((batch, *buffer.row_shape), buffer.dtype)
    sides = {
        "default": lambda t: seconds_per_batch(buffer, ledger, batch, t, pool),
        "fresh": lambda t: seconds_per_batch(buffer, ledger, batch, t, None),
        "copy": lambda t: one_thread_seconds(lambda: dst.copy_(src), t),
    }
    window = 1.5 if quick else 5.0
    try:
        for run in sides.values():
            run(0.5)
        per_batch = {side: [] for side in sides}
        for side in ("default", "fresh", "copy", "copy", "fresh", "default"):
            per_batch[side].append(sides[side](window))
    finally:
        buffer.unlink()
    nbytes = batch * int(np.prod(GPT2_SMALL_ROW)) * 4
    default, fresh, plain = (nbytes / (sum(t) / len(t)) / 1e9 for t in per_batch.values())
    return default, fresh, plain


def p5(quick: bool) -> tuple[float, float]:
    """(seconds per batch of the serving path with 10M buffered rows, seconds of a plain one-thread
    ``index_select`` of as many random rows from a tensor of the same size), batch 1024 of small
    rows; timed ours, plain, plain, ours."""
    size, batch, window = 10_000_000, 1024, 2.0 if quick else 6.0
    buffer, ledger = full_buffer(size, SMALL_ROW)
    rows = buffer.rows  # the same memory, already faulted in
    rng = np.random.default_rng(1)

    def plain(seconds: float) -> float:
        return one_thread_seconds(
            lambda: torch.index_select(rows, 0, torch.from_numpy(rng.integers(0, size, batch))), seconds
        )

    pool = OutputPool((batch, *buffer.row_shape), buffer.dtype)

    def ours(seconds: float) -> float:
        return seconds_per_batch(buffer, ledger, batch, seconds, pool)

    try:
        ours(0.5), plain(0.5)
        times = {"ours": 0.0, "plain": 0.0}
        for side in ("ours", "plain", "plain", "ours"):
            times[side] += (ours if side == "ours" else plain)(window)
    finally:
        buffer.unlink()
    return times["ours"] / 2, times["plain"] / 2


def results(quick: bool) -> list[Result]:
    default, fresh, copy = p2(quick)
    large, plain = p5(quick)
    return [
        Result(
            "P2 batch assembly, batch 5000 GPT-2-small rows / copy_",
            f"{default:.2f} GB/s",
            f"{copy:.2f} GB/s",
            default / copy,
            ">= 0.8",
            "default .batch(n): pooled tensors, reused once dropped",
        ),
        Result(
            "P2 same, a fresh tensor per batch / copy_",
            f"{fresh:.2f} GB/s",
            f"{copy:.2f} GB/s",
            fresh / copy,
            "-",
            "what the default did before the pool",
        ),
        Result(
            "P5 per-batch cost, 10M-row buffer / plain index_select of as many random rows",
            f"{large * 1e3:.3f} ms",
            f"{plain * 1e3:.3f} ms",
            large / plain,
            "<= 1.2",
            "batch 1024 of [2, 2, 16] rows, one thread on both sides",
        ),
    ]


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.serving")
