#!/usr/bin/env bash
# All-reduce of 64 MiB fp32 at W=2,4,8 on loopback: the TCP ring against the star it replaced,
# in the same run. Prints a markdown table (busiest rank's bytes sent vs 2·N·(W−1)/W, times).
#   bench/collectives/run.sh                       # defaults: W=2,4,8, 64 MiB, 3 timed reps
#   WORLDS=2,4 MIB=16 REPS=5 bench/collectives/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
WORLDS="${WORLDS:-2,4,8}"; MIB="${MIB:-64}"; REPS="${REPS:-3}"
# The dev profile (the trainer crate at opt-level 1, libtorch and dependencies at 2) reuses the
# build the tests made; a release build of the trainer costs many minutes on 2 cores.
cargo build -q -p dinoflow-trainer --example collectives_bench
BIN="${CARGO_TARGET_DIR:-target}/debug/examples/collectives_bench"
echo "# $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
"$BIN" --worlds "$WORLDS" --mib "$MIB" --reps "$REPS"
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
