#!/usr/bin/env bash
# The prepared device check (bench/gpu_check.py), on a GPU host with PyTorch installed and no
# network. `--download` (run where PyPI is reachable) fills wheels/ (~47 MB) for Python 3.11 and 3.12.
# Then, on the device: `bash deploy/gpu_check.sh` (carry wheels/); results in $OUT or /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--download" ]; then
  for py in 3.11 3.12; do  # transformers 5.24 needs Python 3.11 or later
    pip download -q --no-deps --only-binary=:all: --python-version "$py" \
      -d wheels -r deploy/gpu-check-requirements.txt
  done
  du -sh wheels
  exit 0
fi
pip install -q --no-index --find-links wheels --no-deps -r deploy/gpu-check-requirements.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${OUT:-/tmp}"
timeout 450 python -m bench.gpu_check --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
