#!/usr/bin/env bash
# GPU correctness checks and the GPU benchmark table (benchmarks/gpu.py), in well under 10 minutes.
# Needs one CUDA GPU and a python3 with torch; installs this checkout without touching that torch.
# No downloads: GPT-2 small is built from its config. On the project's lent H200 machine, which
# lacks torchdata and datasets, carry their wheels in .whl (see the device tool's README) first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m benchmarks.gpu "$@"
