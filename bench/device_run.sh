#!/usr/bin/env bash
# The benchmark as run on the lent GPU machine (docs/BENCHMARKS.md quotes this file).
# Needs the wheels the image lacks in .whl_bench/ (see docs/BENCHMARKS.md): diffusers and its small
# deps, pydantic, SQLAlchemy, Alembic, Mako and imageio-ffmpeg 0.5.1 (its wheel carries ffmpeg).
# Usage, from the repository root:  bash bench/device_run.sh [gpu_bench.py arguments]
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_bench/*.whl || exit 1
chmod +x /tmp/site/imageio_ffmpeg/binaries/ffmpeg-* 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
free -g | tee -a "$OUT/gpu.txt"
python3 bench/gpu_bench.py --out "$OUT" --work /tmp/wan_bench "$@" 2>&1 | tee "$OUT/run.log"
