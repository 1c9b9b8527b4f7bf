"""Long-run soak: stream continuously (pass after pass, saving state as a trainer would) and report
memory, open file descriptors and shared memory over time; they must stay flat.

    python -m benchmarks.soak --minutes 60

Every pass starts a new generator process and a new shared block, so a leak of either shows up as
growth here. Exits 1 if a quantity grows beyond its tolerance after the warm-up sample.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys
import time
from dataclasses import dataclass

import psutil

import actvpipe
from actvpipe.demo import corpus_texts, demo_model_dir
from actvpipe.monitor import memory_of

# Growth allowed from the first sample after warm-up to the last: allocator and page-cache noise.
MEMORY_GROWTH = 64 * 2**20
FD_GROWTH = 4


@dataclass(frozen=True)
class Sample:
    seconds: float
    passes: int
    rows: int
    pss: int  # trainer + generator, shared pages counted once
    fds: int  # open file descriptors of the trainer and its generators
    shm_blocks: int  # actvpipe blocks in /dev/shm named by this process
    shm_bytes: int


def shm_use(pid: int) -> tuple[int, int]:
    """(count, bytes) of this process's actvpipe blocks in /dev/shm."""
    prefix = f"actvpipe_{pid}_"
    names = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    sizes = [os.stat(os.path.join("/dev/shm", n)).st_blocks * 512 for n in names]
    return len(sizes), sum(sizes)


def sample(start: float, passes: int, rows: int) -> Sample:
    me = psutil.Process()
    pids = [me.pid, *(c.pid for c in me.children(recursive=True))]
    fds = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):  # a generator may exit between the two calls
            fds += psutil.Process(pid).num_fds()
    blocks, nbytes = shm_use(me.pid)
    return Sample(time.monotonic() - start, passes, rows, memory_of(pids), fds, blocks, nbytes)


def soak(minutes: float, every: float, buffer_size: int, documents: int | None) -> list[Sample]:
    """Stream over the bundled corpus with the tiny demo model, pass after pass, for ``minutes``."""
    texts = corpus_texts()[:documents]
    stream = actvpipe.stream(demo_model_dir(), texts, context_length=64)
    loader = stream.buffer(buffer_size).batch(256)
    start = time.monotonic()
    samples, passes, rows, next_sample = [], 0, 0, 0.0
    with loader:
        while time.monotonic() - start < minutes * 60:
            for k, batch in enumerate(loader):
                if time.monotonic() - start >= minutes * 60:
                    break
                rows += len(batch)
                if k % 50 == 0:
                    pickle.dumps(loader.state_dict())  # checkpointing is part of a long run
                if time.monotonic() - start >= next_sample:
                    samples.append(sample(start, passes, rows))
                    print(format_sample(samples[-1]), flush=True)
                    next_sample += every
            passes += 1
    return samples


def format_sample(s: Sample) -> str:
    return (
        f"{s.seconds:7.1f} s  pass {s.passes:4d}  rows {s.rows:12,}  PSS {s.pss / 2**20:8.1f} MiB  "
        f"fds {s.fds:4d}  shm {s.shm_blocks} block(s) {s.shm_bytes / 2**20:7.1f} MiB"
    )


def growth(samples: list[Sample]) -> list[str]:
    """What grew beyond tolerance from the first sample after warm-up to the last. Warm-up is the
    first pass: its generator is spawned, later ones come from the fork server (a few more pipes)."""
    settled = [s for s in samples if s.passes >= 1]
    if len(settled) < 2:
        return ["too few samples after the first pass: run longer or sample more often"]
    first, last = settled[0], settled[-1]
    problems = []
    if last.pss - first.pss > MEMORY_GROWTH:
        problems.append(f"PSS grew {(last.pss - first.pss) / 2**20:.1f} MiB")
    if last.fds - first.fds > FD_GROWTH:
        problems.append(f"open file descriptors grew from {first.fds} to {last.fds}")
    if max(s.shm_blocks for s in samples) > 1:
        problems.append("more than one shared block existed at once (a pass's block outlived it)")
    if last.shm_bytes - first.shm_bytes > MEMORY_GROWTH:
        problems.append(f"shared memory grew {(last.shm_bytes - first.shm_bytes) / 2**20:.1f} MiB")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to stream (default 10)")
    parser.add_argument(
        "--every", type=float, default=None, help="seconds between samples (default: 10 per run)"
    )
    parser.add_argument("--buffer", type=int, default=20_000, help="buffer rows (default 20,000)")
    parser.add_argument("--documents", type=int, default=None, help="corpus documents a pass (default: all)")
    args = parser.parse_args(argv)
    every = args.every if args.every is not None else max(1.0, args.minutes * 6)  # 10 samples a run
    samples = soak(args.minutes, every, args.buffer, args.documents)
    problems = growth(samples)
    left = shm_use(os.getpid())[0]
    if left:
        problems.append(f"{left} shared block(s) left after close")
    last = samples[-1] if samples else Sample(0, 0, 0, 0, 0, 0, 0)
    print(
        f"after {last.seconds:.0f} s, {last.passes} passes, {last.rows:,} rows: "
        + ("; ".join(problems) or "flat")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
