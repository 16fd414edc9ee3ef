#!/usr/bin/env bash
# The whole test suite, from a fresh machine or a warm one (README's test command; .ci/run):
#   scripts/test.sh            setup, format and script checks, cargo test --workspace
#   DINOFLOW_LINT=1 scripts/test.sh   also clippy -D warnings (a second, check-mode build)
# Ends with one line `summary: N passed, N failed, N skipped` over all test binaries, and
# exits non-zero when anything failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[test] %s\n' "$*"; }

start=$SECONDS
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
log "setup: $((SECONDS - start)) s"

# env.sh gives every clone one target directory, and cargo takes a crate built from another
# clone's path as fresh when this clone's files are older than that build: its tests then read
# files under the other clone's CARGO_MANIFEST_DIR, which may be gone (a CI clone, deleted).
# A clone that did not build last here has its sources touched: cargo rebuilds the workspace's
# crates from this path, as it does for a fresh clone.
built_from="$CARGO_TARGET_DIR/.dinoflow-built-from"
if [[ "$(cat "$built_from" 2>/dev/null)" != "$ROOT" ]]; then
  log "$CARGO_TARGET_DIR was last built from another clone: rebuilding the workspace's crates"
  find "$ROOT" \( -name .git -o -name target -o -name out \) -prune -o -name '*.rs' -type f \
    -exec touch {} +
  mkdir -p "$CARGO_TARGET_DIR"
  printf '%s\n' "$ROOT" >"$built_from"
fi

status=0
phase=$SECONDS
if ! cargo fmt --all -- --check; then
  log "cargo fmt --check: code is not rustfmt clean (run cargo fmt --all)"
  status=1
fi
if command -v shellcheck >/dev/null; then
  if ! shellcheck -x scripts/*.sh .ci/run bench/*.sh bench/*/*.sh; then
    log "shellcheck found problems in scripts/ or bench/"
    status=1
  fi
fi
if [[ "${DINOFLOW_LINT:-0}" == 1 ]] && ! cargo clippy --workspace --all-targets -- -D warnings; then
  status=1
fi
log "format and lint: $((SECONDS - phase)) s"

phase=$SECONDS
log_file="$(mktemp "${TMPDIR:-/tmp}/dinoflow-test.XXXXXX")"
# --no-fail-fast: one failing binary must not hide the results of the others.
if ! cargo test --workspace --no-fail-fast 2>&1 | tee "$log_file"; then
  status=1
fi
log "cargo test: $((SECONDS - phase)) s (total $((SECONDS - start)) s)"

# One line over all binaries: cargo prints a `test result:` line per test binary.
read -r passed failed ignored < <(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/) p += $(i - 1)
      if ($(i) ~ /^failed;?$/) f += $(i - 1)
      if ($(i) ~ /^ignored;?$/) s += $(i - 1)
    }
  }
  END { print p + 0, f + 0, s + 0 }' "$log_file")
rm -f "$log_file"
if [[ $status -ne 0 && $failed -eq 0 ]]; then
  # A build or lint failure runs no test; count it so the summary never reads as green.
  failed=1
fi
echo "summary: $passed passed, $failed failed, $ignored skipped"
exit "$status"
