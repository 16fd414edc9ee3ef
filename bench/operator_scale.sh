#!/usr/bin/env bash
# Scale benchmark of dinoflow-operator on the local control plane (issues 5 and 15):
# JOBS PretrainJobs × NODES nodes applied at once; reports the time until every pod exists,
# reconcile latency p50/p99 (from the operator's histogram), reconciles and API writes per
# job, and the operator's peak RSS, each against its target. Then, on the same control plane,
# back to back, the same for Kubeflow's training-operator v1.8.1 with the equivalent
# PyTorchJobs (1 Master + NODES-1 Workers), and a side-by-side table.
#
#   bench/operator_scale.sh [JOBS=200] [NODES=4]
#
# Targets (Dinoflow): all pods within 30 s, p99 reconcile < 200 ms, peak RSS < 100 MiB, and
# ahead of Kubeflow on time to all pods and peak RSS. A missed target is reported (MISS) and
# does not change the exit status; only a harness failure (the cluster, a build or an operator
# not coming up, metrics unreadable) exits non-zero.
# Needs the control-plane binaries (scripts/setup.sh) and builds the operator in release mode;
# Kubeflow's operator comes from bench/kubeflow/build.sh (Go module proxy, cached; run here
# when its cache is empty, never by setup or CI).
# Environment:
#   DINOFLOW_MAX_CONCURRENT_RECONCILES...  the Dinoflow operator's own settings
#   DINOFLOW_BENCH_KUBEFLOW=0              Dinoflow only (no Kubeflow build or phase)
#   DINOFLOW_BENCH_ORDER=kubeflow          Kubeflow's phase first (default: Dinoflow first)
#   DINOFLOW_BENCH_KUBEFLOW_THREADS=N      Kubeflow's --controller-threads (default 4, at least
#                                          Dinoflow's default of 2; upstream's is 1)
#   DINOFLOW_BENCH_KEEP=1                  keep the work directory (logs, metrics) afterwards
#   DINOFLOW_BENCH_BIN_DIR=DIR             release dinoflow-operator and crdgen built earlier
#                                          (the target directory is rebuilt by other worktrees)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${1:-200}"
NODES="${2:-4}"
[[ "$JOBS" =~ ^[1-9][0-9]*$ && "$NODES" =~ ^[1-9][0-9]*$ ]] || {
  echo "usage: $0 [JOBS>=1] [NODES>=1]" >&2
  exit 2
}
KUBEFLOW="${DINOFLOW_BENCH_KUBEFLOW:-1}"
ORDER="${DINOFLOW_BENCH_ORDER:-dinoflow}"
KF_THREADS="${DINOFLOW_BENCH_KUBEFLOW_THREADS:-4}"
[[ "$KUBEFLOW" == 0 || "$KUBEFLOW" == 1 ]] || {
  echo "DINOFLOW_BENCH_KUBEFLOW must be 0 or 1, not '$KUBEFLOW'" >&2
  exit 2
}
[[ "$ORDER" == dinoflow || "$ORDER" == kubeflow ]] || {
  echo "DINOFLOW_BENCH_ORDER must be dinoflow or kubeflow (which phase goes first), not '$ORDER'" >&2
  exit 2
}
[[ "$KF_THREADS" =~ ^[1-9][0-9]*$ ]] || {
  echo "DINOFLOW_BENCH_KUBEFLOW_THREADS must be a positive integer, not '$KF_THREADS'" >&2
  exit 2
}
TARGET_ALL_PODS_S=30
TARGET_P99_S=0.2
TARGET_RSS_MIB=100
# Give up waiting for the pods after this long (the target is missed long before).
POD_WAIT_LIMIT_S="${DINOFLOW_BENCH_POD_WAIT_S:-300}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dinoflow-bench-XXXXXX")"
# Kubeflow's webhook server and its cert rotator read the serving certificate from this
# fixed path (cert-controller's CertDir, hard-coded in v1.8.1 with no flag); in a cluster
# the kubelet mounts the Secret there. Outside one, this script copies it there.
KF_CERT_DIR=/tmp/k8s-webhook-server/serving-certs
log() { printf '[bench] %s\n' "$*" >&2; }
die() {
  printf '[bench] harness failure: %s\n' "$*" >&2
  exit 1
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  stop_operator
  if [[ -f "$KF_CERT_DIR/.owner" && "$(cat "$KF_CERT_DIR/.owner")" == "$$" ]]; then
    rm -rf "$KF_CERT_DIR"
    rmdir "$(dirname "$KF_CERT_DIR")" 2>/dev/null || true
  fi
  "$ROOT/scripts/cluster.sh" down --dir "$WORK/cluster" >/dev/null 2>&1 || true
  if [[ "${DINOFLOW_BENCH_KEEP:-0}" == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

stop_operator() {
  if [[ -n "${OP_PID:-}" ]]; then
    kill "$OP_PID" 2>/dev/null || true
    wait "$OP_PID" 2>/dev/null || true
    OP_PID=
  fi
}

# A free local port (any state in /proc/net/tcp counts as taken).
free_port() {
  local port
  for _ in $(seq 200); do
    port=$((40000 + RANDOM % 10000))
    awk -v p="$(printf ':%04X' "$port")" 'substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
      /proc/net/tcp /proc/net/tcp6 2>/dev/null || { echo "$port"; return 0; }
  done
  die "no free local port"
}

now() { date +%s.%N; }
elapsed() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.2f", e - s }'; }
per_job() { awk -v n="$1" -v j="$JOBS" 'BEGIN { printf "%.1f", n / j }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
verdict() { # OK-CONDITION (awk expression true when the target is met)
  if awk "BEGIN { exit !($1) }"; then echo ok; else echo MISS; fi
}

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
if [[ "$KUBEFLOW" == 1 ]]; then
  KF="$("$ROOT/bench/kubeflow/build.sh")" || die "bench/kubeflow/build.sh failed (DINOFLOW_BENCH_KUBEFLOW=0 skips Kubeflow)"
  if [[ -f "$KF_CERT_DIR/.owner" ]] && kill -0 "$(cat "$KF_CERT_DIR/.owner")" 2>/dev/null; then
    die "$KF_CERT_DIR is in use by another benchmark (pid $(cat "$KF_CERT_DIR/.owner")); run one at a time"
  fi
fi

MACHINE="$(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM"
UPTIME_BEFORE="$(uptime)"
log "machine: $MACHINE; uptime before: $UPTIME_BEFORE"

# One retry: on this busy machine a component now and then exits during start-up.
CLUSTER_ENV="$("$ROOT/scripts/cluster.sh" up --dir "$WORK/cluster" --owner-pid $$)" || {
  log "the control plane did not start; retrying once"
  "$ROOT/scripts/cluster.sh" down --dir "$WORK/cluster" >/dev/null 2>&1 || true
  rm -rf "$WORK/cluster"
  CLUSTER_ENV="$("$ROOT/scripts/cluster.sh" up --dir "$WORK/cluster" --owner-pid $$)"
} || die "the control plane did not start"
eval "$CLUSTER_ENV"
"$BIN/crdgen" >"$WORK/crds.yaml"
install_crds() { # FILE; one retry: a loaded API server now and then times kubectl out here
  "$ROOT/scripts/cluster.sh" install-crds --dir "$WORK/cluster" "$1" >/dev/null ||
    "$ROOT/scripts/cluster.sh" install-crds --dir "$WORK/cluster" "$1" >/dev/null ||
    die "could not install the CRDs in $1"
}
install_crds "$WORK/crds.yaml"
[[ "$KUBEFLOW" == 1 ]] && install_crds "$KF/crds/kubeflow.org_pytorchjobs.yaml"

# Pods in a namespace, cheaply: a one-item page plus the server's count of the rest, so
# polling does not make the API server serialise every pod twice a second. Only the
# operator under test creates pods in its namespace.
pod_count() { # NAMESPACE
  kubectl get --raw "/api/v1/namespaces/$1/pods?limit=1" 2>/dev/null |
    python3 -c 'import json, sys
d = json.load(sys.stdin)
print(len(d["items"]) + (d["metadata"].get("remainingItemCount") or 0))'
}
metric_sum() { # NAME [LABEL-FILTER]: sum of the samples of NAME whose labels contain the filter
  awk -v n="$1" -v f="${2:-}" 'index($0, n) == 1 && (substr($0, length(n) + 1, 1) == "{" || substr($0, length(n) + 1, 1) == " ") && index($0, f) { s += $NF } END { printf "%d", s }'
}
# Quantile q of a histogram (lines NAME_bucket{...FILTER...le="..."} on stdin): the bucket's
# upper bound (what the target is checked against) and a linear interpolation inside the
# bucket (as PromQL's histogram_quantile does), both in seconds.
quantile() { # Q NAME FILTER
  awk -v q="$1" -v n="$2_bucket{" -v f="$3" '
    index($0, n) == 1 && index($0, f) {
      match($0, /le="[^"]+"/); k++; le[k] = substr($0, RSTART + 4, RLENGTH - 5); c[k] = $NF }
    END {
      if (k == 0 || c[k] == 0) { print "none none"; exit }
      rank = q * c[k]
      for (i = 1; i <= k; i++) if (c[i] >= rank) break
      lo = (i == 1) ? 0 : le[i - 1]; below = (i == 1) ? 0 : c[i - 1]
      if (le[i] == "+Inf") { printf "+Inf >%s\n", lo; exit }
      printf "%s %.3f\n", le[i], lo + (le[i] - lo) * (rank - below) / (c[i] - below)
    }'
}
# How many samples of a histogram lie above BOUND seconds (BOUND must be one of its buckets).
above() { # BOUND NAME FILTER
  awk -v b="$1" -v n="$2_bucket{" -v f="$3" '
    index($0, n) == 1 && index($0, f) && /le="\+Inf"/ { all = $NF }
    index($0, n) == 1 && index($0, f) && index($0, "le=\"" b "\"") { at = $NF }
    END { printf "%d", all - at }'
}
# Writes the API server handled between two of its /metrics snapshots, by resource,
# subresource and verb (regular expressions); the metric has no namespace, so each phase
# snapshots around itself while its operator is the only writer besides kubectl and the
# scheduler, whose writes are told apart by resource and verb.
writes() { # BEFORE AFTER RESOURCE-RE SUBRESOURCE-RE VERB-RE
  awk -v res="$3" -v sr="$4" -v verbs="$5" '
    function lab(k) { return match($0, "[{,]" k "=\"[^\"]*\"") ? substr($0, RSTART + length(k) + 3, RLENGTH - length(k) - 4) : "" }
    /^apiserver_request_total\{/ && lab("resource") ~ res && lab("subresource") ~ sr && lab("verb") ~ verbs {
      if (FILENAME == ARGV[1]) b += $NF; else a += $NF }
    END { printf "%d", a - b }' "$1" "$2"
}
WRITE_VERBS='^(POST|PUT|PATCH|APPLY|DELETE)$'
# Events in a namespace recorded by anyone but the scheduler (each counted with its series);
# the count by reporter and reason goes to the log.
operator_events() { # NAMESPACE
  kubectl get events -n "$1" -o json | python3 -c 'import collections, json, sys
n, by = 0, collections.Counter()
for e in json.load(sys.stdin)["items"]:
    who = e.get("reportingComponent") or (e.get("source") or {}).get("component") or "?"
    count = (e.get("series") or {}).get("count") or e.get("count") or 1
    by[who + "/" + e.get("reason", "?")] += count
    if who != "default-scheduler":
        n += count
print("[bench] events in " + sys.argv[1] + ": " + ", ".join(f"{k}={v}" for k, v in sorted(by.items())), file=sys.stderr)
print(n)' "$1"
}

# The operator's writes in a phase (between the API server's /metrics snapshots BEFORE and
# AFTER): its children (created, or applied when they exist), its jobs' status, deletions,
# and the events in NS not recorded by the scheduler; kubectl's applies of the jobs (APPLY on
# JOB-RESOURCE) are not counted. Sets W_PODS, W_OTHER, W_STATUS, W_EVENTS and W_TOTAL.
operator_writes() { # BEFORE AFTER JOB-RESOURCE NS
  local b=$1 a=$2 res=$3 ns=$4
  W_PODS=$(writes "$b" "$a" '^pods$' '^$' "$WRITE_VERBS")
  W_OTHER=$(writes "$b" "$a" '^(services|configmaps|secrets|podgroups)$' '^$' "$WRITE_VERBS")
  W_STATUS=$(($(writes "$b" "$a" "^$res\$" '^status$' "$WRITE_VERBS") + $(writes "$b" "$a" "^$res\$" '^$' '^(POST|PUT|PATCH|DELETE)$')))
  W_EVENTS=$(operator_events "$ns")
  W_TOTAL=$((W_PODS + W_OTHER + W_STATUS + W_EVENTS))
}
print_writes() { # the per-job line of the last operator_writes
  printf '  API writes per job     %s: pods %s, service/configmap/secret %s, job status %s, events %s\n' \
    "$(per_job "$W_TOTAL")" "$(per_job "$W_PODS")" "$(per_job "$W_OTHER")" "$(per_job "$W_STATUS")" "$(per_job "$W_EVENTS")"
}

WANT=$((JOBS * NODES))
# The jobs go out through APPLIERS kubectl processes at once: one kubectl applies its objects
# one after another (about 7 a second here), which would spread the burst over half a minute.
APPLIERS="${DINOFLOW_BENCH_APPLIERS:-8}"

# Applies $DIR/jobs-*.yaml, waits for WANT pods in NS and for the operator's reconcile count
# (metric RECONCILES at METRICS_URL) to settle; sets the phase's timing and metric files.
run_burst() { # NAME NS DIR METRICS_URL RECONCILES
  local name=$1 ns=$2 dir=$3 url=$4 reconciles=$5 pid pids=() have=0 start applied end last count
  kubectl get --raw /metrics >"$dir/apiserver.before" || die "cannot read the API server's /metrics"
  P_LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
  log "$name: applying $JOBS jobs × $NODES nodes = $WANT pods (load average $P_LOAD_BEFORE)"
  start=$(now)
  for f in "$dir"/jobs-*.yaml; do
    kubectl apply --server-side -f "$f" >/dev/null &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || die "$name: kubectl apply of the jobs failed"; done
  applied=$(now)
  while :; do
    have=$(pod_count "$ns" || echo "$have")
    [[ "$have" -ge "$WANT" ]] && break
    kill -0 "$OP_PID" 2>/dev/null || { tail -20 "$dir/operator.log" >&2; die "$name: the operator exited"; }
    if awk -v s="$start" -v n="$(now)" -v l="$POD_WAIT_LIMIT_S" 'BEGIN { exit !(n - s > l) }'; then
      log "$name: gave up: $have/$WANT pods after $POD_WAIT_LIMIT_S s"
      break
    fi
    sleep 0.25
  done
  end=$(now)
  P_LOAD_AT_END="$(cut -d' ' -f1-3 /proc/loadavg)"
  # Let the follow-up reconciles (pods appearing, status updates) finish: wait until the
  # reconcile count has not moved for 3 s (at most 180 s), so the histogram covers the burst.
  last=-1
  for _ in $(seq 60); do
    count=$(curl -fs "$url" | metric_sum "$reconciles") || die "$name: cannot read the operator's metrics at $url"
    [[ "$count" == "$last" ]] && break
    last=$count
    sleep 3
  done
  curl -fs "$url" >"$dir/operator.metrics" || die "$name: cannot read the operator's metrics at $url"
  kill -0 "$OP_PID" 2>/dev/null || die "$name: the operator exited"
  P_RSS_HWM_KB=$(awk '/^VmHWM/ { print $2 }' "/proc/$OP_PID/status")
  P_RSS_NOW_KB=$(awk '/^VmRSS/ { print $2 }' "/proc/$OP_PID/status")
  kubectl get --raw /metrics >"$dir/apiserver.after" || die "cannot read the API server's /metrics"
  P_HAVE=$have
  P_APPLY_S=$(elapsed "$start" "$applied")
  P_LAST_POD_S=$(elapsed "$applied" "$end")
  P_ALL_PODS_S=$(elapsed "$start" "$end")
}

# Deletes a phase's namespace and waits until it is gone, so its pods do not load the
# scheduler and the API server during the next phase.
drop_namespace() { # NS
  kubectl delete namespace "$1" --wait=false >/dev/null
  for _ in $(seq 240); do
    kubectl get namespace "$1" >/dev/null 2>&1 || return 0
    sleep 1
  done
  log "namespace $1 still terminating after 240 s; the next phase runs beside it"
}

# Results by phase, for the comparison table.
declare -A R_PODS R_PODS_OK R_RSS R_WRITES R_P99 R_P50 R_LOAD

phase_dinoflow() {
  local ns=bench dir="$WORK/dinoflow" port i
  mkdir -p "$dir"
  kubectl create namespace "$ns" >/dev/null
  port="${DINOFLOW_BENCH_HEALTH_PORT:-$(free_port)}"
  head -c 32 /dev/urandom >"$dir/key"
  # Plaintext progress endpoint: nothing reports progress here (no kubelet), and TLS would
  # need certificates this benchmark has no use for.
  "$BIN/dinoflow-operator" --progress-key-file "$dir/key" --progress-plaintext \
    --progress-endpoint http://dinoflow-operator.dinoflow-system.svc:9090 \
    --health-addr "127.0.0.1:$port" --progress-addr 127.0.0.1:0 --log-format json \
    >"$dir/operator.log" 2>&1 &
  OP_PID=$!
  for _ in $(seq 300); do
    curl -fs "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    kill -0 "$OP_PID" 2>/dev/null || { tail -20 "$dir/operator.log" >&2; die "the Dinoflow operator exited at start-up"; }
    sleep 0.2
  done
  curl -fs "127.0.0.1:$port/readyz" >/dev/null || die "the Dinoflow operator was not ready within 60 s"
  for i in $(seq "$JOBS"); do
    cat <<YAML >>"$dir/jobs-$((i % APPLIERS)).yaml"
---
apiVersion: dinoflow.dev/v1alpha1
kind: PretrainJob
metadata: {name: job-$i, namespace: $ns}
spec:
  training: {data: {path: /data/train}}
  cluster: {nodes: $NODES, gpusPerNode: 0}
YAML
  done
  run_burst Dinoflow "$ns" "$dir" "127.0.0.1:$port/metrics" dinoflow_operator_reconciles_total
  local m="$dir/operator.metrics" a="$dir/apiserver.after" b="$dir/apiserver.before"
  local hist=dinoflow_operator_reconcile_duration_seconds filter='kind="PretrainJob"'
  local p50_le p50_est p99_le p99_est reconciles errors error_kinds over phases
  read -r p50_le p50_est <<<"$(quantile 0.5 "$hist" "$filter" <"$m")"
  read -r p99_le p99_est <<<"$(quantile 0.99 "$hist" "$filter" <"$m")"
  over=$(above 0.2 "$hist" "$filter" <"$m")
  reconciles=$(metric_sum dinoflow_operator_reconciles_total "$filter" <"$m")
  errors=$(metric_sum dinoflow_operator_reconcile_errors_total "$filter" <"$m")
  error_kinds=$(awk '/^dinoflow_operator_reconcile_errors_total\{/ && /kind="PretrainJob"/ && $NF > 0 { match($0, /error="[^"]+"/); printf "%s%s=%s", sep, substr($0, RSTART + 7, RLENGTH - 8), $NF; sep = "," }' "$m")
  operator_writes "$b" "$a" pretrainjobs "$ns"
  phases=$(kubectl get pretrainjobs -n "$ns" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' |
    awk '{ c[$1 == "" ? "none" : $1]++ } END { for (p in c) printf "%s%s=%d", (n++ ? "," : ""), p, c[p] }')
  # Server-side latency of the pod creates (the API server's own histogram, this phase only):
  # what a reconcile waits for per round trip, whatever the operator does.
  local apply_ms
  apply_ms=$(awk '/^apiserver_request_duration_seconds_(sum|count)\{/ && /resource="pods"/ && /subresource=""/ && /verb="(POST|APPLY)"/ {
      k = ($0 ~ /_sum\{/) ? "s" : "c"; v[FILENAME, k] += $NF }
    END { c = v[ARGV[2], "c"] - v[ARGV[1], "c"]; s = v[ARGV[2], "s"] - v[ARGV[1], "s"]
          if (c > 0) printf "%.0f", 1000 * s / c; else print "n/a" }' "$b" "$a")
  local rss v_pods v_p99 v_rss warnings
  rss=$(mib "$P_RSS_HWM_KB")
  v_pods=$([[ "$P_HAVE" -ge "$WANT" ]] && verdict "$P_ALL_PODS_S < $TARGET_ALL_PODS_S" || echo MISS)
  if [[ "$p99_le" == none || "$p99_le" == +Inf ]]; then v_p99=MISS; else v_p99=$(verdict "$p99_le <= $TARGET_P99_S"); fi
  v_rss=$(verdict "$rss < $TARGET_RSS_MIB")
  printf 'Dinoflow operator: %s PretrainJobs x %s nodes; load average %s before, %s when the pods were in\n' \
    "$JOBS" "$NODES" "$P_LOAD_BEFORE" "$P_LOAD_AT_END"
  printf '  operator               --max-concurrent-reconciles %s\n' "${DINOFLOW_MAX_CONCURRENT_RECONCILES:-(the default)}"
  printf '  pods                   %s/%s (the jobs were applied by %s kubectl processes in %s s; the last pod came %s s later)\n' \
    "$P_HAVE" "$WANT" "$APPLIERS" "$P_APPLY_S" "$P_LAST_POD_S"
  printf '  time to all pods       %6s s    target < %s s     %s\n' "$P_ALL_PODS_S" "$TARGET_ALL_PODS_S" "$v_pods"
  printf '  reconcile p50          <= %s s (~%s s)\n' "$p50_le" "$p50_est"
  printf '  reconcile p99          <= %s s (~%s s)    target <= %s s    %s   (%s of %s over 200 ms)\n' \
    "$p99_le" "$p99_est" "$TARGET_P99_S" "$v_p99" "$over" "$reconciles"
  printf '  operator peak RSS      %6s MiB  target < %s MiB  %s   (RSS now %s MiB)\n' "$rss" "$TARGET_RSS_MIB" "$v_rss" "$(mib "$P_RSS_NOW_KB")"
  printf '  reconciles             %s (%s per job), errors %s%s\n' "$reconciles" "$(per_job "$reconciles")" "$errors" "${error_kinds:+ ($error_kinds)}"
  printf '  job phases             %s\n' "$phases"
  print_writes
  printf '  API server pod create  %s ms mean, server side\n' "$apply_ms"
  warnings=$(grep -c '"level":"WARN"' "$dir/operator.log" || true)
  [[ "$warnings" -gt 0 ]] && log "the Dinoflow operator logged $warnings warnings, e.g.: $(grep -m1 '"level":"WARN"' "$dir/operator.log")"
  R_PODS[dinoflow]=$P_ALL_PODS_S R_PODS_OK[dinoflow]=$([[ "$P_HAVE" -ge "$WANT" ]] && echo 1 || echo 0)
  R_RSS[dinoflow]=$rss R_WRITES[dinoflow]=$(per_job "$W_TOTAL")
  R_P99[dinoflow]="<= $p99_le s (~$p99_est)" R_P50[dinoflow]="<= $p50_le s (~$p50_est)"
  R_LOAD[dinoflow]="${P_LOAD_BEFORE%% *}, ${P_LOAD_AT_END%% *}"
  stop_operator
}

phase_kubeflow() {
  local ns=bench-kf kfns=kubeflow dir="$WORK/kubeflow" metrics_port probe_port webhook_port i workers
  mkdir -p "$dir"
  kubectl create namespace "$ns" >/dev/null
  metrics_port=$(free_port) probe_port=$(free_port) webhook_port=$(free_port)
  # What the upstream install (manifests/overlays/standalone) provides, minus the Deployment:
  # the namespace, the Secret the cert rotator fills, the webhook configuration the rotator
  # injects its CA into, and the webhook's Service. The API server resolves a webhook Service
  # without kube-proxy only by its type: an ExternalName Service is dialled at
  # <externalName>:<port of the webhook configuration>, so it names localhost and the port
  # the webhook server listens on here, and the TLS server name stays
  # training-operator.kubeflow.svc, the name on the rotator's certificate.
  kubectl create namespace "$kfns" >/dev/null
  kubectl -n "$kfns" create secret generic training-operator-webhook-cert >/dev/null
  kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: {name: training-operator, namespace: $kfns}
spec: {type: ExternalName, externalName: localhost}
YAML
  kubectl kustomize "$KF/webhook" 2>/dev/null | python3 -c '
import sys, yaml
port, ns = int(sys.argv[1]), sys.argv[2]
vwc = yaml.safe_load(sys.stdin)
for w in vwc["webhooks"]:
    w["clientConfig"]["service"].update(namespace=ns, port=port)
yaml.safe_dump(vwc, sys.stdout)' "$webhook_port" "$kfns" >"$dir/webhook.yaml"
  kubectl apply -f "$dir/webhook.yaml" >/dev/null
  mkdir -p "$KF_CERT_DIR"
  echo $$ >"$KF_CERT_DIR/.owner"
  rm -f "$KF_CERT_DIR"/tls.*
  # TMPDIR=/tmp: the webhook server's certificate directory is under os.TempDir().
  TMPDIR=/tmp MY_POD_NAMESPACE="$kfns" "$KF/training-operator.v1" --enable-scheme=pytorchjob \
    --controller-threads "$KF_THREADS" --metrics-bind-address "127.0.0.1:$metrics_port" \
    --health-probe-bind-address "127.0.0.1:$probe_port" --webhook-server-port "$webhook_port" \
    --zap-devel=false --zap-log-level=info >"$dir/operator.log" 2>&1 &
  OP_PID=$!
  # The kubelet's part: copy the certificate the rotator wrote into the Secret to the
  # webhook server's directory, then wait for readiness (certificates and webhook up).
  local secret_ok=0
  for _ in $(seq 300); do
    kill -0 "$OP_PID" 2>/dev/null || { tail -20 "$dir/operator.log" >&2; die "the Kubeflow operator exited at start-up"; }
    if [[ $secret_ok == 0 ]] && kubectl -n "$kfns" get secret training-operator-webhook-cert -o json | python3 -c '
import base64, json, sys
d = json.load(sys.stdin).get("data") or {}
if not d.get("tls.crt") or not d.get("tls.key"):
    sys.exit(1)
for k in ("tls.crt", "tls.key"):
    open(sys.argv[1] + "/" + k, "wb").write(base64.b64decode(d[k]))' "$KF_CERT_DIR" 2>/dev/null; then
      secret_ok=1
    fi
    curl -fs "127.0.0.1:$probe_port/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fs "127.0.0.1:$probe_port/readyz" >/dev/null || { tail -20 "$dir/operator.log" >&2; die "the Kubeflow operator was not ready within 60 s"; }
  workers=$((NODES - 1))
  for i in $(seq "$JOBS"); do
    {
      cat <<YAML
---
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {name: job-$i, namespace: $ns}
spec:
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: OnFailure
      template:
        spec:
          containers: [{name: pytorch, image: dinoflow-bench/trainer:none}]
YAML
      [[ $workers -gt 0 ]] && cat <<YAML
    Worker:
      replicas: $workers
      restartPolicy: OnFailure
      template:
        spec:
          containers: [{name: pytorch, image: dinoflow-bench/trainer:none}]
YAML
      true
    } >>"$dir/jobs-$((i % APPLIERS)).yaml"
  done
  run_burst Kubeflow "$ns" "$dir" "127.0.0.1:$metrics_port/metrics" controller_runtime_reconcile_total
  local m="$dir/operator.metrics" a="$dir/apiserver.after" b="$dir/apiserver.before"
  local hist=controller_runtime_reconcile_time_seconds filter='controller="pytorchjob-controller"'
  local p50_le p50_est p99_le p99_est reconciles errors rss
  read -r p50_le p50_est <<<"$(quantile 0.5 "$hist" "$filter" <"$m")"
  read -r p99_le p99_est <<<"$(quantile 0.99 "$hist" "$filter" <"$m")"
  reconciles=$(metric_sum controller_runtime_reconcile_total "$filter" <"$m")
  errors=$(metric_sum controller_runtime_reconcile_errors_total "$filter" <"$m")
  operator_writes "$b" "$a" pytorchjobs "$ns"
  rss=$(mib "$P_RSS_HWM_KB")
  printf 'Kubeflow training-operator v1.8.1: %s PyTorchJobs (1 Master + %s Workers); load average %s before, %s when the pods were in\n' \
    "$JOBS" "$workers" "$P_LOAD_BEFORE" "$P_LOAD_AT_END"
  printf '  operator               --controller-threads %s, client-side rate limit as shipped (20 requests/s, burst 30)\n' "$KF_THREADS"
  printf '  pods                   %s/%s (the jobs were applied by %s kubectl processes in %s s, through its webhook; the last pod came %s s later)\n' \
    "$P_HAVE" "$WANT" "$APPLIERS" "$P_APPLY_S" "$P_LAST_POD_S"
  printf '  time to all pods       %6s s\n' "$P_ALL_PODS_S"
  printf '  reconcile p50          <= %s s (~%s s)\n' "$p50_le" "$p50_est"
  printf '  reconcile p99          <= %s s (~%s s)\n' "$p99_le" "$p99_est"
  printf '  operator peak RSS      %6s MiB  (RSS now %s MiB)\n' "$rss" "$(mib "$P_RSS_NOW_KB")"
  printf '  reconciles             %s (%s per job), errors %s\n' "$reconciles" "$(per_job "$reconciles")" "$errors"
  print_writes
  R_PODS[kubeflow]=$P_ALL_PODS_S R_PODS_OK[kubeflow]=$([[ "$P_HAVE" -ge "$WANT" ]] && echo 1 || echo 0)
  R_RSS[kubeflow]=$rss R_WRITES[kubeflow]=$(per_job "$W_TOTAL")
  R_P99[kubeflow]="<= $p99_le s (~$p99_est)" R_P50[kubeflow]="<= $p50_le s (~$p50_est)"
  R_LOAD[kubeflow]="${P_LOAD_BEFORE%% *}, ${P_LOAD_AT_END%% *}"
  stop_operator
}

PHASES=(dinoflow)
if [[ "$KUBEFLOW" == 1 ]]; then
  if [[ "$ORDER" == kubeflow ]]; then PHASES=(kubeflow dinoflow); else PHASES=(dinoflow kubeflow); fi
fi
for i in "${!PHASES[@]}"; do
  case "${PHASES[$i]}" in
    dinoflow) phase_dinoflow ;;
    kubeflow) phase_kubeflow ;;
  esac
  if [[ $i -lt $((${#PHASES[@]} - 1)) ]]; then
    if [[ "${PHASES[$i]}" == dinoflow ]]; then drop_namespace bench; else drop_namespace bench-kf; fi
  fi
done
UPTIME_AFTER="$(uptime)"
printf 'machine: %s\n  uptime before: %s\n  uptime after:  %s\n' "$MACHINE" "$UPTIME_BEFORE" "$UPTIME_AFTER"
if [[ "$KUBEFLOW" == 1 ]]; then
  both_in=$((R_PODS_OK[dinoflow] && R_PODS_OK[kubeflow]))
  v_time=$([[ $both_in == 1 ]] && verdict "${R_PODS[dinoflow]} < ${R_PODS[kubeflow]}" || echo MISS)
  v_mem=$(verdict "${R_RSS[dinoflow]} < ${R_RSS[kubeflow]}")
  printf 'comparison, same control plane, back to back (%s first):\n' "${PHASES[0]}"
  printf '  %-22s %-22s %-22s %s\n' '' Dinoflow 'Kubeflow v1.8.1' 'Dinoflow ahead'
  printf '  %-22s %-22s %-22s %s\n' 'time to all pods' "${R_PODS[dinoflow]} s" "${R_PODS[kubeflow]} s" "$v_time"
  printf '  %-22s %-22s %-22s %s\n' 'peak RSS' "${R_RSS[dinoflow]} MiB" "${R_RSS[kubeflow]} MiB" "$v_mem"
  printf '  %-22s %-22s %-22s\n' 'API writes per job' "${R_WRITES[dinoflow]}" "${R_WRITES[kubeflow]}"
  printf '  %-22s %-22s %-22s\n' 'reconcile p50' "${R_P50[dinoflow]}" "${R_P50[kubeflow]}"
  printf '  %-22s %-22s %-22s\n' 'reconcile p99' "${R_P99[dinoflow]}" "${R_P99[kubeflow]}"
  printf '  %-22s %-22s %-22s\n' 'load (start, pods in)' "${R_LOAD[dinoflow]}" "${R_LOAD[kubeflow]}"
fi
exit 0
