"""P1: served rows/s divided by bare base-model forward tokens/s, same model and batch shape, one run.

Run: python -m benchmarks.throughput [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import time

import actvpipe
from actvpipe.demo import corpus_texts
from benchmarks.common import bare_forward_tokens_per_s, build_gpt2, machine


def served_rows_per_s(model_dir, context: int, gen_batch: int, seconds: float) -> float:
    """Rows/s served in steady state, timed mid-pass over about ``seconds`` after two warm-up blocks.

    Batches are small (1024 rows) so the fill's wobble, at most one generation block, is a small
    part of the rows timed.
    """
    texts = corpus_texts() * 50
    stream = actvpipe.stream(model_dir, texts, context_length=context, generation_batch_size=gen_batch)
    block = gen_batch * (context - 1)
    with stream.buffer(4 * block).batch(1024) as loader:
        it = iter(loader)
        for _ in range(2 * block // 1024):
            next(it)
        rows, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            rows += len(next(it))
        return rows / (time.perf_counter() - start)


def run(quick: bool) -> list[tuple[str, float, float, float]]:
    """[(model, served rows/s, bare tokens/s, ratio)] for the P1 model shapes."""
    shapes = (
        [("gpt2 4L d256", 4, 256, 4)]
        if quick
        else [("gpt2 4L d256", 4, 256, 4), ("gpt2-small 2L d768", 2, 768, 12)]
    )
    context, gen_batch = 256, 16
    results = []
    for name, n_layer, d_model, heads in shapes:
        model_dir = build_gpt2(n_layer, d_model, heads)
        try:
            bare = bare_forward_tokens_per_s(model_dir, gen_batch, context, seconds=5 if quick else 15)
            served = served_rows_per_s(model_dir, context, gen_batch, seconds=20 if quick else 60)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
        results.append((name, served, bare, served / bare))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one model shape, shorter timings")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"{'model':<20} {'served rows/s':>14} {'bare tokens/s':>14} {'ratio':>7}  (target >= 0.95)")
    for name, served, bare, ratio in run(args.quick):
        print(f"{name:<20} {served:>14,.0f} {bare:>14,.0f} {ratio:>7.3f}")
    print(f"command: python -m benchmarks.throughput{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
