#!/usr/bin/env bash
# certkv eval of the bundled tiny model on the GPU (run from the repository root on the device
# machine, where certkv is used from the checkout: PYTHONPATH=.). Writes tables, JSON and plots to
# $OUT (default benchmarks/results). Usage: bash benchmarks/h100_eval.sh [quick]
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [[ "${1:-}" == quick ]]; then
  python -m certkv.cli eval --device cuda --bpb-lengths 1024 --bpb-score 64 --bpb-windows 1 \
    --tasks bpb passkey --lengths 2048 --depths 0.5 --trials 2 --quiet
  exit
fi
python -m certkv.cli eval --device cuda --bpb-lengths 1024 2048 4096 --bpb-score 192 --bpb-windows 2 \
  --tasks bpb passkey mk-niah vt cwe --lengths 2048 4096 --depths 0.1 0.5 0.9 --trials 6 --quiet \
  --markdown "$OUT/eval_tinylm_h100.md" --json "$OUT/eval_tinylm_h100.json" --plot "$OUT/eval_tinylm_h100.png"
