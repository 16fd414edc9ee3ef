#!/usr/bin/env bash
# GPU check, prepared for a machine with CUDA GPUs (issue 10, item 6); never run yet: no GPU has
# been available to this project. One command, about 5 minutes of which most is the build:
#   bench/gpu/check.sh            # W=1, then W=<number of GPUs> when there are several
#   DRY_RUN=1 bench/gpu/check.sh  # CPU machines: prints the plan, builds nothing
# Checks: (1) CUDA is visible to the trainer (libtorch's view, and nvidia-smi's);
# (2) NCCL all-reduce / reduce-scatter / all-gather / broadcast of CUDA tensors, exact values,
#     in fp32, bf16 and int64, at W=1 and at W=GPUs (one process per GPU), plus the time of a
#     64 MiB fp32 all-reduce (trainer/examples/gpu_check.rs);
# (3) TODO(helper "shard", issue 10 item 2): one SHARD_GRAD_OP training step of ViT-S/14 on
#     CUDA. Sharding is not merged on this branch; add the step here once it is.
# The training-step benchmark against the official code is bench/gpu/step.sh (issue 11).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
PORT="${PORT:-29611}"
BIN="${CARGO_TARGET_DIR:-target}/debug/examples/gpu_check"
plan() {
  echo "GPUs seen by nvidia-smi: ${GPUS}"
  echo "libnccl.so on LD_LIBRARY_PATH: $(for d in ${LD_LIBRARY_PATH//:/ }; do [[ -e $d/libnccl.so ]] && echo "$d/libnccl.so"; done | head -1)"
  echo "1. cargo build -p dinoflow-trainer --example gpu_check"
  echo "2. W=1: RANK=0 WORLD_SIZE=1 $BIN"
  [[ "${GPUS}" -gt 1 ]] && echo "3. W=${GPUS}: one $BIN per GPU, MASTER_PORT=$((PORT + 1))"
  echo "TODO (helper shard): one SHARD_GRAD_OP step of ViT-S/14 on CUDA"
}
if [[ -n "${DRY_RUN:-}" ]]; then plan; exit 0; fi
[[ "${GPUS}" -ge 1 ]] || { echo "no GPU visible to nvidia-smi" >&2; exit 1; }
plan
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
cargo build -q -p dinoflow-trainer --example gpu_check
run_world() {
  local world="$1" port="$2" pids=() rc=0
  for ((r = 0; r < world; r++)); do
    RANK=$r WORLD_SIZE=$world MASTER_ADDR=127.0.0.1 MASTER_PORT=$port NCCL_DEBUG="${NCCL_DEBUG:-WARN}" \
      timeout 600 "$BIN" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return "$rc"
}
echo "== W=1 (NCCL on one GPU)"
run_world 1 "$PORT"
if [[ "${GPUS}" -gt 1 ]]; then
  echo "== W=${GPUS} (one process per GPU)"
  run_world "$GPUS" "$((PORT + 1))"
fi
echo "GPU check passed (SHARD_GRAD_OP step: TODO, see the header)"
