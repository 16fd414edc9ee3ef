#!/usr/bin/env bash
# The main job on a local default (README's first command), through the real path: set up,
# bring up the local control plane in out/cluster, install the CRDs, start the operator and
# the local node agent (a Node whose pods run as local processes, tests/node-agent),
# `kubectl apply` the tiny CPU example job, watch `kubectl get pretrainjobs` until it
# succeeds, and print where its checkpoint is.
# The example is applied with a visible override (shown below): 2 epochs of 10 iterations
# instead of 6 of 50, its output under out/demo, free ports (local pods share the host's). The cluster stays up afterwards for kubectl
# (`scripts/cluster.sh down` stops it); the operator and the node agent stop with the script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[demo] %s\n' "$*"; }
die() { printf '[demo] error: %s\n' "$*" >&2; exit 1; }
START=$SECONDS

bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
# Advances this script's clock as a slow cold set-up would (tests/tests/demo.rs): each wait
# below must count only its own step, never the set-up and build before it.
log "set-up: $((SECONDS - START)) s"
SKEW=${DINOFLOW_DEMO_SIMULATE_SLOW_SETUP:-0}
SECONDS=$((SECONDS + SKEW))

CLUSTER_DIR="${DINOFLOW_CLUSTER_DIR:-$ROOT/out/cluster}"
DEMO_DIR="${DINOFLOW_DEMO_DIR:-$ROOT/out/demo}"
EXAMPLE="$ROOT/manifests/examples/tiny-cpu-fashion-mnist.yaml"
JOB=tiny-cpu-fashion-mnist
OUTPUT="$DEMO_DIR/$JOB"
# Each wait (node agent ready, job succeeded) gets this many seconds from its own start.
TIMEOUT="${DINOFLOW_DEMO_TIMEOUT:-900}"
[[ -f "$EXAMPLE" ]] || die "$EXAMPLE is missing"
shopt -s nullglob
crds=("$ROOT"/crds/*.yaml)
[[ ${#crds[@]} -gt 0 ]] || die "no crds/*.yaml (cargo run -p dinoflow-api --bin crdgen)"
mkdir -p "$DEMO_DIR"

log "building the trainer, the operator and the node agent"
built_from=$SECONDS
# One package per build, as the tests build them: building them together unifies their
# dependencies' features differently and would recompile them.
cargo build -q -p dinoflow-trainer --bin dinoflow-trainer
cargo build -q -p dinoflow-operator --bin dinoflow-operator
cargo build -q -p dinoflow-node-agent --bin dinoflow-node-agent
log "built in $((SECONDS - built_from)) s"
BIN="$CARGO_TARGET_DIR/debug"

log "local control plane in ${CLUSTER_DIR#"$ROOT"/}"
eval "$(bash scripts/cluster.sh up --dir "$CLUSTER_DIR")"
export KUBECONFIG

log "installing CRDs: ${crds[*]#"$ROOT"/}"
bash scripts/cluster.sh install-crds --dir "$CLUSTER_DIR" "${crds[@]}"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# A stable key: per-job progress tokens are derived from it.
KEY_FILE="$DEMO_DIR/progress.key"
[[ -s "$KEY_FILE" ]] || (umask 077 && head -c 32 /dev/urandom | base64 >"$KEY_FILE")
# The progress endpoint serves TLS, as with the chart: a local CA and a certificate it signs for
# 127.0.0.1; the operator hands the CA to the job's pods, whose trainer verifies the endpoint.
TLS_DIR="$DEMO_DIR/progress-tls"
if [[ ! -s "$TLS_DIR/tls.crt" ]]; then
  mkdir -p "$TLS_DIR"
  (umask 077
   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
     -subj "/CN=dinoflow demo progress CA" -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" \
     -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
   openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=dinoflow-operator" \
     -keyout "$TLS_DIR/tls.key" -out "$TLS_DIR/tls.csr" 2>/dev/null
   openssl x509 -req -in "$TLS_DIR/tls.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
     -CAcreateserial -days 3650 -out "$TLS_DIR/tls.crt" \
     -extfile <(printf '%s\n' "subjectAltName=IP:127.0.0.1" "extendedKeyUsage=serverAuth") 2>/dev/null
   rm -f "$TLS_DIR/tls.csr" "$TLS_DIR/ca.srl") || die "openssl could not make the demo's TLS files"
fi
PROGRESS_ADDR="127.0.0.1:$(free_port)"
log "starting the operator (progress endpoint https://$PROGRESS_ADDR; log ${DEMO_DIR#"$ROOT"/}/operator.log)"
"$BIN/dinoflow-operator" --kubeconfig "$KUBECONFIG" --progress-key-file "$KEY_FILE" \
  --progress-addr "$PROGRESS_ADDR" --progress-endpoint "https://$PROGRESS_ADDR" \
  --progress-tls-cert-file "$TLS_DIR/tls.crt" --progress-tls-key-file "$TLS_DIR/tls.key" \
  --progress-tls-ca-file "$TLS_DIR/ca.crt" \
  --health-addr "127.0.0.1:$(free_port)" --log-format text >"$DEMO_DIR/operator.log" 2>&1 &
pids+=("$!")

AGENT_LOG="$DEMO_DIR/node-agent.log"
log "starting the node agent (pods run as local processes; log ${AGENT_LOG#"$ROOT"/})"
"$BIN/dinoflow-node-agent" --kubeconfig "$KUBECONFIG" --node-name dinoflow-local \
  --root "$DEMO_DIR/node" --binary "dinoflow-trainer=$BIN/dinoflow-trainer" >"$AGENT_LOG" 2>&1 &
agent=$!
pids+=("$agent")
agent_start=$SECONDS
until grep -q 'node dinoflow-local ready' "$AGENT_LOG"; do
  kill -0 "$agent" 2>/dev/null || { cat "$AGENT_LOG" >&2; die "the node agent exited"; }
  ((SECONDS - agent_start < TIMEOUT)) || die "the node agent did not become ready within ${TIMEOUT} s; see $AGENT_LOG"
  sleep 0.5
done
kubectl get nodes -o wide

# A rerun trains afresh: the previous demo job and its output go first (a trainer finding
# the finished run's checkpoint would resume at the end and report nothing).
kubectl delete pretrainjob "$JOB" --ignore-not-found --wait >/dev/null
rm -rf -- "$OUTPUT"
# The node agent's pods share this host's network: a free rendezvous port and an ephemeral
# metrics port instead of the example's fixed 29500 and 9464, which may be taken here.
OVERRIDE="{\"spec\":{\"training\":{\"optim\":{\"epochs\":2},\"train\":{\"officialEpochLength\":10},\"output\":{\"dir\":\"$OUTPUT\"},\"logging\":{\"metricsPort\":0}},\"cluster\":{\"masterPort\":$(free_port)}}}"
log "applying ${EXAMPLE#"$ROOT"/} with the override $OVERRIDE"
kubectl patch --local -f "$EXAMPLE" --type merge -p "$OVERRIDE" -o yaml | kubectl apply -f -
applied=$SECONDS
echo

log "watching the job until it succeeds (k-NN and linear probe at the start and the end)"
columns='NAME:.metadata.name,PHASE:.status.phase,ITERATION:.status.iteration,TOTAL:.status.totalIterations,LOSS:.status.losses.total,CHECKPOINT:.status.lastCheckpoint.iteration'
last=""
while true; do
  line=$(kubectl get pretrainjob "$JOB" --no-headers -o "custom-columns=$columns")
  [[ "$line" != "$last" ]] && { printf '%s\n' "$line"; last=$line; }
  phase=$(kubectl get pretrainjob "$JOB" -o jsonpath='{.status.phase}')
  [[ "$phase" == Succeeded ]] && break
  if [[ "$phase" == Failed ]]; then
    kubectl describe pretrainjob "$JOB" >&2
    die "the job failed; pod logs: $(find "$DEMO_DIR/node/pods" -name '*.log' | tr '\n' ' ')"
  fi
  if ((SECONDS - applied >= TIMEOUT)); then
    kubectl describe pretrainjob "$JOB" >&2
    die "the job did not succeed within ${TIMEOUT} s; pod logs: $(find "$DEMO_DIR/node/pods" -name '*.log' | tr '\n' ' ')"
  fi
  sleep 2
done
echo
kubectl get pretrainjob "$JOB" -o wide
kubectl get pretrainjob "$JOB" -o jsonpath='{range .status.evaluations[*]}[demo] evaluation {.name} at iteration {.iteration}: {.metrics}{"\n"}{end}'
CHECKPOINT=$(kubectl get pretrainjob "$JOB" -o jsonpath='{.status.lastCheckpoint.path}')
log "checkpoint (verified by the trainer, reported in the job's status): $CHECKPOINT"
log "metrics.jsonl and logs: ${OUTPUT#"$ROOT"/}; pod logs: ${DEMO_DIR#"$ROOT"/}/node/pods"
log "done in $((SECONDS - START - SKEW)) s"
echo
log "cluster still up. To use it: export KUBECONFIG=$KUBECONFIG"
log "to stop it: scripts/cluster.sh down --dir ${CLUSTER_DIR#"$ROOT"/}"
