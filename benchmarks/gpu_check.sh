#!/usr/bin/env bash
# The first run on a CUDA GPU: flash-attn/sdpa/eager agreement, bf16 training, static-cache compiled generation, one
# FSDP2 step, training tokens/s + MFU against Transformers' Llama, continuous batching (generate_batch = generate(),
# CUDA graphs on and off) and the Hub kernels from_pretrained applied (acx_ramanujan/bench/gpu_check.py says what
# each is).
# Run from anywhere: `bash benchmarks/gpu_check.sh`; results print as JSON and go to $OUT/gpu_check.json (or ./).
# On a machine without a package registry, put the wheels it lacks (e.g. the newest transformers) in .whl/ first.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/acx-site .whl/*.whl
  export PYTHONPATH="/tmp/acx-site:${PYTHONPATH:-}"
elif ! python3 -c "import acx_ramanujan" 2> /dev/null; then
  python3 -m pip install -q -e ".[flash]" || python3 -m pip install -q -e .
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python3 -c "import flash_attn" 2> /dev/null || echo "gpu_check: flash-attn is not installed (PyPI ships only its sources;" \
  "'pip install flash-attn' compiles them), so flash_attention_2 is not compared" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 540 python3 -m acx_ramanujan.bench.gpu_check --device cuda --output "${OUT:-.}/gpu_check.json"
