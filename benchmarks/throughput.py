"""P1: served rows/s divided by bare base-model forward tokens/s, same model and batch shape, one run,
in the default and in deterministic mode (the difference is deterministic mode's cost); and model
diffing: rows/s of a two-model stream divided by tokens/s of the two bare forwards run back to back.

Run: python -m benchmarks.throughput [--quick]
"""

from __future__ import annotations

import shutil
import statistics

import actvpipe
from actvpipe.demo import corpus_texts
from benchmarks.common import (
    Result,
    bare_forward_tokens_per_s,
    build_gpt2,
    cli,
    computed_rows_per_s,
    wait_until_idle,
)


def paired_ratios(
    model_dir, context: int, gen_batch: int, window: float, rounds: int, **stream_args
) -> list[float]:
    """Alternate windows of bare forward and of streaming, in the order ABBA (bare first in even
    rounds, streaming first in odd ones); return streaming/bare for each round.

    This machine's speed drifts by over 10% within a minute, so each ratio compares windows seconds
    apart, with the same thread count on both sides (every core). The streaming rate counts only
    rows computed inside the window, at steady state: the rows the generator wrote between the first
    and the last block it finished during the window, over the time between those two moments,
    while the training loop consumes continuously. Before each bare window the generator has filled
    the buffer and idles, so the two never compete.
    """
    texts = corpus_texts() * 50
    stream = actvpipe.stream(
        model_dir, texts, context_length=context, generation_batch_size=gen_batch, **stream_args
    )
    block = gen_batch * (context - 1)
    ratios = []
    with stream.buffer(4 * block).batch(1024) as loader:
        it = iter(loader)
        for _ in range(2 * block // 1024):  # drain the start-up fill
            next(it)

        def bare() -> float:
            wait_until_idle(loader)
            return bare_forward_tokens_per_s(model_dir, gen_batch, context, window)

        def streaming() -> float:
            return computed_rows_per_s(loader, it, window)

        for r in range(rounds):
            order = (bare, streaming) if r % 2 == 0 else (streaming, bare)
            rates = {side: side() for side in order}
            ratios.append(rates[streaming] / rates[bare])
    return ratios


def run(quick: bool) -> list[tuple[str, str, float, float]]:
    """[(title, target, median ratio, spread)] for the P1 model shapes, deterministic mode, and two
    models diffed (the second a differently seeded copy of the first shape)."""
    shapes = [("gpt2 4L d256", 4, 256, 4), ("gpt2-small 2L d768", 2, 768, 12)][: 1 if quick else 2]
    context, gen_batch, window, rounds = 256, 16, 3.0 if quick else 8.0, 8
    results = []
    for name, n_layer, d_model, heads in shapes:
        model_dir = build_gpt2(n_layer, d_model, heads)
        other = build_gpt2(n_layer, d_model, heads, seed=1)
        try:
            modes = [(f"P1 served rows/s / bare forward tokens/s, {name}", ">= 0.95", model_dir, {})]
            if n_layer == 4:
                deterministic = f"P1 served rows/s / bare forward tokens/s, {name}, deterministic"
                diffing = f"model diffing: 2-model rows/s / 2 bare forwards back to back, {name}"
                modes.append((deterministic, ">= 0.95", model_dir, {"deterministic": True}))
                modes.append((diffing, ">= 0.9", [model_dir, other], {}))
            for title, target, models, args in modes:
                ratios = paired_ratios(models, context, gen_batch, window, rounds, **args)
                results.append((title, target, statistics.median(ratios), max(ratios) - min(ratios)))
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(other, ignore_errors=True)
    return results


def results(quick: bool) -> list[Result]:
    out = []
    for title, target, ratio, spread in run(quick):
        note = f"median of paired windows, spread {spread:.3f}"
        out.append(Result(title, "", "", ratio, target, note))
    return out


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.throughput")
