"""Shuffle quality with a buffer of 1/20 of the pass: how often two rows of one batch come from the
same context, ÷ how often uniform sampling from the rows buffered at that moment would pair them
(target 0.9 to 1.1), and over how many batches a context's rows spread.

Before each batch the benchmark waits until the generator has written a row into every slot it
was given (all but the last batch's, which go back to it after the next gather): it then cannot
write more until the batch is drawn, so the buffer's composition at the draw is known exactly.
Each batch contributes its observed same-context pairs and the pairs uniform sampling without
replacement predicts, ``pairs(batch) * sum_i c_i (c_i - 1) / (N (N - 1))`` for ``c_i`` buffered
rows of context ``i`` out of ``N``. A loader that served rows in generation order, or block by
block, would score far above 1, and spread a context over one or two batches.

Run: python -m benchmarks.shuffle [--quick]
"""

from __future__ import annotations

import time

import numpy as np

import actvpipe
from actvpipe.demo import corpus_texts, demo_model_dir
from benchmarks.common import Result, cli
from benchmarks.restore import MAX_AGE


def same_context_pairs(seq: np.ndarray) -> int:
    counts = np.unique(seq, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def shuffle_quality(texts: list[str], batch: int, max_age: float | None = None) -> dict[str, float]:
    """Observed and expected same-context pairs, batches, and the median number of batches a
    context's rows spread over, for one pass with a buffer of a twentieth of it (and ``max_age``)."""
    stream = actvpipe.stream(demo_model_dir(), texts, context_length=128, generation_batch_size=16)
    with stream.buffer(100).batch(100, with_tokens=True) as counting:
        rows = sum(len(b) for b in counting)
    size = rows // 20
    observed = expected = 0.0
    seqs = []
    with stream.buffer(size, max_age=max_age).batch(batch, with_tokens=True) as loader:
        it = iter(loader)
        seqs.append(next(it).seq.numpy())
        run = loader._passes.run
        while True:
            deadline = time.monotonic() + 120
            while not run.top_up()[1] and run.ledger.fill() < size - batch:  # every slot holds a row
                if time.monotonic() > deadline:
                    raise RuntimeError("the buffer did not fill")
                time.sleep(0.002)
            seq = run.ledger.full_meta()["seq"]
            n = len(seq)
            try:
                got = next(it).seq.numpy()
            except StopIteration:
                break
            k = len(got)
            if n >= 2:
                expected += k * (k - 1) / 2 * 2 * same_context_pairs(seq) / (n * (n - 1))
                observed += same_context_pairs(got)
            seqs.append(got)
    batch_of = np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)])
    contexts = np.concatenate(seqs)
    spread = [len(np.unique(batch_of[contexts == c])) for c in np.unique(contexts)]
    return {
        "observed": observed,
        "expected": expected,
        "batches": len(seqs),
        "size": size,
        "rows": rows,
        "spread": float(np.median(spread)),
        "context_rows": float(np.median(np.unique(contexts, return_counts=True)[1])),
    }


def results(quick: bool) -> list[Result]:
    texts = corpus_texts()[: 100 if quick else 300]
    out = []
    for max_age in (None, MAX_AGE):
        q = shuffle_quality(texts, 256, max_age)
        bound = "" if max_age is None else f", max_age={max_age}"
        out.append(
            Result(
                f"shuffle quality{bound}: same-context pairs in a batch / uniform sampling's",
                f"{q['observed']:,.0f} pairs",
                f"{q['expected']:,.0f} pairs",
                q["observed"] / q["expected"],
                "0.9 to 1.1" if max_age is None else "- (the trade)",
                f"{q['batches']} batches of 256, buffer {q['size']:,} rows = 1/20 of the pass "
                f"({q['rows']:,} rows); a context's {q['context_rows']:.0f} rows spread over "
                f"{q['spread']:.0f} batches (median)",
            )
        )
    return out


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.shuffle")
