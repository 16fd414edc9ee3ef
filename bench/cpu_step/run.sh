#!/usr/bin/env bash
# CPU proxy of the GPU step benchmark (issue 11, item 5): the same training step of a small
# ViT (bench/cpu_step/small.yaml: the vitl14 recipe at ViT-S/14, 98/42 px crops, batch 8,
# fp32) on the CPU, one thread each, Dinoflow (trainer/examples/step_bench.rs) against the
# official code (../shared/bench/official_dinov2_step.py, run by official_cpu.py), on the
# same synthetic collated crops' shapes and masks, in one run; prints both JSON lines and the
# ratio official/Dinoflow of the median step (> 1: Dinoflow is faster). A benchmark, not a test.
#
#   bench/cpu_step/run.sh                 # ROUNDS=1 STEPS=8 WARMUP=2 CLOCK=process
#   CLOCK=wall ROUNDS=2 bench/cpu_step/run.sh
#
# Needs the official source's dinov2/ package in DINOV2_REF (default .ref, git-ignored):
#   git -C <fetched facebookresearch/dinov2> archive HEAD dinov2 | tar -x -C .ref
# and omegaconf, fvcore, iopath in the venv (pip install omegaconf fvcore iopath).
# CLOCK=process (default) times CPU seconds of each process (all its threads), so a loaded
# shared machine measures work rather than the wait for a core; CLOCK=wall times wall seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
REF="${DINOV2_REF:-.ref}"
TIMER="${OFFICIAL_TIMER:-../shared/bench/official_dinov2_step.py}"
ROUNDS="${ROUNDS:-1}" STEPS="${STEPS:-8}" WARMUP="${WARMUP:-2}" CLOCK="${CLOCK:-process}"
[[ -d "$REF/dinov2" ]] || { echo "no official dinov2/ package under $REF (see this file's header)" >&2; exit 1; }
[[ -f "$TIMER" ]] || { echo "no official timer at $TIMER (set OFFICIAL_TIMER)" >&2; exit 1; }
cargo build -q -p dinoflow-trainer --example step_bench
BIN="${CARGO_TARGET_DIR:-target}/debug/examples/step_bench"
# The official timer's --opts for the values small.yaml overrides in the vitl14 preset.
OFFICIAL_OPTS=(student.arch=vit_small crops.global_crops_size=98 crops.local_crops_size=42
  dino.head_n_prototypes=16384 ibot.head_n_prototypes=16384 compute_precision.grad_scaler=false)
machine() {
  echo "machine: $(getconf _NPROCESSORS_ONLN) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for ((r = 1; r <= ROUNDS; r++)); do
  machine
  d="$(DINOFLOW_BENCH_DEVICE=cpu "$BIN" --config bench/cpu_step/small.yaml --steps "$STEPS" \
    --warmup "$WARMUP" --threads 1 --clock "$CLOCK")"
  echo "$d"
  machine
  o="$(CUDA_VISIBLE_DEVICES='' OFFICIAL_CLOCK="$CLOCK" python3 bench/cpu_step/official_cpu.py "$TIMER" \
    --ref "$REF" --config vitl14 --batch 8 --steps "$STEPS" --warmup "$WARMUP" \
    --opts "${OFFICIAL_OPTS[@]}" 2>/dev/null | tail -1)"
  echo "$o"
  machine
  python3 -c 'import json,sys; d,o=(json.loads(x) for x in sys.argv[1:3]); print(json.dumps({"round": int(sys.argv[3]), "clock": sys.argv[4], "dinoflow_step_s": d["step_s_median"], "official_step_s": o["step_s_median"], "ratio_official_over_dinoflow": round(o["step_s_median"] / d["step_s_median"], 3)}))' "$d" "$o" "$r" "$CLOCK"
done
