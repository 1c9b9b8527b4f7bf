"""P3 and P4: what a loader costs to start and to hold.

- P3: wall time of ``loader.start()`` (shared block created, generator process launched) for a
  1 GB and a 16 GB buffer; pages are touched only when written, so it should be flat. The first
  start in a process is left out: it also launches the resource tracker and the fork server.
- P4: peak resident memory of the training and generator processes (PSS: shared pages counted
  once) ÷ (buffer bytes + model bytes), sampled every 20 ms by a thread from ``start()`` to
  ``close()`` while the buffer fills and batches are served.

Run: python -m benchmarks.footprint [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time

import psutil
import torch

import actvpipe
from actvpipe.demo import corpus_texts
from actvpipe.monitor import memory_of
from actvpipe.shm import buffer_nbytes
from benchmarks.common import Result, build_gpt2, cli


def rows_for(stream: actvpipe.ActivationStream, nbytes: int) -> int:
    """Rows of a buffer of ``nbytes`` (bookkeeping included) for this stream's rows."""
    shape, dtype = stream.row_shape, stream.spec.dtype
    per_row = buffer_nbytes(2, shape, dtype) - buffer_nbytes(1, shape, dtype)
    return (nbytes - buffer_nbytes(0, shape, dtype)) // per_row


def start_ms(stream: actvpipe.ActivationStream, nbytes: int, repeats: int) -> float:
    loader = stream.buffer(rows_for(stream, nbytes)).batch(1024)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        loader.start()
        times.append(time.perf_counter() - begin)
        loader.close()
    return statistics.median(times) * 1e3


def model_bytes(model_dir) -> int:
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() * 4 for p in model.parameters())


def peak_memory(model_dir, buffer_bytes: int) -> tuple[int, int, dict[str, int]]:
    """(peak PSS of the training and generator processes, buffer bytes + model bytes, the peak of
    each process by role), sampled by a thread from before ``start()`` until ``close()`` returns
    (start-up transients included) while the buffer fills and batches are served."""
    stream = actvpipe.stream(model_dir, corpus_texts() * 20, context_length=256, generation_batch_size=16)
    size = rows_for(stream, buffer_bytes)
    expected = buffer_nbytes(size, stream.row_shape, stream.spec.dtype) + model_bytes(model_dir)
    peak, done = [0], threading.Event()
    roles: dict[str, int] = {}

    def sample() -> None:
        while not done.is_set():
            pids = [os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))]
            peak[0] = max(peak[0], memory_of(pids))
            for pid in pids:
                role = role_of(pid)
                roles[role] = max(roles.get(role, 0), memory_of([pid]))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with stream.buffer(size, warmup=1.0).batch(1024) as loader:
            it = iter(loader)
            next(it)  # with warmup=1.0 the first batch waits for a full buffer
            for _ in range(100):
                next(it)
    finally:
        done.set()
        sampler.join()
    return peak[0], expected, roles


def role_of(pid: int) -> str:
    """What a process of the run is: this training process, the fork server (our child), a generator
    (forked by it, or spawned), or the resource tracker (by its command line)."""
    if pid == os.getpid():
        return "trainer"
    try:
        process = psutil.Process(pid)
        line = " ".join(process.cmdline())
    except psutil.Error:
        return "other"
    if "forkserver" in line:
        return "fork server" if process.ppid() == os.getpid() else "generator"
    if "resource_tracker" in line:
        return "resource tracker"
    return "generator"


def results(quick: bool) -> list[Result]:
    stream = actvpipe.demo_stream()
    start_ms(stream, 1 << 30, 1)  # launches the resource tracker and the fork server
    time.sleep(8)  # the fork server's imports: later starts fork from it
    small, large = (start_ms(stream, n << 30, 3) for n in (1, 16))
    model_dir = build_gpt2(4, 256, 4, n_positions=256)
    try:
        peak, expected, roles = peak_memory(model_dir, (1 if quick else 12) << 30)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    gib = 1 << 30
    return [
        Result("P3 start() latency, 1 GB buffer", f"{small:.1f} ms", "", None, "< 50 ms"),
        Result(
            "P3 start() latency, 16 GB buffer",
            f"{large:.1f} ms",
            f"{small:.1f} ms (1 GB)",
            large / small,
            "< 50 ms, flat",
            "ratio: 16 GB / 1 GB",
        ),
        Result(
            "P4 peak RSS (PSS) of all processes / (buffer + model)",
            f"{peak / gib:.2f} GiB",
            f"{expected / gib:.2f} GiB",
            peak / expected,
            "<= 1.1",
            "peak PSS by process: " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in sorted(roles.items())),
        ),
    ]


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.footprint")
