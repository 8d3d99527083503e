#!/usr/bin/env bash
# The base CLSP config's train step on one GPU: bf16, 40 clips x 10 s (400 s of audio per step),
# per-layer remat, 128-token captions; compile time, step time, MFU against a bf16 8192^2 matmul, memory.
#
#   benchmarks/gpu.sh [OUT_DIR]      -> OUT_DIR/train_step_base_gpu.json (default benchmarks/results)
#
# Needs a CUDA build of jaxlib in the environment (pip install "jax[cuda12]==<the installed jax version>");
# the step benchmark is stopped after 480 s. Figures and the command's place: BENCHMARKS.md, "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"

"$PY" - <<'PY'
import jax, sys
if jax.devices()[0].platform != "gpu":
    sys.exit(f"benchmarks/gpu.sh needs a GPU; JAX sees {jax.devices()}")
print("devices:", jax.devices())
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

timeout 480 "$PY" -m benchmarks.train_step --config configs/clsp_base.py \
  --batch-clips 40 --clip-seconds 10 --text-length 128 --steps 5 --warmup 2 --remat layer \
  --config.train.compute_dtype=bfloat16 --json "$OUT/train_step_base_gpu.json"
