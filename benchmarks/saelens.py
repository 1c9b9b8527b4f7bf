"""Side by side with SAELens: rows/s of actvpipe ÷ rows/s of SAELens' multi-hook
``ActivationsStore``, capturing the same rows (the MLP's input, which is ln_2's input or
``hook_resid_mid``, and ``hook_mlp_out``, at every layer) on the same model shape, context and
forward batch, each feeding a training loop that takes batches as fast as they come.

Both sides are timed in the steady state, in windows that alternate ABBA (this machine's speed
drifts): SAELens after its first buffer fill was drained, so its windows include its synchronous
refills; actvpipe counting only rows its generator computed inside the window (between the first
and last block finished in it), and idle during SAELens' windows (its buffer full, its generator
blocked). Both mix in a buffer of 40,960 rows. The second row divides each side by its own model's
bare forward (the HF model for actvpipe, the HookedTransformer for SAELens): the pipelines compared
with the two model implementations' speed taken out.

Needs the optional extra (``pip install -e ".[bench]"``, which installs sae-lens); without it the
row says so. Run: python -m benchmarks.saelens [--quick]
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import time
from collections.abc import Iterator

import torch

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

N_LAYER, D_MODEL, HEADS = 4, 256, 4
CONTEXT, FORWARD_BATCH, BATCH = 128, 16, 1024
BUFFER_ROWS = 40 * BATCH  # both sides' mixing buffer


def hooked_model(model_dir):
    """A HookedTransformer of the same shape as the HF model in ``model_dir``, with its tokenizer."""
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
    return HookedTransformer(config, tokenizer=tokenizer)


def saelens_batches(model) -> Iterator[int]:
    """Rows per batch from SAELens' multi-hook store over ``model``."""
    from datasets import Dataset
    from sae_lens import ActivationsStore

    hooks = [f"blocks.{i}.hook_{point}" for i in range(N_LAYER) for point in ("resid_mid", "mlp_out")]
    store = ActivationsStore.from_config_multi_hook(
        model,
        dataset=Dataset.from_dict({"text": corpus_texts() * 50}),
        hook_names=hooks,
        hook_d_ins=dict.fromkeys(hooks, D_MODEL),
        streaming=False,
        context_size=CONTEXT,
        store_batch_size_prompts=FORWARD_BATCH,
        n_batches_in_buffer=BUFFER_ROWS // (FORWARD_BATCH * CONTEXT),  # the same 40,960 rows as ours
        train_batch_size_tokens=BATCH,
        total_training_tokens=10**12,
        device="cpu",
    )
    for batch in store.get_multi_hook_data_loader():
        yield len(batch[hooks[0]])


def hooked_forward_tokens_per_s(model, seconds: float) -> float:
    """Tokens/s of the HookedTransformer's plain forward (no hooks, no loss), SAELens' own model."""
    tokens = torch.randint(0, model.cfg.d_vocab, (FORWARD_BATCH, CONTEXT))
    with torch.inference_mode():
        model(tokens, return_type=None)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(tokens, return_type=None)
            n += 1
    return n * FORWARD_BATCH * CONTEXT / (time.perf_counter() - start)


def saelens_rate(batches: Iterator[int], seconds: float) -> float:
    """Rows/s taken from ``batches`` over a window of ``seconds``."""
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows += next(batches)
    return rows / (time.perf_counter() - start)


def results(quick: bool) -> list[Result]:
    name = f"vs SAELens multi-hook ActivationsStore, GPT-2 arch. {N_LAYER}L d{D_MODEL}, ctx {CONTEXT}"
    if importlib.util.find_spec("sae_lens") is None:
        return [
            Result(name, "", "", None, "> 1", 'skipped: sae-lens not installed (pip install -e ".[bench]")')
        ]
    window, rounds = (6.0, 2) if quick else (15.0, 4)
    torch.set_num_threads(os.cpu_count() or 1)  # SAELens runs here; our generator uses every core too
    model_dir = build_gpt2(N_LAYER, D_MODEL, HEADS, n_positions=CONTEXT)
    try:
        hooked = hooked_model(model_dir)
        theirs = saelens_batches(hooked)
        for _ in range(100):  # past its first buffer fill (20 forward batches, 40 of our batches)
            next(theirs)
        stream = actvpipe.stream(
            model_dir, corpus_texts() * 50, context_length=CONTEXT, generation_batch_size=FORWARD_BATCH
        )
        rates: dict[str, list[float]] = {"ours": [], "theirs": [], "hf": [], "tl": []}
        with stream.buffer(BUFFER_ROWS).batch(BATCH) as loader:
            it = iter(loader)
            for _ in range(80):  # drain the start-up fill twice over
                next(it)
            for r in range(rounds):
                for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                    wait_until_idle(loader)
                    if side == "ours":
                        rates["ours"].append(computed_rows_per_s(loader, it, window))
                    else:
                        rates["theirs"].append(saelens_rate(theirs, window))
            wait_until_idle(loader)
            bare = {
                "hf": lambda: bare_forward_tokens_per_s(model_dir, FORWARD_BATCH, CONTEXT, window / 2),
                "tl": lambda: hooked_forward_tokens_per_s(hooked, window / 2),
            }
            for side in ("hf", "tl", "tl", "hf"):
                rates[side].append(bare[side]())
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    ours, theirs, hf, tl = (statistics.median(v) for v in rates.values())
    ratios = [a / b for a, b in zip(rates["ours"], rates["theirs"], strict=True)]
    note = f"{rounds} rounds ABBA, steady state, both buffers {BUFFER_ROWS:,} rows"
    own = (
        f"actvpipe {ours / hf:.3f} of the HF forward ({hf:,.0f} tok/s), SAELens {theirs / tl:.3f} of "
        f"the HookedTransformer's ({tl:,.0f} tok/s)"
    )
    return [
        Result(
            f"{name}, end to end",
            f"{ours:,.0f} rows/s",
            f"{theirs:,.0f} rows/s",
            statistics.median(ratios),
            "> 1",
            note,
        ),
        Result(
            f"{name}, pipeline only (each ÷ its own model's bare forward)",
            f"{ours / hf:.3f}",
            f"{theirs / tl:.3f}",
            (ours / hf) / (theirs / tl),
            "> 1",
            own,
        ),
    ]


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.saelens")
