#!/usr/bin/env bash
# Issue #7's GPU figures, on a machine with one CUDA device: core vs diffusers on the SD1.5 architecture
# (random weights) at 512², 50 steps x 0.75, batch 1 and 8, each run timing diffusers beside ours
# (interleaved). Default runs: bf16 eager, bf16 with our UNet compiled, the same with our weights
# channels-last, fp16 eager; or give each run's core_vs_diffusers options as one argument.
#   bash bench/gpu.sh [seconds per run (default 240)] ["--dtype bfloat16 --repeats 5" ...]
# With $OUT set, results are copied there after each run. diffusers is a test-only dependency: where it
# is not installed, wheels in .whl/ are put on the path.
set -u
limit=${1:-240}
shift || true
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
    runs=("--dtype bfloat16" "--dtype bfloat16 --compile default"
          "--dtype bfloat16 --compile default --channels-last on" "--dtype float16")
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ! python3 -c "import diffusers" 2>/dev/null && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
python3 -c "from bench.core_vs_diffusers import model_folder; model_folder(False)" || exit 1
for options in "${runs[@]}"; do
    # shellcheck disable=SC2086  # each run's options are meant to split into words
    timeout "$limit" python3 -m bench.core_vs_diffusers --device cuda $options
    echo "== exit $? for: $options"
    if [ -n "${OUT:-}" ]; then cp bench/results/core_vs_diffusers_cuda_*.json "$OUT"/ 2>/dev/null; fi
done
