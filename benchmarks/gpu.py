"""GPU checks and benchmark: rows computed on the GPU equal CPU rows; captured tokens/s ÷ bare bf16
forward tokens/s on the GPU, for GPT-2 small built from its config (no downloads); and where a
block's time goes: the GPU capture forward, the copy to the host, the trainer's gather of a batch.

Run on a CUDA machine through ``bash benchmarks/gpu.sh``; ``--smoke`` runs a tiny version on
whatever device is present (the test suite runs it on the CPU). Each line is printed as its check
finishes; buffers are sized to the free space of /dev/shm. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

import actvpipe
from actvpipe.capture import ActivationCapture
from actvpipe.demo import corpus_texts
from actvpipe.shm import SHM_DIR, SharedBlock, TrainerView
from benchmarks.common import bare_forward_tokens_per_s, build_gpt2, machine

SHM_SHARE = 0.6  # of /dev/shm's free space, for one buffer at a time


def shm_rows(row_bytes: int) -> int:
    """How many rows of ``row_bytes`` one buffer may hold in /dev/shm's free space."""
    return int(SHM_SHARE * shutil.disk_usage(SHM_DIR).free // row_bytes)


def row_bytes(stream: actvpipe.ActivationStream) -> int:
    return int(np.prod(stream.spec.row_shape)) * torch.empty((), dtype=stream.spec.dtype).element_size()


def pass_rows(
    model_dir, texts, context: int, batch_device: str | None = None, **stream_args
) -> tuple[torch.Tensor, bool, bool]:
    """Every row of the pass in generation order (on the host), whether the generator reported the
    GPU, and whether each batch's sum taken at once on the consumer's stream (before any host sync)
    equals its sum on the host afterwards: batches of ``.batch(device=batch_device)`` are complete
    when handed over."""
    stream = actvpipe.stream(model_dir, texts, context_length=context, **stream_args)
    size = min(100_000, shm_rows(row_bytes(stream)))
    with stream.buffer(size).batch(min(1000, size), with_tokens=True, device=batch_device) as loader:
        batches, sums = [], []
        for batch in loader:
            sums.append(batch.acts.double().sum())
            batches.append(batch)
        on_gpu = loader.on_gpu
    host = [float(b.acts.cpu().double().sum()) for b in batches]
    complete = all(abs(float(s) - h) <= 1e-9 * max(1.0, abs(h)) for s, h in zip(sums, host, strict=True))
    acts = torch.cat([b.acts.cpu() for b in batches]).float()
    key = torch.cat([(b.seq * context + b.pos).cpu() for b in batches])
    return acts[torch.argsort(key)], on_gpu, complete


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def checks(model_dir, device: str, context: int) -> Iterator[tuple[str, str, bool]]:
    """Each check as it finishes: (what, measured, passed)."""
    texts = corpus_texts()[:8]
    expect_gpu = device.startswith("cuda")
    cpu, _, _ = pass_rows(model_dir, texts, context, device="cpu")
    handed, _, complete = pass_rows(model_dir, texts, context, batch_device=device, device="cpu")
    err = relative_error(handed, cpu)
    name = f".batch(device={device!r}) vs host batches; complete on the stream"
    yield name, f"{err:.1e}, complete={complete}", err < 1e-6 and complete
    fp32, fp32_gpu, _ = pass_rows(model_dir, texts, context, device=device)
    err = relative_error(fp32, cpu)
    yield f"{device} float32 rows vs CPU rows", f"relative error {err:.1e}", err < 1e-4
    yield f"{device} run reported on_gpu={expect_gpu}", str(fp32_gpu), fp32_gpu == expect_gpu
    bf16, _, _ = pass_rows(model_dir, texts, context, device=device, model_dtype=torch.bfloat16)
    err = relative_error(bf16, cpu)
    yield f"{device} bf16 model, float32 buffer vs CPU", f"relative error {err:.1e}", err < 5e-2
    auto, auto_gpu, _ = pass_rows(model_dir, texts, context, device="auto")
    err = relative_error(auto, cpu)
    ok = err < 1e-4 and auto_gpu == expect_gpu
    yield "device='auto' rows vs CPU; starts on the GPU", f"{err:.1e}, on_gpu={auto_gpu}", ok
    pair, pair_gpu, _ = pass_rows([model_dir, model_dir], texts, context, device="auto")
    err = max(relative_error(pair[:, m], cpu) for m in range(2))
    ok = err < 1e-4 and pair_gpu == expect_gpu
    yield "two models, device='auto', each vs CPU rows", f"{err:.1e}, on_gpu={pair_gpu}", ok


def captured_tokens_per_s(model_dir, device: str, context: int, gen_batch: int, seconds: float) -> float:
    """Rows/s written by a bf16 generator on ``device`` while the training loop drains the buffer,
    as tokens/s (each context yields ``context - 1`` rows)."""
    corpus = Path(model_dir) / "corpus.jsonl"  # a file: read by actvpipe's own reader, no `datasets`
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts() * 400))
    stream = actvpipe.stream(
        model_dir,
        str(corpus),
        context_length=context,
        generation_batch_size=gen_batch,
        dtype=torch.bfloat16,
        model_dtype=torch.bfloat16,
        device=device,
    )
    block = gen_batch * (context - 1)
    size = min(8 * block, shm_rows(row_bytes(stream)))
    batch = max(1, min(4096, block, size // 4))
    with stream.buffer(size).batch(batch) as loader:
        it = iter(loader)
        for _ in range(4 * block // batch):
            next(it)
        written, start = loader.counters()["written"], time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(it)
        rows = loader.counters()["written"] - written
        elapsed = time.perf_counter() - start
    return rows / elapsed * context / (context - 1)


def block_breakdown(model_dir, device: str, context: int, gen_batch: int, seconds: float) -> list[str]:
    """Seconds per block of ``gen_batch`` contexts for the bf16 capture forward alone (on ``device``)
    and for the copy of its rows into pinned host memory, and per batch of 4096 for the trainer's
    gather out of a shared buffer (``TrainerView.gather``, the loader's own), each timed alone."""
    from transformers import AutoModel

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    capture = ActivationCapture(model, range(model.config.n_layer), first_pos=1)
    tokens = torch.randint(0, model.config.vocab_size, (gen_batch, context), device=device)

    def timed(step) -> float:
        step(), sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            step()
            n += 1
        sync()
        return (time.perf_counter() - start) / n

    rows = capture(tokens)
    forward = timed(lambda: capture(tokens))
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=device == "cuda")
    copy = timed(lambda: host.copy_(rows, non_blocking=True))
    capture.remove()
    size = min(len(rows) * 4, shm_rows(host[0].nbytes))
    batch = max(1, min(4096, size // 2))
    block = SharedBlock.create(size, tuple(rows.shape[1:]), rows.dtype)
    try:
        buffer, out = TrainerView(block), torch.empty((batch, *rows.shape[1:]), dtype=rows.dtype)
        slots = np.random.default_rng(0).permutation(size)[:batch]
        block.rows.view(torch.uint8).fill_(1)  # fault the pages in
        gather = timed(lambda: buffer.gather(slots, out))
    finally:
        block.unlink()
    nbytes = host.nbytes
    return [
        f"capture forward, {gen_batch} x {context} tokens, bf16, {device}: {forward * 1e3:.2f} ms a block",
        f"copy of its rows to {'pinned ' if device == 'cuda' else ''}host memory ({nbytes / 1e6:.0f} MB): "
        f"{copy * 1e3:.2f} ms a block ({nbytes / copy / 1e9:.1f} GB/s)",
        f"trainer's gather of {batch} rows from a {size}-row buffer, {torch.get_num_threads()} threads: "
        f"{gather * 1e3:.2f} ms a batch ({out.nbytes / gather / 1e9:.1f} GB/s)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model and short timings, any device")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and device == "cpu":
        sys.exit("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine, or pass --smoke")
    shape, context, gen_batch, seconds = (
        ((2, 64, 4), 64, 8, 0.5) if args.smoke else ((12, 768, 12), 1024, 32, 20.0)
    )
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    print(f"machine: {machine()}; GPU: {gpu}; {time.strftime('%Y-%m-%d')}")
    free = shutil.disk_usage(SHM_DIR).free / 2**30
    print(f"{SHM_DIR}: {free:.1f} GiB free; each buffer uses up to {SHM_SHARE:.0%} of it")
    print(f"model: GPT-2 architecture, {shape[0]} layers, d_model {shape[1]}, context {context}, bf16")
    model_dir = build_gpt2(*shape, n_positions=max(context, 1024))
    passed = True
    try:
        for name, value, ok in checks(model_dir, device, min(context, 128)):
            print(f"{'OK  ' if ok else 'FAIL'} {name:<48} {value}")
            passed &= ok
        for line in block_breakdown(model_dir, device, context, gen_batch, seconds):
            print(f"time {line}")
        ours = captured_tokens_per_s(model_dir, device, context, gen_batch, seconds)
        bare = bare_forward_tokens_per_s(model_dir, gen_batch, context, seconds, device, torch.bfloat16)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    print(f"{'measure':<52} {'actvpipe tok/s':>14} {'bare tok/s':>12} {'ratio':>6}")
    measure = "captured tokens/s / bare bf16 forward tokens/s"
    print(f"{measure:<52} {ours:>14,.0f} {bare:>12,.0f} {ours / bare:>6.3f}")
    print("command: " + ("python -m benchmarks.gpu --smoke" if args.smoke else "bash benchmarks/gpu.sh"))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
