#!/usr/bin/env bash
# The queue benchmark (bench/queue_bench.py) as run on the lent GPU machine; docs/BENCHMARKS.md quotes this file.
# Needs diffusers 0.42.1 and its small deps as wheels in .whl/ (carried; docs/BENCHMARKS.md, "Reproduce").
# Usage, from the repository root:  bash bench/queue_run.sh [queue_bench.py arguments]
set -uo pipefail
OUT=${OUT:-queue_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft; print(torch.__version__, diffusers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/queue_bench.py --out "$OUT" --work /tmp/queue_bench "$@" 2>&1 | grep -v "experimental feature" | tee "$OUT/run.log"
