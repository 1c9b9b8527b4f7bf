"""Shared benchmark helpers: GPT-2-architecture models built offline, timing, machine details."""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from actvpipe.demo import demo_model_dir


def build_gpt2(n_layer: int, n_embd: int, n_head: int, n_positions: int = 1024, seed: int = 0) -> Path:
    """A randomly initialised GPT-2-architecture model with the demo tokenizer, saved to a temp dir."""
    out = Path(tempfile.mkdtemp(prefix=f"actvpipe-bench-{n_layer}x{n_embd}-"))
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def bare_forward_tokens_per_s(
    model_dir: Path | list[Path],
    batch: int,
    context: int,
    seconds: float,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Tokens/s of the plain base model (no hooks, no LM head) on random tokens of the given shape,
    on the CPU with as many threads as actvpipe's generator uses (every core). A list of models runs
    them back to back on the same tokens (a token counts once, as in a row holding all of them)."""
    from transformers import AutoModel

    dirs = model_dir if isinstance(model_dir, list) else [model_dir]
    models = [AutoModel.from_pretrained(d, dtype=dtype).to(device).eval() for d in dirs]
    tokens = torch.randint(0, models[0].config.vocab_size, (batch, context), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return _timed_forward(models, tokens, seconds, sync)
    finally:
        torch.set_num_threads(threads)


def _timed_forward(models, tokens: torch.Tensor, seconds: float, sync) -> float:
    batch, context = tokens.shape
    models = models if isinstance(models, list) else [models]
    with torch.inference_mode():
        for model in models:
            model(tokens, use_cache=False)
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for model in models:
                model(tokens, use_cache=False)
            n += 1
        sync()
        elapsed = time.perf_counter() - start
    return n * batch * context / elapsed


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


@dataclass(frozen=True)
class Result:
    """One row of the benchmark table: our measure, the baseline measured in the same run, the ratio."""

    name: str
    ours: str
    baseline: str
    ratio: float | None
    target: str
    note: str = ""


def print_table(results: list[Result], command: str) -> None:
    print(f"machine: {machine()}")
    print(f"| {'benchmark':<58} | {'actvpipe':>18} | {'baseline':>18} | {'ratio':>6} | {'target':<10} | note")
    print(f"| {'-' * 58} | {'-' * 18} | {'-' * 18} | {'-' * 6} | {'-' * 10} | ---")
    for r in results:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        print(f"| {r.name:<58} | {r.ours:>18} | {r.baseline:>18} | {ratio:>6} | {r.target:<10} | {r.note}")
    print(f"command: {command}")


def cli(description: str, run: Callable[[bool], list[Result]], module: str) -> None:
    """``python -m benchmarks.X [--quick]``: run one benchmark module and print its table rows."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="shorter timings and sizes")
    args = parser.parse_args()
    print_table(run(args.quick), f"python -m {module}{' --quick' if args.quick else ''}")


def warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` of memory so both sides get RAM the machine has handed out before.

    On a VM that backs guest memory lazily, the first touch of never-used RAM costs several times a
    copy; without this, whichever side runs on fresh RAM loses, whatever its code does."""
    np.ones(nbytes, dtype=np.uint8)


def computed_rows_per_s(loader, it, seconds: float) -> float:
    """Rows/s the generator computed inside a window of ``seconds`` while ``it`` is drained: rows of
    the blocks whose forward finished after the first one that finished in the window, up to the
    last, over the time between those two finishes (the ``computed`` counter moves when a forward
    ends, before its rows are written; it is read after every batch, about every millisecond)."""
    finished, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        computed = loader.counters()["computed"]
        if not finished or computed != finished[-1][1]:
            finished.append((time.perf_counter(), computed))
    if len(finished) < 3:
        raise RuntimeError("fewer than two blocks finished in a window; lengthen the window")
    (t0, c0), (t1, c1) = finished[1], finished[-1]  # finished[0]: the window's own start
    return (c1 - c0) / (t1 - t0)


def wait_until_idle(loader, timeout: float = 600.0) -> None:
    """Until the generator is blocked: every slot it was given is written (all but the last batch's,
    which go back to it at the next batch) and it sleeps in its poll for free slots, holding rows it
    cannot write, so it takes no CPU from the other side. (Quiet for a while is not enough: a long
    forward is quiet too.)"""
    full = loader.buffer_size - loader.batch_size
    deadline = time.monotonic() + timeout
    while True:
        c = loader.counters()
        run = loader._passes.run
        if c["written"] - c["served"] >= full and run.buffer.operation(0) == "waiting for free slots":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the generator did not block on a full buffer in {timeout:g} s: {c}")
        time.sleep(0.01)
