#!/usr/bin/env bash
# Scale benchmark of dinoflow-operator on the local control plane (issue 5):
# JOBS PretrainJobs × NODES nodes applied at once; reports the time until every pod exists,
# reconcile latency p50/p99 (from the operator's histogram), reconciles and API writes per
# job, and the operator's peak RSS, each against its target.
#
#   bench/operator_scale.sh [JOBS=200] [NODES=4]
#
# Targets: all pods within 30 s, p99 reconcile < 200 ms, peak RSS < 100 MiB. A missed target
# is reported (MISS) and does not change the exit status; only a harness failure (the cluster,
# the build or the operator not coming up, metrics unreadable) exits non-zero.
# Needs the control-plane binaries (scripts/setup.sh) and builds the operator in release mode.
# The operator reads its settings from the environment (DINOFLOW_MAX_CONCURRENT_RECONCILES...).
# DINOFLOW_BENCH_KEEP=1 keeps the work directory (operator log, apiserver metrics) afterwards;
# DINOFLOW_BENCH_BIN_DIR=DIR uses release binaries built earlier (the shared target directory is
# rebuilt by other worktrees, so a copy keeps repeated runs from recompiling).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${1:-200}"
NODES="${2:-4}"
[[ "$JOBS" =~ ^[1-9][0-9]*$ && "$NODES" =~ ^[1-9][0-9]*$ ]] || {
  echo "usage: $0 [JOBS>=1] [NODES>=1]" >&2
  exit 2
}
TARGET_ALL_PODS_S=30
TARGET_P99_S=0.2
TARGET_RSS_MIB=100
# Give up waiting for the pods after this long (the target is missed long before).
POD_WAIT_LIMIT_S="${DINOFLOW_BENCH_POD_WAIT_S:-300}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dinoflow-bench-XXXXXX")"
NS=bench
log() { printf '[bench] %s\n' "$*" >&2; }
die() {
  printf '[bench] harness failure: %s\n' "$*" >&2
  exit 1
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [[ -n "${OP_PID:-}" ]]; then
    kill "$OP_PID" 2>/dev/null || true
    wait "$OP_PID" 2>/dev/null || true
  fi
  "$ROOT/scripts/cluster.sh" down --dir "$WORK/cluster" >/dev/null 2>&1 || true
  if [[ "${DINOFLOW_BENCH_KEEP:-0}" == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# A free local port for the operator's probe server (any state in /proc/net/tcp counts as taken).
free_port() {
  local port
  for _ in $(seq 200); do
    port=$((40000 + RANDOM % 10000))
    awk -v p="$(printf ':%04X' "$port")" 'substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
      /proc/net/tcp /proc/net/tcp6 2>/dev/null || { echo "$port"; return 0; }
  done
  die "no free port for the operator's probe server"
}

now() { date +%s.%N; }
elapsed() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.2f", e - s }'; }

# shellcheck source=/dev/null # scripts/env.sh, linted on its own
source "$ROOT/scripts/env.sh"
if [[ -n "${DINOFLOW_BENCH_BIN_DIR:-}" ]]; then
  BIN="$DINOFLOW_BENCH_BIN_DIR"
  log "using the prebuilt dinoflow-operator and crdgen in $BIN"
else
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
  log "building dinoflow-operator and crdgen (release)"
  cargo build --release -q -p dinoflow-operator -p dinoflow-api --bins --manifest-path "$ROOT/Cargo.toml" ||
    die "release build failed"
fi
[[ -x "$BIN/dinoflow-operator" && -x "$BIN/crdgen" ]] || die "no dinoflow-operator and crdgen in $BIN"
# One retry: on this busy machine a component now and then exits during start-up.
CLUSTER_ENV="$("$ROOT/scripts/cluster.sh" up --dir "$WORK/cluster" --owner-pid $$)" || {
  log "the control plane did not start; retrying once"
  "$ROOT/scripts/cluster.sh" down --dir "$WORK/cluster" >/dev/null 2>&1 || true
  rm -rf "$WORK/cluster"
  CLUSTER_ENV="$("$ROOT/scripts/cluster.sh" up --dir "$WORK/cluster" --owner-pid $$)"
} || die "the control plane did not start"
eval "$CLUSTER_ENV"
"$BIN/crdgen" >"$WORK/crds.yaml"
"$ROOT/scripts/cluster.sh" install-crds --dir "$WORK/cluster" "$WORK/crds.yaml"
kubectl create namespace "$NS" >/dev/null

HEALTH_PORT="${DINOFLOW_BENCH_HEALTH_PORT:-$(free_port)}"
head -c 32 /dev/urandom >"$WORK/key"
"$BIN/dinoflow-operator" --progress-key-file "$WORK/key" \
  --health-addr "127.0.0.1:$HEALTH_PORT" --progress-addr 127.0.0.1:0 --log-format json \
  >"$WORK/operator.log" 2>&1 &
OP_PID=$!
for _ in $(seq 300); do
  curl -fs "127.0.0.1:$HEALTH_PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$OP_PID" 2>/dev/null || { tail -20 "$WORK/operator.log" >&2; die "the operator exited at start-up"; }
  sleep 0.2
done
curl -fs "127.0.0.1:$HEALTH_PORT/readyz" >/dev/null || die "the operator was not ready within 60 s"

# The jobs go out through APPLIERS kubectl processes at once: one kubectl applies its objects
# one after another (about 7 a second here), which would spread the burst over half a minute.
APPLIERS="${DINOFLOW_BENCH_APPLIERS:-8}"
for i in $(seq "$JOBS"); do
  cat <<YAML >>"$WORK/jobs-$((i % APPLIERS)).yaml"
---
apiVersion: dinoflow.dev/v1alpha1
kind: PretrainJob
metadata: {name: job-$i, namespace: $NS}
spec:
  training: {data: {path: /data/train}}
  cluster: {nodes: $NODES, gpusPerNode: 0}
YAML
done

# Pods in the namespace, cheaply: a one-item page plus the server's count of the rest, so
# polling does not make the API server serialise every pod twice a second. Only the
# operator creates pods in this namespace.
pod_count() {
  kubectl get --raw "/api/v1/namespaces/$NS/pods?limit=1" 2>/dev/null |
    python3 -c 'import json, sys
d = json.load(sys.stdin)
print(len(d["items"]) + (d["metadata"].get("remainingItemCount") or 0))'
}
metrics() { curl -fs "127.0.0.1:$HEALTH_PORT/metrics" || die "cannot read the operator's /metrics"; }
metric_sum() { # NAME [LABEL-FILTER]: sum of the samples of NAME whose labels contain the filter
  awk -v n="$1" -v f="${2:-}" 'index($0, n) == 1 && (substr($0, length(n) + 1, 1) == "{" || substr($0, length(n) + 1, 1) == " ") && index($0, f) { s += $NF } END { printf "%d", s }'
}

WANT=$((JOBS * NODES))
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "applying $JOBS jobs × $NODES nodes = $WANT pods (load average $LOAD_BEFORE)"
START=$(now)
APPLY_PIDS=()
for f in "$WORK"/jobs-*.yaml; do
  kubectl apply --server-side -f "$f" >/dev/null &
  APPLY_PIDS+=($!)
done
for pid in "${APPLY_PIDS[@]}"; do wait "$pid" || die "kubectl apply of the jobs failed"; done
APPLIED=$(now)
HAVE=0
while :; do
  HAVE=$(pod_count || echo "$HAVE")
  [[ "$HAVE" -ge "$WANT" ]] && break
  kill -0 "$OP_PID" 2>/dev/null || { tail -20 "$WORK/operator.log" >&2; die "the operator exited"; }
  if awk -v s="$START" -v n="$(now)" -v l="$POD_WAIT_LIMIT_S" 'BEGIN { exit !(n - s > l) }'; then
    log "gave up: $HAVE/$WANT pods after $POD_WAIT_LIMIT_S s"
    break
  fi
  sleep 0.25
done
END=$(now)
LOAD_AT_END="$(cut -d' ' -f1-3 /proc/loadavg)"

# Let the follow-up reconciles (pods appearing, status updates) finish: wait until the
# reconcile count has not moved for 3 s (at most 60 s), so the histogram covers the burst.
last=-1
for _ in $(seq 60); do
  count=$(metrics | metric_sum dinoflow_operator_reconciles_total)
  [[ "$count" == "$last" ]] && break
  last=$count
  sleep 3
done
METRICS="$(metrics)"
printf '%s\n' "$METRICS" >"$WORK/operator.metrics"
kill -0 "$OP_PID" 2>/dev/null || die "the operator exited"
RSS_HWM_KB=$(awk '/^VmHWM/ { print $2 }' "/proc/$OP_PID/status")
RSS_NOW_KB=$(awk '/^VmRSS/ { print $2 }' "/proc/$OP_PID/status")
kubectl get --raw /metrics >"$WORK/apiserver.metrics" || die "cannot read the API server's /metrics"

# Quantile q of the PretrainJob reconcile histogram: the bucket's upper bound (what the target
# is checked against) and a linear interpolation inside the bucket (as PromQL's
# histogram_quantile does), both in seconds.
quantile() {
  printf '%s\n' "$METRICS" | awk -v q="$1" '
    /^dinoflow_operator_reconcile_duration_seconds_bucket\{kind="PretrainJob"/ {
      match($0, /le="[^"]+"/); n++; le[n] = substr($0, RSTART + 4, RLENGTH - 5); c[n] = $NF }
    END {
      if (n == 0 || c[n] == 0) { print "none none"; exit }
      rank = q * c[n]
      for (i = 1; i <= n; i++) if (c[i] >= rank) break
      lo = (i == 1) ? 0 : le[i - 1]; below = (i == 1) ? 0 : c[i - 1]
      if (le[i] == "+Inf") { printf "+Inf >%s\n", lo; exit }
      printf "%s %.3f\n", le[i], lo + (le[i] - lo) * (rank - below) / (c[i] - below)
    }'
}
read -r P50_LE P50_EST <<<"$(quantile 0.5)"
read -r P99_LE P99_EST <<<"$(quantile 0.99)"
RECONCILES=$(printf '%s\n' "$METRICS" | metric_sum dinoflow_operator_reconciles_total 'kind="PretrainJob"')
ERRORS=$(printf '%s\n' "$METRICS" | metric_sum dinoflow_operator_reconcile_errors_total 'kind="PretrainJob"')
ERROR_KINDS=$(printf '%s\n' "$METRICS" | awk '/^dinoflow_operator_reconcile_errors_total\{/ { match($0, /error="[^"]+"/); printf "%s%s=%s", sep, substr($0, RSTART + 7, RLENGTH - 8), $NF; sep = "," }')
# Writes the API server handled for the operator's children and the jobs' status (the only
# writers of these in the namespace are the operator, the scheduler's pod status updates and
# kubectl's job apply).
api() { metric_sum apiserver_request_total "$1" <"$WORK/apiserver.metrics"; }
PATCH_PODS=$(api 'resource="pods",scope="resource",subresource="",verb="APPLY"')
PATCH_OTHER=$(($(api 'resource="services",scope="resource",subresource="",verb="APPLY"') + $(api 'resource="configmaps",scope="resource",subresource="",verb="APPLY"') + $(api 'resource="secrets",scope="resource",subresource="",verb="APPLY"')))
PATCH_STATUS=$(api 'resource="pretrainjobs",scope="resource",subresource="status",verb="APPLY"')
# Events: the scheduler records events in the namespace too, so count the operator's own.
EVENTS=$(kubectl get events.events.k8s.io -n "$NS" -o jsonpath='{range .items[*]}{.reportingController}{" "}{.series.count}{"\n"}{end}' |
  awk '$1 == "dinoflow-operator" { n += ($2 == "" ? 1 : $2) } END { printf "%d", n }')
PHASES=$(kubectl get pretrainjobs -n "$NS" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' |
  awk '{ c[$1 == "" ? "none" : $1]++ } END { for (p in c) printf "%s%s=%d", (n++ ? "," : ""), p, c[p] }')
# Server-side latency of the operator's pod applies (the API server's own histogram): what a
# reconcile waits for per round trip, whatever the operator does.
APPLY_MS=$(awk '/^apiserver_request_duration_seconds_(sum|count)\{/ && /resource="pods"/ && /subresource=""/ && /verb="APPLY"/ {
    if ($0 ~ /_sum\{/) s += $NF; else c += $NF }
  END { if (c > 0) printf "%.0f", 1000 * s / c; else print "n/a" }' "$WORK/apiserver.metrics")
ALL_PODS_S=$(elapsed "$START" "$END")
RSS_MIB=$(awk -v k="$RSS_HWM_KB" 'BEGIN { printf "%.1f", k / 1024 }')
per_job() { awk -v n="$1" -v j="$JOBS" 'BEGIN { printf "%.1f", n / j }'; }

verdict() { # OK-CONDITION (awk expression true when the target is met)
  if awk "BEGIN { exit !($1) }"; then echo ok; else echo MISS; fi
}
V_PODS=$( [[ "$HAVE" -ge "$WANT" ]] && verdict "$ALL_PODS_S < $TARGET_ALL_PODS_S" || echo MISS)
if [[ "$P99_LE" == none ]]; then V_P99=MISS; elif [[ "$P99_LE" == +Inf ]]; then V_P99=MISS; else V_P99=$(verdict "$P99_LE <= $TARGET_P99_S"); fi
V_RSS=$(verdict "$RSS_MIB < $TARGET_RSS_MIB")

printf 'operator scale benchmark: %s jobs x %s nodes on %s cores; load average %s before, %s when the pods were in\n' \
  "$JOBS" "$NODES" "$(nproc)" "$LOAD_BEFORE" "$LOAD_AT_END"
printf '  operator               --max-concurrent-reconciles %s\n' "${DINOFLOW_MAX_CONCURRENT_RECONCILES:-(the default)}"
printf '  pods                   %s/%s (the jobs were applied by %s kubectl processes in %s s; the last pod came %s s later)\n' \
  "$HAVE" "$WANT" "$APPLIERS" "$(elapsed "$START" "$APPLIED")" "$(elapsed "$APPLIED" "$END")"
printf '  time to all pods       %6s s    target < %s s     %s\n' "$ALL_PODS_S" "$TARGET_ALL_PODS_S" "$V_PODS"
printf '  reconcile p50          <= %s s (~%s s)\n' "$P50_LE" "$P50_EST"
printf '  reconcile p99          <= %s s (~%s s)    target <= %s s    %s\n' "$P99_LE" "$P99_EST" "$TARGET_P99_S" "$V_P99"
printf '  operator peak RSS      %6s MiB  target < %s MiB  %s   (RSS now %s MiB)\n' "$RSS_MIB" "$TARGET_RSS_MIB" "$V_RSS" \
  "$(awk -v k="$RSS_NOW_KB" 'BEGIN { printf "%.1f", k / 1024 }')"
printf '  reconciles             %s (%s per job), errors %s%s\n' "$RECONCILES" "$(per_job "$RECONCILES")" "$ERRORS" "${ERROR_KINDS:+ ($ERROR_KINDS)}"
printf '  job phases             %s\n' "$PHASES"
printf '  API writes per job     pod applies %s, service/configmap/secret applies %s, status applies %s, events %s\n' \
  "$(per_job "$PATCH_PODS")" "$(per_job "$PATCH_OTHER")" "$(per_job "$PATCH_STATUS")" "$(per_job "$EVENTS")"
printf '  API server pod apply   %s ms mean, server side\n' "$APPLY_MS"
WARNINGS=$(grep -c '"level":"WARN"' "$WORK/operator.log" || true)
[[ "$WARNINGS" -gt 0 ]] && log "the operator logged $WARNINGS warnings, e.g.: $(grep -m1 '"level":"WARN"' "$WORK/operator.log")"
exit 0
