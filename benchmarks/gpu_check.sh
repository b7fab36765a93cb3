#!/usr/bin/env bash
# The CUDA check: the throughput pairs at batch 256 in bf16 (autocast), eager and then compiled, on one GPU, as
# MoE / dense ratios with the full train step (AdamW, fused); JSON and the printed tables go to OUT_DIR.
# Installs nothing beyond the project (torch, timm and the rest must already be on the machine). About 6 minutes
# on one H200; each phase has its own time limit so the whole stays under 8.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default benchmarks/results/gpu
#   DEVICE=cpu BATCH=4 PAIRS=layer REPEATS=1 EAGER_S=600 COMPILED_S=900 bash benchmarks/gpu_check.sh /tmp/smoke
#                                                   # the script's logic on a CPU (slower: longer limits)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
PAIRS=${PAIRS:-layer layer_softmax tiny}
REPEATS=${REPEATS:-5}
EAGER_S=${EAGER_S:-150}
COMPILED_S=${COMPILED_S:-270}
mkdir -p "$OUT_DIR"

python -m pip install --quiet --no-deps --no-build-isolation -e . 2> "$OUT_DIR/pip.log" \
    || { echo "gpu_check: could not install the project (pip install --no-deps -e .), see $OUT_DIR/pip.log" >&2; exit 1; }
python - "$DEVICE" <<'PY'
import sys
import torch
missing = [m for m in ('timm', 'safetensors', 'huggingface_hub', 'tqdm') if __import__('importlib').util.find_spec(m) is None]
if missing:
    sys.exit(f'gpu_check: missing on this machine: {", ".join(missing)} (the check installs nothing but the project)')
if sys.argv[1] == 'cuda' and not torch.cuda.is_available():
    sys.exit('gpu_check: torch.cuda.is_available() is False')
name = torch.cuda.get_device_name(0) if sys.argv[1] == 'cuda' else 'cpu'
print(f'gpu_check: torch {torch.__version__}, device {name}', flush=True)
PY

run() {  # run PHASE LIMIT_S [extra flags]: one throughput run, its tables into OUT_DIR/PHASE.txt, JSON beside
    local phase=$1 limit=$2; shift 2
    echo "gpu_check: $phase (limit ${limit}s)"
    # shellcheck disable=SC2086
    timeout "$limit" python -m benchmarks.throughput --device "$DEVICE" --dtype bfloat16 --pairs $PAIRS \
        --batch-sizes "$BATCH" --repeats "$REPEATS" --warmup 2 --min-time 0.2 --optimizers adamw \
        --json "$OUT_DIR/$phase.json" "$@" | tee "$OUT_DIR/$phase.txt" \
        || echo "gpu_check: $phase did not finish within ${limit}s or failed (status ${PIPESTATUS[0]})" >&2
}
run eager "$EAGER_S"
run compiled "$COMPILED_S" --compile
echo "gpu_check: results in $OUT_DIR"
