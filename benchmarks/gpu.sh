#!/usr/bin/env bash
# GPU checks and the GPU benchmark table (benchmarks/gpu.py), in well under 10 minutes, on a machine
# that cannot reach the package index. First, where the index is reachable:
#   bash benchmarks/gpu_wheels.sh        # the wheels the GPU image lacks, into .whl/
# then on the GPU machine, with .whl/ carried along:
#   bash benchmarks/gpu.sh [--smoke]
# It never builds or installs the project (it runs from this tree): it installs, with --no-index
# into a target directory, only the wheels whose module this python cannot import, and writes what
# it prints to $GPU_LOG (default: $OUT/gpu.log when $OUT is set, else gpu.log), line by line.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
log=${GPU_LOG:-${OUT:-.}/gpu.log}
site=${GPU_SITE:-${TMPDIR:-/tmp}/actvpipe-gpu-site}
wheels=${GPU_WHEELS:-.whl}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

run() {
  echo "gpu.sh: $(date -u +%FT%TZ), $("$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)')"
  missing=()
  while read -r requirement module; do
    if ! "$python" -c "import $module" 2>/dev/null; then
      missing+=("$requirement")
    fi
  done < <(grep -v '^#' benchmarks/gpu_wheels.txt | awk 'NF')
  rm -rf "$site"
  if ((${#missing[@]})); then
    if [ ! -d "$wheels" ]; then
      echo "gpu.sh: this python lacks ${missing[*]} and there is no $wheels/; run benchmarks/gpu_wheels.sh where the package index is reachable and carry $wheels/"
      return 2
    fi
    echo "gpu.sh: installing from $wheels/ into $site: ${missing[*]}"
    "$python" -m pip install -q --no-index --no-deps --find-links "$wheels" --target "$site" "${missing[@]}"
  fi
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  "$python" -m benchmarks.gpu "$@"
}

mkdir -p "$(dirname "$log")"
run "$@" 2>&1 | tee "$log"
