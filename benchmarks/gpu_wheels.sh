#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git; carried with a device run) the wheels listed in
# benchmarks/gpu_wheels.txt, for the lent GPU machine: CPython $GPU_PYTHON (default 3.12),
# manylinux x86-64, binary wheels only, no dependency resolution. Run it where the package index
# is reachable; the GPU machine cannot reach it.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${GPU_PYTHON:-3.12}
dest=${GPU_WHEELS:-.whl}
rm -rf "$dest" && mkdir -p "$dest"
grep -v '^#' benchmarks/gpu_wheels.txt | awk 'NF {print $1}' > "$dest/requirements.txt"
python3 -m pip download -q --no-deps --only-binary=:all: --dest "$dest" \
  --python-version "$version" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -r "$dest/requirements.txt"
ls "$dest"
