#!/usr/bin/env bash
# GPU step benchmark (issue 11, item 4), prepared for the device machine; never run on a GPU
# yet (no GPU has been lent to this project). Builds nothing there: the Dinoflow side is
# trainer/examples/step_bench.rs built here and carried, libtorch is the device's torch
# install. In one call it times Dinoflow's training step for the vitl14 recipe (batch 32)
# and vitg14 (batch 12) on synthetic collated crops, then the official code
# (../shared/bench/official_dinov2_step.py through bench/official/official_gpu.py) on the same
# GPU, and prints one JSON line per run (median step, images/s, peak memory, MFU, first/last
# losses) and a summary line per recipe.
#
# Here, before the device call (this machine; nothing of it needs a GPU):
#   bench/gpu/step.sh prepare     # builds step_bench, copies it (stripped) into .gpu/, puts
#                                 # the official dinov2/ package in .ref/ and its pure-Python
#                                 # dependencies' wheels in .whl/ (all git-ignored)
# On the device machine (run tool, carry [".gpu", ".ref", ".whl"]):
#   bench/gpu/step.sh             # STEPS=20 WARMUP=5 RECIPES="vitl14:32 vitg14:12"
# Dry run on a CPU (proves the script; a tiny model, a few steps, CPU instead of CUDA):
#   DRY_RUN=1 bench/gpu/step.sh   # SHRINK=1 is implied: bench/gpu/tiny.yaml on both sides
# bench/gpu/check.sh (NCCL) is the other device script; both use the device's torch libs.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
TIMER="${OFFICIAL_TIMER:-../shared/bench/official_dinov2_step.py}"

if [[ "${1:-}" == "prepare" ]]; then
  # shellcheck source=scripts/env.sh
  source scripts/env.sh
  cargo build -q -p dinoflow-trainer --example step_bench
  mkdir -p .gpu
  strip -o .gpu/step_bench "${CARGO_TARGET_DIR:-target}/debug/examples/step_bench"
  cp "$TIMER" .gpu/official_dinov2_step.py
  if [[ ! -d .ref/dinov2 ]]; then
    echo "put the official dinov2/ package in .ref first:" >&2
    echo "  git -C <fetched facebookresearch/dinov2 git dir> archive HEAD dinov2 | tar -x -C .ref" >&2
    exit 1
  fi
  mkdir -p .whl
  # The list of ../shared/bench/README.md (xformers left out: bench/official/xformers_stub.py);
  # omegaconf 2.3 is the release that pairs with antlr 4.9.3; setuptools and wheel let pip build
  # the sdists among them (fvcore, iopath, antlr) offline.
  python3 -m pip download -q --no-deps -d .whl omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 fvcore \
    iopath yacs termcolor tabulate portalocker tqdm setuptools wheel packaging
  du -sh .gpu .ref .whl
  echo "carry: .gpu .ref .whl (64 MiB at most in all)"
  exit 0
fi

DRY="${DRY_RUN:-}"
if [[ -n "$DRY" ]]; then
  SHRINK=1
  # shellcheck source=scripts/env.sh
  source scripts/env.sh
  BIN="${STEP_BENCH:-${CARGO_TARGET_DIR:-target}/debug/examples/step_bench}"
  [[ -x "$BIN" ]] || cargo build -q -p dinoflow-trainer --example step_bench
  PY="${PYTHON:-python3}"
else
  BIN="${STEP_BENCH:-$ROOT/.gpu/step_bench}"
  TIMER="${OFFICIAL_TIMER:-$ROOT/.gpu/official_dinov2_step.py}"
  PY="${PYTHON:-python3}"
  TORCH_LIB="$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib"
  export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # libtorch_cuda.so is found here: the binary opens it at start-up (trainer/src/cuda_backend.rs).
  # The official code's pure-Python dependencies, from the carried wheels (nothing outside).
  # Not fatal: without them the official lines report the import error, Dinoflow's still run.
  if ! "$PY" -c 'import omegaconf, fvcore, iopath' 2>/dev/null; then
    # --no-deps: resolution would fail offline on anything the device has at another version;
    # numpy and PyYAML are taken from the device (the official code needs them anyway).
    "$PY" -m pip install -q --no-index --no-deps --find-links .whl omegaconf antlr4-python3-runtime \
      fvcore iopath yacs termcolor tabulate portalocker tqdm ||
      echo "step.sh: installing the official code's dependencies from .whl failed" >&2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
[[ -x "$BIN" ]] || { echo "no step_bench binary at $BIN (run: bench/gpu/step.sh prepare)" >&2; exit 1; }
[[ -d .ref/dinov2 ]] || { echo "no official dinov2/ package in .ref (bench/gpu/step.sh prepare)" >&2; exit 1; }
STEPS="${STEPS:-20}" WARMUP="${WARMUP:-5}"
RECIPES="${RECIPES:-vitl14:32 vitg14:12}"
# H100/H200 SXM dense bf16/fp16 tensor-core peak, for MFU (override for other devices).
export DINOFLOW_PEAK_FLOPS="${DINOFLOW_PEAK_FLOPS:-989e12}"
if [[ -n "${SHRINK:-}" ]]; then
  STEPS="${STEPS_DRY:-2}" WARMUP="${WARMUP_DRY:-1}"
  RECIPES="tiny:2"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The Dinoflow config of a recipe: its preset at that batch; SHRINK: bench/gpu/tiny.yaml.
dinoflow_config() {
  local preset="$1" batch="$2" out="$WORK/$1-$2.yaml"
  if [[ "$preset" == tiny ]]; then
    cp bench/gpu/tiny.yaml "$out"
  else
    printf 'training:\n  preset: %s\n  data: {path: /unused-synthetic-crops}\n  train: {batchSizePerGpu: %s}\n' "$preset" "$batch" >"$out"
  fi
  echo "$out"
}
# The official timer's arguments for the same recipe (tiny: the overrides tiny.yaml makes).
official_args() {
  local preset="$1" batch="$2"
  if [[ "$preset" == tiny ]]; then
    echo "--config vitl14 --batch $batch --opts student.arch=vit_small crops.global_crops_size=56 crops.local_crops_size=28 crops.local_crops_number=2 dino.head_n_prototypes=256 ibot.head_n_prototypes=256 dino.head_bottleneck_dim=64 dino.head_hidden_dim=128 ibot.head_bottleneck_dim=64 ibot.head_hidden_dim=128 compute_precision.grad_scaler=false"
  else
    echo "--config $preset --batch $batch"
  fi
}

status=0
for r in $RECIPES; do
  preset="${r%%:*}" batch="${r##*:}"
  cfg="$(dinoflow_config "$preset" "$batch")"
  dev=() threads=()
  # Dry run: the CPU, one thread, as official_cpu.py runs the official side.
  [[ -n "$DRY" ]] && dev=(env DINOFLOW_BENCH_DEVICE=cpu) threads=(--threads 1)
  d="$("${dev[@]}" "$BIN" --config "$cfg" --steps "$STEPS" --warmup "$WARMUP" "${threads[@]}" 2>"$WORK/d.err" | tail -1)" || {
    echo "{\"impl\": \"dinoflow\", \"recipe\": \"$preset\", \"error\": $(tail -c 2000 "$WORK/d.err" | "$PY" -c 'import json,sys;print(json.dumps(sys.stdin.read()))')}"
    status=1
    d=""
  }
  [[ -n "$d" ]] && echo "$d"
  # shellcheck disable=SC2046
  if [[ -n "$DRY" ]]; then
    o="$(CUDA_VISIBLE_DEVICES='' "$PY" bench/cpu_step/official_cpu.py "$TIMER" --ref .ref --steps "$STEPS" \
      --warmup "$WARMUP" $(official_args "$preset" "$batch") 2>"$WORK/o.err" | tail -1)" || o=""
  else
    o="$("$PY" bench/official/official_gpu.py "$TIMER" --ref .ref --steps "$STEPS" --warmup "$WARMUP" \
      $(official_args "$preset" "$batch") 2>"$WORK/o.err" | tail -1)" || o=""
  fi
  if [[ -z "$o" ]]; then
    echo "{\"impl\": \"official-dinov2\", \"recipe\": \"$preset\", \"error\": $(tail -c 2000 "$WORK/o.err" | "$PY" -c 'import json,sys;print(json.dumps(sys.stdin.read()))')}"
    status=1
  else
    echo "$o"
  fi
  if [[ -n "$d" && -n "$o" ]]; then
    "$PY" - "$d" "$o" "$preset" <<'PY'
import json, sys
d, o = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({
    "recipe": sys.argv[3], "batch": d["batch_per_gpu"],
    "speedup_images_per_s": round(d["images_per_s"] / o["images_per_s"], 3),
    "target_speedup": 1.5,
    "peak_mem_GiB": {"dinoflow": d["peak_mem_GiB"], "official": o["peak_mem_GiB"]},
    "mfu_dinoflow": d.get("mfu"),
    "loss_first": {"dinoflow": d["loss_first"], "official": o["loss_first"]},
}))
PY
  fi
done
exit "$status"
