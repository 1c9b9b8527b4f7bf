"""Write-through cache: rows/s the generator computes with ``write_hdf5=`` on ÷ with it off, same
model, shapes and threads, windows alternated ABBA, steady state (start-up fills drained; the idle
side's buffer is full, so its generator waits while the other side is timed).

Run: python -m benchmarks.write_through [--quick]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import actvpipe
from actvpipe.demo import corpus_texts
from benchmarks.common import Result, build_gpt2, cli, computed_rows_per_s, wait_until_idle

CONTEXT, GEN_BATCH = 256, 16


def ratios(model_dir: Path, out_dir: Path, window: float, rounds: int) -> list[dict[str, float]]:
    """Writing-on and writing-off rows/s per round, on first in odd rounds and off first in even ones."""
    stream = actvpipe.stream(
        model_dir, corpus_texts() * 50, context_length=CONTEXT, generation_batch_size=GEN_BATCH
    )
    block = GEN_BATCH * (CONTEXT - 1)
    loaders = {
        "off": stream.buffer(4 * block).batch(1024),
        "on": stream.buffer(4 * block, write_hdf5=out_dir / "acts.h5").batch(1024),
    }
    out = []
    try:
        iters = {}
        for side, loader in loaders.items():
            iters[side] = it = iter(loader.start())
            for _ in range(2 * block // 1024):  # drain the start-up fill
                next(it)
        for r in range(rounds):
            rates = {}
            for side in ("off", "on") if r % 2 == 0 else ("on", "off"):
                wait_until_idle(loaders["on" if side == "off" else "off"])
                rates[side] = computed_rows_per_s(loaders[side], iters[side], window)
            out.append(rates)
    finally:
        for loader in loaders.values():
            loader.close()
    return out


def results(quick: bool) -> list[Result]:
    model_dir = build_gpt2(4, 256, 4)
    out_dir = Path(tempfile.mkdtemp(prefix="actvpipe-bench-write-"))
    try:
        rounds = ratios(model_dir, out_dir, 4.0 if quick else 8.0, 8)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    got = [r["on"] / r["off"] for r in rounds]
    on, off = (statistics.mean(r[side] for r in rounds) for side in ("on", "off"))
    spread = max(got) - min(got)
    note = f"gpt2 4L d256 rows of 8 KiB, median of {len(got)} paired windows, spread {spread:.3f}"
    title = "write-through: rows/s with write_hdf5= / without"
    return [Result(title, f"{on:,.0f} rows/s", f"{off:,.0f} rows/s", statistics.median(got), ">= 0.9", note)]


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.write_through")
