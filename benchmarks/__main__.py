"""The benchmark suite as one table: ``python -m benchmarks [--quick]`` (also ``actvpipe bench``).

Each module runs in its own process (so one's memory cannot inflate another's measurement) and
returns its rows; every ratio is against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import Result, print_table

MODULES = (
    "throughput",
    "serving",
    "footprint",
    "hdf5_io",
    "write_through",
    "shuffle",
    "saelens",
)
RUN = (
    "import dataclasses, json, sys; from benchmarks.{module} import results; "
    "print('RESULTS ' + json.dumps([dataclasses.asdict(r) for r in results({quick})]))"
)


def module_results(module: str, quick: bool) -> list[Result]:
    out = subprocess.run(
        [sys.executable, "-c", RUN.format(module=module, quick=quick)], capture_output=True, text=True
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS ")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return [Result(f"benchmarks.{module}", "", "", None, "", f"FAILED: {tail[0]}")]
    return [Result(**row) for row in json.loads(lines[-1][len("RESULTS ") :])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter timings and sizes (under 5 minutes)")
    args = parser.parse_args()
    results = [row for module in MODULES for row in module_results(module, args.quick)]
    print_table(results, f"python -m benchmarks{' --quick' if args.quick else ''}")
    sys.exit(1 if any(r.note.startswith("FAILED") for r in results) else 0)


if __name__ == "__main__":
    main()
