"""GPU checks and benchmark: rows computed on the GPU equal CPU rows, and captured tokens/s ÷ bare
bf16 forward tokens/s on the GPU, for GPT-2 small built from its config (no downloads).

Run on a CUDA machine through ``bash benchmarks/gpu.sh``; ``--smoke`` runs a tiny version on
whatever device is present (the test suite runs it on the CPU). Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import torch

import actvpipe
from actvpipe.demo import corpus_texts
from benchmarks.common import bare_forward_tokens_per_s, build_gpt2, machine


def pass_rows(
    model_dir, texts, context: int, batch_device: str | None = None, **stream_args
) -> tuple[torch.Tensor, bool, bool]:
    """Every row of the pass in generation order (on the host), whether the generator reported the
    GPU, and whether each batch's sum taken at once on the consumer's stream (before any host sync)
    equals its sum on the host afterwards: batches of ``.batch(device=batch_device)`` are complete
    when handed over."""
    stream = actvpipe.stream(model_dir, texts, context_length=context, **stream_args)
    with stream.buffer(100_000).batch(1000, with_tokens=True, device=batch_device) as loader:
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


def checks(model_dir, device: str, context: int) -> list[tuple[str, str, bool]]:
    texts = corpus_texts()[:8]
    cpu, _, _ = pass_rows(model_dir, texts, context, device="cpu")
    fp32, fp32_gpu, _ = pass_rows(model_dir, texts, context, device=device)
    bf16, _, _ = pass_rows(model_dir, texts, context, device=device, model_dtype=torch.bfloat16)
    auto, auto_gpu, _ = pass_rows(model_dir, texts, context, device="auto")
    handed, _, complete = pass_rows(model_dir, texts, context, batch_device=device, device="cpu")
    pair, pair_gpu, _ = pass_rows([model_dir, model_dir], texts, context, device="auto")
    expect_gpu = device.startswith("cuda")
    out = []
    err = relative_error(handed, cpu)
    ok = err < 1e-6 and complete
    name = f".batch(device={device!r}) vs host batches; complete on the stream"
    out.append((name, f"{err:.1e}, complete={complete}", ok))
    err = relative_error(fp32, cpu)
    out.append((f"{device} float32 rows vs CPU rows", f"relative error {err:.1e}", err < 1e-4))
    out.append((f"{device} run reported on_gpu={expect_gpu}", str(fp32_gpu), fp32_gpu == expect_gpu))
    err = relative_error(bf16, cpu)
    out.append((f"{device} bf16 model, float32 buffer vs CPU", f"relative error {err:.1e}", err < 5e-2))
    err = relative_error(auto, cpu)
    ok = err < 1e-4 and auto_gpu == expect_gpu
    out.append(("device='auto' rows vs CPU; starts on the GPU", f"{err:.1e}, on_gpu={auto_gpu}", ok))
    err = max(relative_error(pair[:, m], cpu) for m in range(2))
    ok = err < 1e-4 and pair_gpu == expect_gpu
    out.append(("two models, device='auto', each vs CPU rows", f"{err:.1e}, on_gpu={pair_gpu}", ok))
    return out


def captured_tokens_per_s(model_dir, device: str, context: int, gen_batch: int, seconds: float) -> float:
    """Rows/s written by a bf16 generator on ``device`` while the training loop drains the buffer,
    as tokens/s (each context yields ``context - 1`` rows)."""
    stream = actvpipe.stream(
        model_dir,
        corpus_texts() * 400,
        context_length=context,
        generation_batch_size=gen_batch,
        dtype=torch.bfloat16,
        model_dtype=torch.bfloat16,
        device=device,
    )
    block = gen_batch * (context - 1)
    batch = min(4096, block)
    with stream.buffer(8 * block).batch(batch) as loader:
        it = iter(loader)
        for _ in range(4 * block // batch):
            next(it)
        written, start = loader.counters()["written"], time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(it)
        rows = loader.counters()["written"] - written
        elapsed = time.perf_counter() - start
    return rows / elapsed * context / (context - 1)


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
    model_dir = build_gpt2(*shape, n_positions=max(context, 1024))
    try:
        results = checks(model_dir, device, min(context, 128))
        ours = captured_tokens_per_s(model_dir, device, context, gen_batch, seconds)
        bare = bare_forward_tokens_per_s(model_dir, gen_batch, context, seconds, device, torch.bfloat16)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    print(f"machine: {machine()}; GPU: {gpu}; {time.strftime('%Y-%m-%d')}")
    print(f"model: GPT-2 architecture, {shape[0]} layers, d_model {shape[1]}, context {context}, bf16")
    for name, value, ok in results:
        print(f"{'OK  ' if ok else 'FAIL'} {name:<48} {value}")
    print(f"{'measure':<52} {'actvpipe tok/s':>14} {'bare tok/s':>12} {'ratio':>6}")
    measure = "captured tokens/s / bare bf16 forward tokens/s"
    print(f"{measure:<52} {ours:>14,.0f} {bare:>12,.0f} {ours / bare:>6.3f}")
    print("command: " + ("python -m benchmarks.gpu --smoke" if args.smoke else "bash benchmarks/gpu.sh"))
    sys.exit(0 if all(ok for *_, ok in results) else 1)


if __name__ == "__main__":
    main()
