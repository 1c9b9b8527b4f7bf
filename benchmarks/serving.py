"""P2 and P5: the cost of serving batches from a full buffer, through the serving path's own code
(the ledger's ``draw`` -> the buffer's ``gather`` -> ``remove`` -> ``grant``, the refill pushed
back through the slot rings and published) on a real shared buffer, in this process.

- P2: GB/s of batches of 5000 GPT-2-small rows ([2, 12, 768] float32, 73.7 KB) ÷ GB/s of a plain
  ``copy_`` of the same number of bytes between two preallocated tensors, measured in the same run.
- P5: seconds per batch of 1024 small rows with 10 million buffered rows ÷ with 10 thousand.

Run: python -m benchmarks.serving [--quick]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from actvpipe.ledger import Ledger
from actvpipe.shm import SharedRowBuffer
from benchmarks.common import Result, cli

GPT2_SMALL_ROW = (2, 12, 768)
SMALL_ROW = (2, 2, 16)


def full_buffer(size: int, row_shape: tuple[int, ...]) -> tuple[SharedRowBuffer, Ledger]:
    """A buffer whose every slot holds a row and is sampleable, as after the warm-up."""
    buffer = SharedRowBuffer.create(size, row_shape, torch.float32)
    for lo in range(0, size, 4096):
        rows = buffer.rows[lo : lo + 4096]
        rows.copy_(torch.randn(rows.shape))
    ledger = Ledger(buffer, [size], [0], [0])
    buffer.push(buffer.claim(size))
    ledger.publish(0, size)
    return buffer, ledger


def seconds_per_batch(
    buffer: SharedRowBuffer, ledger: Ledger, batch: int, seconds: float, reuse: bool = False
) -> float:
    """The serving path per batch: fresh output tensors, or two preallocated ones in turn (``reuse``)."""
    rng = np.random.default_rng(0)
    outputs = [torch.zeros(batch, *buffer.row_shape) for _ in range(2)] if reuse else [None]  # touched once
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        draw = ledger.draw(batch, rng)
        buffer.gather(draw.slots, outputs[n % len(outputs)])
        ledger.remove(draw)
        ledger.grant()
        buffer.push(buffer.claim(batch))  # the generator would refill them
        ledger.publish(0, batch)
        n += 1
    return (time.perf_counter() - start) / n


def p2(quick: bool) -> tuple[float, float, float]:
    """(served GB/s into fresh tensors, into reused tensors, plain copy GB/s) at batch 5000."""
    batch, size = 5000, 10_000 if quick else 40_000
    buffer, ledger = full_buffer(size, GPT2_SMALL_ROW)
    try:
        window = 3.0 if quick else 10.0
        fresh, reused = (seconds_per_batch(buffer, ledger, batch, window, r) for r in (False, True))
    finally:
        buffer.unlink()
    nbytes = batch * int(np.prod(GPT2_SMALL_ROW)) * 4
    src, dst = torch.randn(batch, *GPT2_SMALL_ROW), torch.empty(batch, *GPT2_SMALL_ROW)
    dst.copy_(src)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < (3.0 if quick else 10.0):
        dst.copy_(src)
        n += 1
    copy = (time.perf_counter() - start) / n
    return nbytes / fresh / 1e9, nbytes / reused / 1e9, nbytes / copy / 1e9


def p5(quick: bool) -> tuple[float, float]:
    """(seconds per batch with 10M rows, with 10k rows), batch 1024 of small rows."""
    out = []
    for size in (10_000, 10_000_000):
        buffer, ledger = full_buffer(size, SMALL_ROW)
        try:
            out.append(seconds_per_batch(buffer, ledger, 1024, 2.0 if quick else 6.0))
        finally:
            buffer.unlink()
    return out[1], out[0]


def results(quick: bool) -> list[Result]:
    fresh, reused, copy = p2(quick)
    large, small = p5(quick)
    return [
        Result(
            "P2 batch assembly, batch 5000 GPT-2-small rows / copy_",
            f"{fresh:.2f} GB/s",
            f"{copy:.2f} GB/s",
            fresh / copy,
            ">= 0.5",
            "default: a fresh tensor per batch",
        ),
        Result(
            "P2 same, .batch(reuse=True) / copy_",
            f"{reused:.2f} GB/s",
            f"{copy:.2f} GB/s",
            reused / copy,
            ">= 0.5",
            "two preallocated tensors in turn",
        ),
        Result(
            "P5 per-batch cost, 10M-row buffer / 10k-row buffer",
            f"{large * 1e3:.3f} ms",
            f"{small * 1e3:.3f} ms",
            large / small,
            "<= 1.2",
            "batch 1024 of [2, 2, 16] rows",
        ),
    ]


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.serving")
