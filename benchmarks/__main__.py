"""The benchmark suite: ``python -m benchmarks [--quick]`` (also ``actvpipe bench``)."""

from __future__ import annotations

import subprocess
import sys

MODULES = ("benchmarks.throughput", "benchmarks.hdf5_io")


def main() -> None:
    flags = [a for a in sys.argv[1:] if a == "--quick"]
    if set(sys.argv[1:]) - {"--quick"}:
        sys.exit("usage: python -m benchmarks [--quick]")
    codes = [subprocess.call([sys.executable, "-m", module, *flags]) for module in MODULES]
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
