#!/usr/bin/env bash
# GPU check (issue 10, item 6), prepared for the device machine; never run on a GPU yet (no
# GPU has been lent to this project). Builds nothing there: trainer/examples/gpu_check.rs is
# built here and carried; libtorch and NCCL are the device's torch install.
#
# Here, before the device call:
#   bench/gpu/check.sh prepare    # builds gpu_check, strips it into .gpu/ (git-ignored)
# On the device machine (run tool, carry [".gpu"]):
#   bench/gpu/check.sh            # the three checks below, a few minutes
# Dry run on a CPU (proves the script and check 3's logic: CPU tensors, TCP ring):
#   DRY_RUN=1 bench/gpu/check.sh  # SHARD_STEP_CONFIG=bench/gpu/tiny.yaml (sharded by default)
#
# Checks (each process prints its lines; any failure exits non-zero):
# 1. CUDA is visible to the trainer (libtorch's view, through trainer/src/cuda_backend.rs)
#    and to nvidia-smi;
# 2. NCCL all-reduce / reduce-scatter / all-gather / broadcast of CUDA tensors, exact values,
#    in fp32, bf16 and int64, at W=1 and at W=<GPUs> when there are several, plus the time of a
#    64 MiB fp32 all-reduce;
# 3. three SHARD_GRAD_OP training steps of ViT-S/14 (bench/gpu/vits14-shard.yaml: the official
#    mixed precision) on CUDA at W=max(2, GPUs): finite losses, each rank holding ≤ 1/W + 5%
#    of the replicated gradient + AdamW bytes, bitwise-equal students after. On one GPU the two
#    ranks share it over the TCP ring (NCCL refuses two ranks on one device).
# The training-step benchmark against the official code is bench/gpu/step.sh (issue 11).
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT="${PORT:-29611}"

if [[ "${1:-}" == "prepare" ]]; then
  # shellcheck source=scripts/env.sh
  source scripts/env.sh
  cargo build -q -p dinoflow-trainer --example gpu_check
  mkdir -p .gpu
  strip -o .gpu/gpu_check "${CARGO_TARGET_DIR:-target}/debug/examples/gpu_check"
  du -sh .gpu/gpu_check
  echo "carry: .gpu"
  exit 0
fi

DRY="${DRY_RUN:-}"
LIBS="$(mktemp -d)"
trap 'rm -rf "$LIBS"' EXIT
if [[ -n "$DRY" ]]; then
  # shellcheck source=scripts/env.sh
  source scripts/env.sh
  BIN="${GPU_CHECK_BIN:-${CARGO_TARGET_DIR:-target}/debug/examples/gpu_check}"
  [[ -x "$BIN" ]] || cargo build -q -p dinoflow-trainer --example gpu_check
  export GPU_CHECK_DEVICE=cpu
  SHARD_STEP_CONFIG="${SHARD_STEP_CONFIG:-bench/gpu/tiny.yaml}"
  GPUS=0
else
  BIN="${GPU_CHECK_BIN:-$PWD/.gpu/gpu_check}"
  PY="${PYTHON:-python3}"
  # The device's torch wheel: libtorch (libtorch_cuda.so is opened by the binary at start-up)
  # and NCCL, whose wheel ships only libnccl.so.2 while cudarc opens libnccl.so.
  TORCH_LIB="$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib"
  NCCL_LIB="$("$PY" -c 'import nvidia.nccl as n;print(list(n.__path__)[0])' 2>/dev/null)/lib" || true
  for lib in "$NCCL_LIB/libnccl.so.2" "$TORCH_LIB/libnccl.so.2"; do
    [[ -e "$lib" ]] && { ln -sf "$lib" "$LIBS/libnccl.so"; break; }
  done
  export LD_LIBRARY_PATH="$LIBS:$TORCH_LIB${NCCL_LIB:+:$NCCL_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  SHARD_STEP_CONFIG="${SHARD_STEP_CONFIG:-bench/gpu/vits14-shard.yaml}"
  GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [[ "$GPUS" -ge 1 ]] || { echo "no GPU visible to nvidia-smi" >&2; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "libnccl.so: $(readlink "$LIBS/libnccl.so" || echo 'not found (check 2 will say so)')"
fi
[[ -x "$BIN" ]] || { echo "no gpu_check binary at $BIN (run: bench/gpu/check.sh prepare)" >&2; exit 1; }
export SHARD_STEP_CONFIG

# run_world MODE W PORT: W processes of the binary, one per rank; fails if any rank fails.
run_world() {
  local mode="$1" world="$2" port="$3" pids=() rc=0
  echo "== $mode, W=$world"
  for ((r = 0; r < world; r++)); do
    GPU_CHECK="$mode" RANK=$r WORLD_SIZE=$world MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      NCCL_DEBUG="${NCCL_DEBUG:-WARN}" timeout 600 "$BIN" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return "$rc"
}

status=0
if [[ -z "$DRY" ]]; then
  run_world collectives 1 "$PORT" || status=1
  if [[ "$GPUS" -gt 1 ]]; then run_world collectives "$GPUS" "$((PORT + 1))" || status=1; fi
fi
SHARD_W=$((GPUS > 2 ? GPUS : 2))
run_world shard-step "$SHARD_W" "$((PORT + 2))" || status=1
if [[ $status -eq 0 ]]; then echo "GPU check passed"; else echo "GPU check FAILED" >&2; fi
exit "$status"
