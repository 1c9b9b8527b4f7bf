"""Restore from a real steady state (issue 26, item 3): restore -> first batch ÷ a fresh loader that
fills its whole buffer before its first batch, for a state saved after 12 buffer turnovers of a real
run (not a made-up state): without a cache, with the write-through cache the run wrote, and with the
age bound at its documented value (``max_age=1.5``).

GPT-2 architecture, 4 layers, d 256, ctx 128, buffer 40,960 rows, batches of 4,096, generation
batch 32 (4,064 rows a block), a jsonl of 200k documents (50k with --quick). Both sides use
``warmup=1`` (the first batch waits for a full buffer). Restores and fresh starts alternate
(fresh first in even rounds, last in odd ones), 8 rounds (4 with --quick); the median of the
rounds' ratios. Each row notes the blocks the model ran by the first batch against a fresh fill's.
The cache is read from the page cache (the file was just written) and from the disk (its pages
dropped first, as on a machine that restarts a job); every round restores onto the same file,
which each restore extends by the blocks it computes past the saved frontier.

Run: python -m benchmarks.restore [--quick]
"""

from __future__ import annotations

import json
import os
import pickle
import random
import statistics
import tempfile
import time
from pathlib import Path

import actvpipe
from actvpipe.demo import corpus_texts
from actvpipe.loader_state import LoaderState
from benchmarks.common import Result, build_gpt2, cli

CONTEXT, GEN_BATCH, SIZE, BATCH, TURNOVERS = 128, 32, 40_960, 4_096, 12
MAX_AGE = 1.5  # the value README documents
BLOCK_ROWS = GEN_BATCH * (CONTEXT - 1)


def write_corpus(path: Path, n_docs: int) -> None:
    words = " ".join(corpus_texts()).split()
    rng = random.Random(0)
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": " ".join(rng.choices(words, k=40))}) + "\n" for _ in range(n_docs))


def saved_state(stream, **buffer_args) -> dict:
    """A state saved after ``TURNOVERS`` buffers' worth of rows were served."""
    with stream.buffer(SIZE, warmup=1.0, **buffer_args).batch(BATCH) as loader:
        batches = iter(loader)
        for _ in range(TURNOVERS * SIZE // BATCH):
            next(batches)
        return pickle.loads(pickle.dumps(loader.state_dict()))


def first_batch(stream, state: dict | None, **buffer_args) -> tuple[float, int]:
    """Seconds from a new loader (restored from ``state``) to its first batch, and the rows its
    generator had computed by then."""
    loader = stream.buffer(SIZE, warmup=1.0, **buffer_args).batch(BATCH)
    began = time.perf_counter()
    if state is not None:
        loader.load_state_dict(state)
    with loader:
        next(iter(loader))
        seconds = time.perf_counter() - began
        return seconds, loader.counters()["computed"]


def planned_blocks(state: dict) -> int:
    """Blocks a restore without a cache re-runs: every block holding a buffered row, plus the one
    streaming continues from."""
    return len(LoaderState.from_dict(state).buffer.blocks[0])


def drop_from_page_cache(path: Path) -> None:
    """Evict the file's pages (written and synced, so clean) so the next read goes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def results(quick: bool) -> list[Result]:
    rounds = 4 if quick else 8
    model = build_gpt2(4, 256, 4, n_positions=CONTEXT)
    with tempfile.TemporaryDirectory(prefix="actvpipe-restore-") as tmp:
        data = Path(tmp) / "corpus.jsonl"
        write_corpus(data, 50_000 if quick else 200_000)
        stream = actvpipe.stream(model, str(data), context_length=CONTEXT, generation_batch_size=GEN_BATCH)
        cache = Path(tmp) / "cache.h5"
        plain = saved_state(stream, write_hdf5=cache)  # restored with and without its cache
        aged = saved_state(stream, max_age=MAX_AGE)

        def cold() -> tuple[float, int]:
            drop_from_page_cache(cache)
            return first_batch(stream, plain, write_hdf5=cache)

        sides = {
            "fresh": lambda: first_batch(stream, None),
            "no cache": lambda: first_batch(stream, plain),
            "write-through cache (in the page cache)": lambda: first_batch(stream, plain, write_hdf5=cache),
            "write-through cache (read from disk)": cold,
            f"max_age={MAX_AGE}": lambda: first_batch(stream, aged, max_age=MAX_AGE),
        }
        times = {name: [] for name in sides}
        computed = {name: [] for name in sides}
        for r in range(rounds):
            for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                seconds, rows = sides[name]()
                times[name].append(seconds)
                computed[name].append(rows)
    fill_blocks = -(-SIZE // BLOCK_ROWS)
    planned = {"no cache": planned_blocks(plain), f"max_age={MAX_AGE}": planned_blocks(aged)}
    targets = {"no cache": "-", f"max_age={MAX_AGE}": "<= 2"}
    out = []
    for name in list(sides)[1:]:
        ratios = [a / b for a, b in zip(times[name], times["fresh"], strict=True)]
        plan = f"plans {planned[name]} blocks, " if name in planned else ""
        note = (
            f"{plan}{statistics.median(computed[name]) / BLOCK_ROWS:.1f} blocks computed by the first batch "
            f"(a fresh fill: {statistics.median(computed['fresh']) / BLOCK_ROWS:.1f}; the buffer is "
            f"{fill_blocks} blocks); state saved after {TURNOVERS} turnovers; {rounds} rounds"
        )
        out.append(
            Result(
                f"restore -> first batch / fresh fill, {name}",
                f"{statistics.median(times[name]):.2f} s",
                f"{statistics.median(times['fresh']):.2f} s",
                statistics.median(ratios),
                targets.get(name, "<= 1.5"),
                note,
            )
        )
    return out


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.restore")
