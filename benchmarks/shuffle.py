"""Shuffle quality: how often two rows of one batch come from the same context, ÷ how often uniform
sampling from the rows buffered at that moment would pair them (target 0.9 to 1.1).

A pass of the demo model over the bundled corpus fits in the buffer, so once the generator has
finished, the buffer's composition before each batch is known exactly (the rows left); each batch
then contributes its observed same-context pairs and the pairs uniform sampling without replacement
predicts, ``pairs(batch) * sum_i c_i (c_i - 1) / (N (N - 1))`` for ``c_i`` buffered rows of context
``i`` out of ``N``. A loader that served rows in generation order, or block by block, would score
far above 1.

Run: python -m benchmarks.shuffle [--quick]
"""

from __future__ import annotations

import time

import numpy as np

import actvpipe
from actvpipe.demo import corpus_texts, demo_model_dir
from benchmarks.common import Result, cli


def same_context_pairs(seq: np.ndarray) -> int:
    counts = np.unique(seq, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def shuffle_ratio(texts: list[str], batch: int) -> tuple[float, float, int]:
    """(observed same-context pairs, expected under uniform sampling, batches) over one pass."""
    stream = actvpipe.stream(demo_model_dir(), texts, context_length=128, generation_batch_size=16)
    observed = expected = 0.0
    batches = 0
    with stream.buffer(200_000).batch(batch, with_tokens=True) as loader:
        it = iter(loader)
        first = next(it)  # the warm-up: the first batch waits for half the pass
        run, deadline = loader._passes.run, time.monotonic() + 300
        while not run.top_up()[1]:  # publishes what arrives; True once every row of the pass is in
            if time.monotonic() > deadline:
                raise RuntimeError("the pass did not fit in the buffer; use fewer documents")
            time.sleep(0.05)
        del first
        while True:
            seq = run.ledger.full_meta()["seq"]
            n = len(seq)
            if n < 2:
                break
            try:
                got = next(it)
            except StopIteration:
                break
            k = len(got)
            expected += k * (k - 1) / 2 * 2 * same_context_pairs(seq) / (n * (n - 1))
            observed += same_context_pairs(got.seq.numpy())
            batches += 1
    return observed, expected, batches


def results(quick: bool) -> list[Result]:
    texts = corpus_texts()[: 60 if quick else 200]
    observed, expected, batches = shuffle_ratio(texts, 1024)
    return [
        Result(
            "shuffle quality: same-context pairs in a batch / uniform sampling's",
            f"{observed:,.0f} pairs",
            f"{expected:,.0f} pairs",
            observed / expected,
            "0.9 to 1.1",
            f"{batches} batches of 1024, demo model, whole pass buffered",
        )
    ]


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.shuffle")
