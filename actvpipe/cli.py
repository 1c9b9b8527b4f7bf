"""The ``actvpipe`` command line (also ``python -m actvpipe``)."""

from __future__ import annotations

import argparse
import sys
import time


def demo(args: argparse.Namespace) -> None:
    """Stream batches from the embedded default (tiny model, bundled corpus), fully offline."""
    import actvpipe

    stream = actvpipe.demo_stream()
    rows = 0
    with stream.buffer(args.buffer).batch(args.batch_size) as loader:
        start = time.perf_counter()
        for step, batch in enumerate(loader, 1):
            rows += len(batch)
            print(
                f"batch {step}: {list(batch.shape)} mean={batch.mean():+.4f} std={batch.std():.4f}",
                flush=True,
            )
            if step == args.steps:
                break
        elapsed = time.perf_counter() - start
    print(f"served {rows:,} rows in {elapsed:.1f}s ({rows / elapsed:,.0f} rows/s, generator start included)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actvpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help=demo.__doc__, description=demo.__doc__)
    p.add_argument("--steps", type=int, default=20, help="number of batches to serve (default 20)")
    p.add_argument("--batch-size", type=int, default=512, help="rows per batch (default 512)")
    p.add_argument("--buffer", type=int, default=16_384, help="shuffle buffer size in rows (default 16384)")
    p.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
