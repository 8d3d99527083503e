#!/usr/bin/env bash
# One-shot accelerator check: the base CLSP config's train step in bf16, 40 clips x 10 s (400 s of audio per
# step), 128-token captions, once per remat policy (none, layer, layer_save_dots; one that does not fit or
# runs past its time is recorded as such), each in its own process (its own memory peak): compile time, step
# time, clips/s, audio-s/s, MFU against a bf16 8192^2 matmul measured in the same process, memory per device
# (XLA's analysis and the allocator's peak); then the embedding throughput of `CLSP` for 32 x 10 s clips and
# 256 x 128-token captions. All in one JSON, OUT_DIR/gpu.json (default benchmarks/results).
#
#   benchmarks/gpu.sh [--dry-run] [OUT_DIR]
#
# --dry-run: the same path on the CPU with configs/tiny.py shrunk to the tests' micro network (the base config
# even shrunk takes minutes to compile on XLA:CPU), 2 clips x 1 s, 16-token captions, one step, a 256^2 peak:
# the suite runs it (tests/test_benchmarks.py) so the device run cannot fail on a typo. Python: $PYTHON, else .venv/bin/python
# when there is one, else python3. Time limits: STEP_TIMEOUT (s per remat policy, default 130), EMBED_TIMEOUT
# (default 80): under 8 minutes in all (a dry run only guards against hangs: 900 and 300).
#
# On the accelerator image (Python 3.12, jax/jaxlib 0.11.2 with the CUDA 13 plugin, flax, optax,
# orbax-checkpoint, tensorstore, tokenizers, safetensors, absl-py, etils, scipy preinstalled, no package
# index) nothing is pip-installed: this script puts the repository root on PYTHONPATH, and the 12 wheels the
# benchmarks' imports need beyond the image (grain, array_record, portpicker, tensorflow-datasets and 4 of its
# dependencies, ml_collections, soundfile, cffi, soxr) travel with the command: BENCHMARKS.md §8 lists them
# with the commands that fetch and install them.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-benchmarks/results}"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
PARTS="$(mktemp -d)"
trap 'rm -rf "$PARTS"' EXIT

if (( DRY )); then
  export JAX_PLATFORMS=cpu
  CONFIG=configs/tiny.py
  STEP_TIMEOUT="${STEP_TIMEOUT:-900}" EMBED_TIMEOUT="${EMBED_TIMEOUT:-300}"
  MODEL=(--config.model.speech.downsampling_factor="(1,2)" --config.model.speech.num_encoder_layers="(1,1)"
         --config.model.speech.encoder_dim="(32,)" --config.model.speech.encoder_unmasked_dim="(24,)"
         --config.model.speech.feedforward_dim="(64,)" --config.model.speech.num_heads="(2,)"
         --config.model.speech.cnn_module_kernel="(15,)" --config.model.speech.subsampling_channels="(8,16,32)"
         --config.train.init_text= --config.model.text.hidden_size=32
         --config.model.text.num_hidden_layers=1 --config.model.text.num_attention_heads=2
         --config.model.text.intermediate_size=64 --config.model.joint_dim=16)
  STEP=(--batch-clips 2 --clip-seconds 1 --text-length 16 --steps 1 --warmup 0 --peak-size 256)
  EMBED=(--clips 2 --clip-seconds 10 --captions 4 --text-length 16 --iters 1)
else
  "$PY" - <<'PY'
import jax, sys
if jax.devices()[0].platform != "gpu":
    sys.exit(f"benchmarks/gpu.sh needs a GPU (or --dry-run); JAX sees {jax.devices()}")
print("devices:", jax.devices())
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  CONFIG=configs/clsp_base.py
  MODEL=()
  STEP=(--batch-clips 40 --clip-seconds 10 --text-length 128 --steps 5 --warmup 2)
  EMBED=(--clips 32 --clip-seconds 10 --captions 256 --text-length 128 --iters 5)
fi

for remat in none layer layer_save_dots; do
  echo "== train step, remat $remat"
  # A policy that runs out of memory or time leaves no JSON; the summary records its exit status.
  status=0
  timeout "${STEP_TIMEOUT:-130}" "$PY" -m benchmarks.train_step --config "$CONFIG" "${STEP[@]}" \
    --remat "$remat" --config.train.compute_dtype=bfloat16 "${MODEL[@]}" --json "$PARTS/step_$remat.json" \
    > "$PARTS/step_$remat.log" 2>&1 || status=$?
  echo "$status" > "$PARTS/step_$remat.status"
  tail -n 8 "$PARTS/step_$remat.log"
done
echo "== embedding"
status=0
timeout "${EMBED_TIMEOUT:-80}" "$PY" -m benchmarks.embed --config "$CONFIG" "${EMBED[@]}" \
  --config.train.compute_dtype=bfloat16 "${MODEL[@]}" --json "$PARTS/embed.json" > "$PARTS/embed.log" 2>&1 || status=$?
echo "$status" > "$PARTS/embed.status"
tail -n 4 "$PARTS/embed.log"

"$PY" -m benchmarks.gpu_report "$PARTS" "$OUT/gpu.json" --dry-run="$DRY"
