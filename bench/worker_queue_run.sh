#!/usr/bin/env bash
# The end-to-end queue benchmark (bench/worker_queue_bench.py) as run on the lent GPU machine; docs/BENCHMARKS.md
# quotes this file. Needs, as wheels in .whl_wq/ (carried; docs/BENCHMARKS.md, "End-to-end queue"), what the
# device image lacks: diffusers 0.42.1 and its small deps, and the worker's own dependencies (pydantic,
# pydantic-settings, SQLAlchemy, Alembic, Mako, FastAPI, fastapi-offline, Starlette, uvicorn, websockets and
# imageio-ffmpeg 0.5.1, whose wheel carries ffmpeg).
# Usage, from the repository root:  bash bench/worker_queue_run.sh [worker_queue_bench.py arguments]
#   default phases plain,ours,ours_warm (~510 s on an H200): bash bench/worker_queue_run.sh --deadline-s 540
#   decode-overlap A/B, same machine and --work after that call (~320 s):
#     bash bench/worker_queue_run.sh --phases ours_warm,ours_warm_nooverlap --deadline-s 420
#   (--worker-env KEY=VALUE, repeatable, goes into every worker phase's environment)
set -uo pipefail
OUT=${OUT:-worker_queue_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_wq/*.whl || exit 1
chmod +x /tmp/site/imageio_ffmpeg/binaries/ffmpeg-* 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, sqlalchemy, fastapi; print(torch.__version__, diffusers.__version__, peft.__version__, sqlalchemy.__version__, fastapi.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/worker_queue_bench.py --out "$OUT" --work /tmp/worker_queue_bench "$@" 2>&1 | tee "$OUT/run.log"
