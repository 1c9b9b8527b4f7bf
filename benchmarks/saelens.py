"""Side by side with SAELens: served rows/s of actvpipe ÷ rows/s of SAELens' multi-hook
``ActivationsStore``, capturing the same rows (the MLP's input, which is ln_2's input or
``hook_resid_mid``, and ``hook_mlp_out``, at every layer) on the same model shape, context and
forward batch, each feeding a training loop that takes batches as fast as they come.

Needs the optional extra (``pip install -e ".[bench]"``, which installs sae-lens); without it the
row says so. Windows alternate between the two, as in P1, because this machine's speed drifts.
Run: python -m benchmarks.saelens [--quick]
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import time
from collections.abc import Iterator

import actvpipe
from actvpipe.demo import corpus_texts
from benchmarks.common import Result, build_gpt2, cli

N_LAYER, D_MODEL, HEADS = 4, 256, 4
CONTEXT, FORWARD_BATCH, BATCH = 128, 16, 1024


def saelens_batches(model_dir) -> Iterator[int]:
    """Rows per batch from SAELens' multi-hook store over a HookedTransformer of the same shape."""
    from datasets import Dataset
    from sae_lens import ActivationsStore
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = HookedTransformerConfig(
        n_layers=N_LAYER,
        d_model=D_MODEL,
        n_heads=HEADS,
        d_head=D_MODEL // HEADS,
        d_mlp=4 * D_MODEL,
        n_ctx=CONTEXT,
        d_vocab=len(tokenizer),
        act_fn="gelu_new",
        normalization_type="LN",
        device="cpu",
    )
    model = HookedTransformer(config, tokenizer=tokenizer)
    hooks = [f"blocks.{i}.hook_{point}" for i in range(N_LAYER) for point in ("resid_mid", "mlp_out")]
    store = ActivationsStore.from_config_multi_hook(
        model,
        dataset=Dataset.from_dict({"text": corpus_texts() * 50}),
        hook_names=hooks,
        hook_d_ins=dict.fromkeys(hooks, D_MODEL),
        streaming=False,
        context_size=CONTEXT,
        store_batch_size_prompts=FORWARD_BATCH,
        train_batch_size_tokens=BATCH,
        total_training_tokens=10**12,
        device="cpu",
    )
    for batch in store.get_multi_hook_data_loader():
        yield len(batch[hooks[0]])


def actvpipe_batches(model_dir) -> Iterator[int]:
    stream = actvpipe.stream(
        model_dir, corpus_texts() * 50, context_length=CONTEXT, generation_batch_size=FORWARD_BATCH
    )
    with stream.buffer(40 * BATCH).batch(BATCH, reuse=True) as loader:
        for batch in loader:
            yield len(batch)


def rate(batches: Iterator[int], seconds: float) -> float:
    """Rows/s taken from ``batches`` over a window of ``seconds``."""
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows += next(batches)
    return rows / (time.perf_counter() - start)


def paired(
    ours: Iterator[int], theirs: Iterator[int], window: float, rounds: int
) -> list[tuple[float, float]]:
    """(ours, theirs) rows/s in adjacent windows, after one warm-up window each."""
    rate(ours, window / 2)
    rate(theirs, window / 2)
    return [(rate(ours, window), rate(theirs, window)) for _ in range(rounds)]


def results(quick: bool) -> list[Result]:
    name = f"vs SAELens multi-hook ActivationsStore, GPT-2 arch. {N_LAYER}L d{D_MODEL}, ctx {CONTEXT}"
    if importlib.util.find_spec("sae_lens") is None:
        return [
            Result(name, "", "", None, "> 1", 'skipped: sae-lens not installed (pip install -e ".[bench]")')
        ]
    model_dir = build_gpt2(N_LAYER, D_MODEL, HEADS, n_positions=CONTEXT)
    try:
        ours, theirs = actvpipe_batches(model_dir), saelens_batches(model_dir)
        pairs = paired(ours, theirs, 10.0 if quick else 20.0, 1 if quick else 3)
        ours.close()  # ends the generator function, so its ``with`` block closes our loader now
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    ratios = [a / b for a, b in pairs]
    return [
        Result(
            name,
            f"{statistics.median(a for a, _ in pairs):,.0f} rows/s",
            f"{statistics.median(b for _, b in pairs):,.0f} rows/s",
            statistics.median(ratios),
            "> 1",
            f"{len(pairs)} paired window(s)",
        )
    ]


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.saelens")
