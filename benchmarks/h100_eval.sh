#!/usr/bin/env bash
# certkv eval of the bundled tiny model on the GPU (run from the repository root on the device
# machine, where certkv is used from the checkout: PYTHONPATH=.). Writes tables, JSON and plots to
# $OUT (default benchmarks/results). Each part fits one 10-minute device call.
# Usage: bash benchmarks/h100_eval.sh quick|long|ruler|policies-a|policies-b|policies-c|policies-d
# (policies-c/d first calibrate each codebook policy on the bundled calibration text, seed 0)
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
common=(--device cuda --quiet)
case "${1:-}" in
  quick)
    python -m certkv.cli eval "${common[@]}" --bpb-lengths 1024 --bpb-score 64 --bpb-windows 1 \
      --tasks bpb passkey --lengths 2048 --depths 0.5 --trials 2 ;;
  long)  # the model's longest context: bpb and passkey at 4K
    python -m certkv.cli eval "${common[@]}" --bpb-lengths 4096 --bpb-score 128 --bpb-windows 2 \
      --tasks bpb passkey --lengths 4096 --depths 0.1 0.5 0.9 --trials 4 \
      --markdown "$OUT/eval_tinylm_h100_long.md" --json "$OUT/eval_tinylm_h100_long.json" ;;
  ruler)
    python -m certkv.cli eval "${common[@]}" --tasks mk-niah vt cwe --lengths 4096 --trials 4 \
      --markdown "$OUT/eval_tinylm_h100_ruler.md" --json "$OUT/eval_tinylm_h100_ruler.json" ;;
  policies-a|policies-b)  # docs/policies.md: each policy without and with certification
    if [[ "$1" == policies-a ]]; then
      pols=(paper kivi kivi:4)
    else
      pols=(key-favoured:K4V2 progressive:128)
    fi
    methods=(dense)
    for p in "${pols[@]}"; do methods+=("naive@$p" "certified@$p"); done
    python -m certkv.cli eval "${common[@]}" --methods "${methods[@]}" --bpb-lengths 2048 --bpb-score 96 \
      --bpb-windows 2 --tasks bpb passkey --lengths 2048 --depths 0.5 --trials 4 \
      --markdown "$OUT/eval_tinylm_h100_$1.md" --json "$OUT/eval_tinylm_h100_$1.json" ;;
  policies-c|policies-d)  # codebook policies, each calibrated on 4 x 512 tokens of calibration_sample.txt
    if [[ "$1" == policies-c ]]; then
      pols=(kvquant kvquant:2 keys=kvquant:8,values=kivi)
    else
      pols=(rotated rotated:2)
    fi
    methods=(dense)
    cals=()
    for p in "${pols[@]}"; do
      methods+=("naive@$p" "certified@$p")
      cal="$OUT/calibration_tinylm_${p//[:=,]/_}.safetensors"
      python -m certkv.cli calibrate --policy "$p" --device cuda --out "$cal" --sequences 4 --length 512 --seed 0
      cals+=("$cal")
    done
    python -m certkv.cli eval "${common[@]}" --methods "${methods[@]}" --bpb-lengths 2048 --bpb-score 96 \
      --bpb-windows 2 --tasks bpb passkey --lengths 2048 --depths 0.5 --trials 4 --calibration "${cals[@]}" \
      --markdown "$OUT/eval_tinylm_h100_$1.md" --json "$OUT/eval_tinylm_h100_$1.json" ;;
  *) echo "usage: $0 quick|long|ruler|policies-a|policies-b|policies-c|policies-d" >&2; exit 2 ;;
esac
