"""The ``actvpipe`` command line (also ``python -m actvpipe``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from actvpipe.defaults import default_of
from actvpipe.hdf5 import open_cache_file
from actvpipe.stream import ActivationStream, demo_stream, from_hdf5, stream


def demo(args: argparse.Namespace) -> None:
    """Stream batches from the embedded default (tiny model, bundled corpus), fully offline, with the
    live dashboard on stderr."""
    rows = 0
    steps = args.steps if args.steps is not None else 200 if args.log_dir else 20
    # With --log-dir every batch is logged, so even a short demo leaves its charts well filled.
    interval = 0.0 if args.log_dir else 0.2
    buffered = demo_stream().buffer(
        args.buffer,
        log_dir=args.log_dir,
        progress=True,
        refresh_interval=interval,
        write_hdf5=args.write_hdf5,
    )
    with buffered.batch(args.batch_size) as loader:
        start = time.perf_counter()
        for step, batch in enumerate(loader, 1):
            rows += len(batch)
            print(
                f"batch {step}: {list(batch.shape)} mean={batch.mean():+.4f} std={batch.std():.4f}",
                flush=True,
            )
            if step == steps:
                break
        elapsed = time.perf_counter() - start
    print(f"served {rows:,} rows in {elapsed:.1f}s ({rows / elapsed:,.0f} rows/s, generator start included)")
    if args.log_dir:
        print(f"TensorBoard (combined charts under Custom Scalars): tensorboard --logdir {args.log_dir}")
    if args.write_hdf5:
        file = open_cache_file(buffered.options.write_hdf5)
        state = (
            "complete" if file.complete else "incomplete: --steps 0 streams the whole pass and completes it"
        )
        print(f"cached {file.rows:,} rows in {file.path} ({state}); read it with actvpipe.from_hdf5")


def _stream(args: argparse.Namespace) -> ActivationStream:
    layers = [int(i) for i in args.layers.split(",")] if args.layers else None
    return stream(
        args.model,
        args.dataset,
        text_column=args.text_column,
        context_length=args.context_length,
        layers=layers,
        generation_batch_size=args.generation_batch_size,
        device=args.device,
    )


def _add_stream_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="hub id or local directory")
    p.add_argument("--dataset", required=required, help="hub id, file or directory (json/jsonl/txt/parquet)")
    p.add_argument("--context-length", type=int, required=required)
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    for name, kind in (("text_column", str), ("generation_batch_size", int), ("device", str)):
        default = default_of(stream, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"default {default}")


def cache(args: argparse.Namespace) -> None:
    """Write a model's activations over a dataset to an HDF5 file (a finite pass, or --max-rows)."""
    import torch

    path = _stream(args).to_hdf5(args.out, max_rows=args.max_rows, dtype=getattr(torch, args.dtype))
    print(f"wrote {path}")


def stats(args: argparse.Namespace) -> None:
    """Print normalisation statistics (mean, std, mean norm per capture point and layer) as JSON: of
    a stream's first --rows rows, or of an HDF5 cache file's first --rows rows."""
    if args.file is not None:
        source = from_hdf5(args.file)
    elif args.model and args.dataset and args.context_length:
        source = _stream(args)
    else:
        raise ValueError("pass an HDF5 file, or --model, --dataset and --context-length")
    result = source.stats(args.rows)
    text = result.to_json()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    norms = ", ".join(f"{v:.3g}" for v in result.mean_norm.flatten().tolist())
    print(f"{result.rows:,} rows; mean norm per capture point and layer: {norms}", file=sys.stderr)


def bench(args: argparse.Namespace) -> None:
    """Run the benchmark suite (``python -m benchmarks``) from a source checkout; --quick by default."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise FileNotFoundError(
            f"benchmarks/ not found next to {root / 'actvpipe'}: actvpipe bench runs a source checkout's "
            "benchmarks; clone the repository and pip install -e it"
        )
    command = [sys.executable, "-m", "benchmarks", *([] if args.full else ["--quick"])]
    sys.exit(subprocess.call(command, cwd=root))


def inspect(args: argparse.Namespace) -> None:
    """Print an activation file's shape, dtype, row count, size and attributes."""
    file = open_cache_file(args.file)
    mib = os.path.getsize(file.path) / 2**20
    print(f"{file.path}: {file.rows:,} rows of {list(file.row_shape)} {file.attrs['dtype']}, {mib:,.1f} MiB")
    for key, value in sorted(file.attrs.items()):
        print(f"  {key}: {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actvpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help=demo.__doc__, description=demo.__doc__)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="batches to serve (default 20, 200 with --log-dir; 0: the whole pass)",
    )
    p.add_argument("--batch-size", type=int, default=512, help="rows per batch (default 512)")
    p.add_argument("--buffer", type=int, default=16_384, help="shuffle buffer size in rows (default 16384)")
    p.add_argument("--log-dir", default=None, help="write TensorBoard scalars to this directory")
    p.add_argument("--write-hdf5", default=None, metavar="PATH", help="also cache the rows generated to PATH")
    p.set_defaults(run=demo)

    p = commands.add_parser("bench", help=bench.__doc__, description=bench.__doc__)
    p.add_argument("--full", action="store_true", help="the full benchmarks instead of --quick")
    p.set_defaults(run=bench)

    p = commands.add_parser("cache", help=cache.__doc__, description=cache.__doc__)
    _add_stream_arguments(p)
    p.add_argument("--out", required=True, help="the .h5 file to write")
    p.add_argument(
        "--max-rows", type=int, default=None, help="stop after this many rows (default: the whole pass)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="storage dtype"
    )
    p.set_defaults(run=cache)

    p = commands.add_parser("stats", help=stats.__doc__, description=stats.__doc__)
    p.add_argument("file", nargs="?", default=None, help="an HDF5 cache file (else a stream, below)")
    _add_stream_arguments(p, required=False)
    rows = default_of(ActivationStream.stats, "rows")
    p.add_argument("--rows", type=int, default=rows, help=f"rows to compute over (default {rows})")
    p.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    p.set_defaults(run=stats)

    p = commands.add_parser("inspect", help=inspect.__doc__, description=inspect.__doc__)
    p.add_argument("file")
    p.set_defaults(run=inspect)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        sys.exit(f"actvpipe {args.command}: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
