#!/usr/bin/env bash
# The GPU check. Without a CUDA device it says so in one line and exits with status 2, before touching anything.
#
# --quick (meant to take under 5 minutes): the CUDA parity tests of this checkout (tests/cuda: the official fixture
# on CUDA against the CPU reference, CPU-vs-CUDA agreement of a MoE model), then the eager and compiled MoE/dense
# ratios of the ViT-T-shaped layer and of ViT-T at batch 256, bf16 autocast, forward and forward+backward
# (benchmarks.throughput), for a checkout of REF (a temporary `git worktree`, default origin/main, else main: today's
# main) and for this checkout, measurement by measurement in the same run, on the same card.
#
#   bash benchmarks/gpu_check.sh --quick [--ref REF] [OUT_DIR]   # default OUT_DIR benchmarks/results/gpu_quick
#
# Full mode: every pair (the ViT-T-shaped layer, ViT-T, ViT-S, ConvNeXt-F, each MoE against its dense twin) at batch
# 256 in bf16 (autocast), eager and compiled, as MoE / dense ratios with the full train step (AdamW, fused); each
# pair and mode runs under its own time limit and prints its table as soon as it is measured, so a crash or a time-out
# in one leaves the others' results. With --profile, the top kernels and the launch count of one ViT-T train step.
# Tables and JSON go to OUT_DIR. Installs nothing but the project.
#
#   bash benchmarks/gpu_check.sh [--profile] [OUT_DIR]      # default benchmarks/results/gpu
#   INSTALL=0 DEVICE=cpu BATCH=2 PAIRS=layer MODES=eager REPEATS=1 PROFILE_MODEL=moejet_vit_test \
#       bash benchmarks/gpu_check.sh --profile /tmp/smoke    # the full mode's logic on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PROFILE=0
QUICK=0
REF=""
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) PROFILE=1; shift ;;
        --quick) QUICK=1; shift ;;
        --ref) [ $# -ge 2 ] || { echo "gpu_check: --ref needs a git ref (a branch, tag or commit)" >&2; exit 2; }
               REF=$2; shift 2 ;;
        -*) echo "gpu_check: unknown option $1 (options: --quick [--ref REF], --profile; then OUT_DIR)" >&2; exit 2 ;;
        *) break ;;
    esac
done
DEVICE=${DEVICE:-cuda}
if [ "$QUICK" = 1 ]; then DEVICE=cuda; fi
PYTHON=${PYTHON:-python}
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        2> /dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU" >&2
    exit 2
fi
if [ "$QUICK" = 1 ]; then OUT_DIR=${1:-benchmarks/results/gpu_quick}; else OUT_DIR=${1:-benchmarks/results/gpu}; fi
BATCH=${BATCH:-256}
PAIRS=${PAIRS:-layer tiny small convnext_femto}
MODES=${MODES:-eager compiled}
REPEATS=${REPEATS:-5}
LIMIT_S=${LIMIT_S:-300}
PROFILE_MODEL=${PROFILE_MODEL:-moejet_vit_tiny}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

if [ "${INSTALL:-1}" = 1 ]; then  # INSTALL=0: use the project as already importable (PYTHONPATH)
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . 2> "$OUT_DIR/pip.log" \
        || { echo "gpu_check: could not install the project (pip install --no-deps -e .), see $OUT_DIR/pip.log" >&2
             exit 1; }
fi
"$PYTHON" - "$DEVICE" <<'PY' || exit 1
import importlib.util
import sys
import torch
missing = [m for m in ('timm', 'safetensors', 'huggingface_hub') if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f'gpu_check: missing on this machine: {", ".join(missing)} (the check installs nothing but the project)')
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

if [ "$QUICK" = 1 ]; then
    if [ -z "$REF" ]; then
        if git rev-parse --verify --quiet origin/main > /dev/null; then REF=origin/main; else REF=main; fi
    fi
    REF_TREE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_ref.XXXXXX")
    trap 'git worktree remove --force "$REF_TREE" > /dev/null 2>&1; rm -rf "$REF_TREE"' EXIT
    git worktree add --detach "$REF_TREE" "$REF" > "$OUT_DIR/worktree.log" 2>&1 \
        || { echo "gpu_check: git worktree add of $REF failed, see $OUT_DIR/worktree.log" >&2; exit 1; }
    echo "gpu_check: quick, $REF ($(git -C "$REF_TREE" rev-parse --short HEAD)) against this checkout" \
         "($(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ', with uncommitted changes'))"
    phase parity "${PARITY_LIMIT_S:-120}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/cuda -k 'parity or agree'
    for pair in layer tiny; do
        for mode in eager compiled; do
            flags=()
            if [ "$mode" = compiled ]; then flags=(--compile); fi
            for side in ref new; do  # the same measurement on both checkouts, one after the other
                tree=$PWD
                if [ "$side" = ref ]; then tree=$REF_TREE; fi
                phase "$pair-$mode-$side" "${QUICK_LIMIT_S:-150}" env PYTHONPATH="$tree" bash -c 'cd "$1" && shift && \
                    exec "$@"' _ "$tree" "$PYTHON" -u -m benchmarks.throughput --device cuda --dtype bfloat16 \
                    --pairs "$pair" --batch-sizes "$BATCH" --repeats 3 --warmup 2 --min-time 0.1 --optimizers \
                    --json "$OUT_DIR/$pair-$mode-$side.json" "${flags[@]}"
            done
        done
    done
    echo "gpu_check: results in $OUT_DIR ($failed phase(s) failed or timed out)"
    [ "$failed" -eq 0 ]
    exit
fi

for pair in $PAIRS; do
    for mode in $MODES; do
        flags=()
        if [ "$mode" = compiled ]; then flags=(--compile); fi
        phase "$pair-$mode" "$LIMIT_S" "$PYTHON" -u -m benchmarks.throughput --device "$DEVICE" --dtype bfloat16 \
            --pairs "$pair" --batch-sizes "$BATCH" --repeats "$REPEATS" --warmup 2 --min-time 0.2 \
            --optimizers adamw --json "$OUT_DIR/$pair-$mode.json" "${flags[@]}"
    done
done
if [ "$PROFILE" = 1 ]; then
    for mode in $MODES; do
        flags=()
        if [ "$mode" = compiled ]; then flags=(--compile); fi
        phase "profile-$mode" "$LIMIT_S" "$PYTHON" -u -m benchmarks.profile_step --model "$PROFILE_MODEL" \
            --device "$DEVICE" --batch-size "$BATCH" "${flags[@]}"
    done
fi
echo "gpu_check: results in $OUT_DIR ($failed phase(s) failed or timed out)"
[ "$failed" -eq 0 ]
