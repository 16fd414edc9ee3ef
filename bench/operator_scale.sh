#!/usr/bin/env bash
# Scale benchmark of dinoflow-operator on the local control plane (issue 5):
# JOBS PretrainJobs × NODES nodes applied at once; reports the time until every pod exists,
# reconcile latency p50/p99 (from the operator's histogram) and the operator's peak RSS.
#
#   bench/operator_scale.sh [JOBS=200] [NODES=4]
#
# Targets: all pods within 30 s, p99 reconcile < 200 ms, peak RSS < 100 MiB.
# Needs the control-plane binaries (scripts/setup.sh) and builds the operator in release mode.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${1:-200}"
NODES="${2:-4}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dinoflow-bench-XXXXXX")"
NS=bench
HEALTH_PORT="${DINOFLOW_BENCH_HEALTH_PORT:-18080}"
log() { printf '[bench] %s\n' "$*" >&2; }

cleanup() {
  [[ -n "${OP_PID:-}" ]] && kill "$OP_PID" 2>/dev/null || true
  "$ROOT/scripts/cluster.sh" down --dir "$WORK/cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

source "$ROOT/scripts/env.sh"
log "building dinoflow-operator and crdgen (release)"
cargo build --release -q -p dinoflow-operator -p dinoflow-api --bins --manifest-path "$ROOT/Cargo.toml"
eval "$("$ROOT/scripts/cluster.sh" up --dir "$WORK/cluster" --owner-pid $$)"
"${CARGO_TARGET_DIR:-$ROOT/target}/release/crdgen" > "$WORK/crds.yaml"
kubectl apply --server-side -f "$WORK/crds.yaml" >/dev/null
kubectl wait --for=condition=Established --timeout=60s -f "$WORK/crds.yaml" >/dev/null
kubectl create namespace "$NS" >/dev/null

head -c 32 /dev/urandom > "$WORK/key"
"${CARGO_TARGET_DIR:-$ROOT/target}/release/dinoflow-operator" --progress-key-file "$WORK/key" \
  --health-addr "127.0.0.1:$HEALTH_PORT" --progress-addr 127.0.0.1:0 --log-format text \
  > "$WORK/operator.log" 2>&1 &
OP_PID=$!
for _ in $(seq 100); do curl -fs "127.0.0.1:$HEALTH_PORT/readyz" >/dev/null && break; sleep 0.2; done

for i in $(seq "$JOBS"); do
  cat <<YAML
---
apiVersion: dinoflow.dev/v1alpha1
kind: PretrainJob
metadata: {name: job-$i, namespace: $NS}
spec:
  training: {}
  cluster: {nodes: $NODES, gpusPerNode: 0}
YAML
done > "$WORK/jobs.yaml"

WANT=$((JOBS * NODES))
log "applying $JOBS jobs × $NODES nodes = $WANT pods"
START=$(date +%s.%N)
kubectl apply --server-side -f "$WORK/jobs.yaml" >/dev/null
while :; do
  HAVE=$(kubectl get pods -n "$NS" -l dinoflow.dev/job --no-headers 2>/dev/null | wc -l)
  [[ "$HAVE" -ge "$WANT" ]] && break
  NOW=$(date +%s.%N)
  if awk -v s="$START" -v n="$NOW" 'BEGIN { exit !(n - s > 300) }'; then log "gave up: $HAVE/$WANT pods after 300 s"; break; fi
  sleep 0.5
done
END=$(date +%s.%N)
sleep 2
METRICS="$(curl -fs "127.0.0.1:$HEALTH_PORT/metrics")"
RSS_KB=$(awk '/VmHWM/ { print $2 }' "/proc/$OP_PID/status")

# Quantiles from the cumulative histogram (upper bucket bound where the rank is reached).
quantile() {
  printf '%s\n' "$METRICS" | awk -v q="$1" '
    /^dinoflow_operator_reconcile_duration_seconds_bucket\{kind="PretrainJob"/ {
      match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5); n++; les[n] = le; cnt[n] = $NF }
    END { total = cnt[n]; for (i = 1; i <= n; i++) if (cnt[i] >= q * total) { print les[i]; exit } }'
}
COUNT=$(printf '%s\n' "$METRICS" | awk '/^dinoflow_operator_reconcile_duration_seconds_count\{kind="PretrainJob"/ { print $NF }')
printf 'jobs=%s nodes=%s pods=%s\n' "$JOBS" "$NODES" "$HAVE"
printf 'time_to_all_pods_s=%.2f\n' "$(awk -v s="$START" -v e="$END" 'BEGIN { print e - s }')"
printf 'reconciles=%s reconcile_p50_le_s=%s reconcile_p99_le_s=%s\n' "$COUNT" "$(quantile 0.5)" "$(quantile 0.99)"
printf 'operator_peak_rss_mib=%.1f\n' "$(awk -v k="$RSS_KB" 'BEGIN { print k / 1024 }')"
