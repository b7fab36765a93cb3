#!/usr/bin/env bash
# The GPU check: every pair (the ViT-T-shaped layer, ViT-T, ViT-S, ConvNeXt-F, each MoE against its dense twin) at
# batch 256 in bf16 (autocast), eager and compiled, as MoE / dense ratios with the full train step (AdamW, fused).
# Each pair and mode runs under its own time limit and prints its table as soon as it is measured, so a crash or a
# time-out in one leaves the others' results. Then the op counts of one layer and, with --profile, the top kernels
# and the launch count of one ViT-T train step. Tables and JSON go to OUT_DIR. Installs nothing but the project.
#
#   bash benchmarks/gpu_check.sh [--profile] [OUT_DIR]      # default benchmarks/results/gpu
#   INSTALL=0 DEVICE=cpu BATCH=2 PAIRS=layer MODES=eager REPEATS=1 PROFILE_MODEL=moejet_vit_test \
#       bash benchmarks/gpu_check.sh --profile /tmp/smoke    # the script's logic on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PROFILE=0
if [ "${1:-}" = "--profile" ]; then PROFILE=1; shift; fi
OUT_DIR=${1:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
PAIRS=${PAIRS:-layer tiny small convnext_femto}
MODES=${MODES:-eager compiled}
REPEATS=${REPEATS:-5}
LIMIT_S=${LIMIT_S:-300}
PROFILE_MODEL=${PROFILE_MODEL:-moejet_vit_tiny}
mkdir -p "$OUT_DIR"

if [ "${INSTALL:-1}" = 1 ]; then  # INSTALL=0: use the project as already importable (PYTHONPATH)
    python -m pip install --quiet --no-deps --no-build-isolation -e . 2> "$OUT_DIR/pip.log" \
        || { echo "gpu_check: could not install the project (pip install --no-deps -e .), see $OUT_DIR/pip.log" >&2
             exit 1; }
fi
python - "$DEVICE" <<'PY' || exit 1
import importlib.util
import sys
import torch
missing = [m for m in ('timm', 'safetensors', 'huggingface_hub') if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f'gpu_check: missing on this machine: {", ".join(missing)} (the check installs nothing but the project)')
if sys.argv[1] == 'cuda' and not torch.cuda.is_available():
    sys.exit('gpu_check: torch.cuda.is_available() is False')
name = torch.cuda.get_device_name(0) if sys.argv[1] == 'cuda' else 'cpu'
print(f'gpu_check: torch {torch.__version__}, device {name}', flush=True)
PY

failed=0
phase() {  # phase NAME LIMIT_S COMMAND...: one measurement under its own limit; its output printed as it comes
    local name=$1 limit=$2; shift 2
    echo "gpu_check: $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        echo "gpu_check: $name did not finish within ${limit}s or failed (status $status); going on" >&2
        failed=$((failed + 1))
    fi
}

for pair in $PAIRS; do
    for mode in $MODES; do
        flags=()
        if [ "$mode" = compiled ]; then flags=(--compile); fi
        phase "$pair-$mode" "$LIMIT_S" python -u -m benchmarks.throughput --device "$DEVICE" --dtype bfloat16 \
            --pairs "$pair" --batch-sizes "$BATCH" --repeats "$REPEATS" --warmup 2 --min-time 0.2 \
            --optimizers adamw --json "$OUT_DIR/$pair-$mode.json" "${flags[@]}"
    done
done
phase op-count "$LIMIT_S" python -u -m benchmarks.op_count --device "$DEVICE" --dtype bfloat16
if [ "$PROFILE" = 1 ]; then
    for mode in $MODES; do
        flags=()
        if [ "$mode" = compiled ]; then flags=(--compile); fi
        phase "profile-$mode" "$LIMIT_S" python -u -m benchmarks.profile_step --model "$PROFILE_MODEL" \
            --device "$DEVICE" --batch-size "$BATCH" "${flags[@]}"
    done
fi
echo "gpu_check: results in $OUT_DIR ($failed phase(s) failed or timed out)"
[ "$failed" -eq 0 ]
