#!/usr/bin/env bash
# The device run of benchmarks/gpu_check.py. python3 there has torch, lightning, timm, torchmetrics, pandas and
# nvidia-ml-py but no MLflow, which the check does not need. Nothing is fetched from the network.
#   bash benchmarks/gpu_check.sh [gpu_check.py options]   # writes to $OUT, else ./gpu_check_out; PYTHON=... to choose
set -euo pipefail
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit,temperature.gpu --format=csv \
    > "$out/nvidia_smi.csv" 2>&1 || true
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Progress bars and warnings go to log.txt; the tables (gpu_check.txt) are printed at the end.
if ! "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out" "$@" > "$out/log.txt" 2>&1; then
    tail -c 6000 "$out/log.txt"
    exit 1
fi
cat "$out/gpu_check.txt"
tail -n 2 "$out/log.txt"
