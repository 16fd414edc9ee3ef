#!/usr/bin/env bash
# The main job on a local default (README's first command), through the production path: set
# up, build the images (scripts/images.sh), start the local control plane in out/cluster with
# its real node (scripts/node.sh: kubelet, containerd, CNI, CoreDNS) and import the images
# into it, `helm install` the chart (the operator runs as a pod from its image, under the
# chart's ServiceAccount and RBAC), provide the dataset and an output directory as
# PersistentVolumes, `kubectl apply` the tiny CPU example job, watch `kubectl get
# pretrainjobs` until it succeeds, and print where its checkpoint is.
# The example is applied with a visible override (shown below): 2 epochs of 10 iterations
# instead of 6 of 50, the dataset and output on the PersistentVolumeClaims. The cluster, its
# node and the release stay up afterwards for kubectl (`scripts/cluster.sh down` stops them).
# Needs root (the node).
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
JOB_NS=default
RELEASE=dinoflow
OPERATOR_NS=dinoflow-system
DATASET=/usr/share/datasets/fashion-mnist
# Each wait (operator ready, job succeeded) gets this many seconds from its own start.
TIMEOUT="${DINOFLOW_DEMO_TIMEOUT:-900}"
[[ -f "$EXAMPLE" ]] || die "$EXAMPLE is missing"
[[ -f "$DATASET/train-images-idx3-ubyte.gz" ]] || die "no $DATASET (scripts/setup.sh installs dataset-fashion-mnist)"
[[ $EUID -eq 0 ]] || die "the local node (kubelet, containerd) needs root"
mkdir -p "$DEMO_DIR"
OUTPUT="$(cd "$DEMO_DIR" && pwd)/output"

log "building the trainer and the operator"
built_from=$SECONDS
# One package per build, as the tests build them: building them together unifies their
# dependencies' features differently and would recompile them.
cargo build -q -p dinoflow-trainer --bin dinoflow-trainer
cargo build -q -p dinoflow-operator --bin dinoflow-operator
BIN="$CARGO_TARGET_DIR/debug"
log "built in $((SECONDS - built_from)) s; building the images (cached while the binaries are unchanged)"
declare -A ARCHIVE=()
while read -r ref archive; do ARCHIVE[$ref]=$archive; done < <(bash scripts/images.sh --bin-dir "$BIN")
VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/dinoflow/Chart.yaml)"
OPERATOR_IMAGE="ghcr.io/dinoflow/dinoflow-operator:$VERSION"
TRAINER_IMAGE="ghcr.io/dinoflow/dinoflow-trainer:$VERSION-cpu"
for ref in "$OPERATOR_IMAGE" "$TRAINER_IMAGE"; do
  [[ -n "${ARCHIVE[$ref]:-}" ]] || die "scripts/images.sh built no $ref"
done

log "local control plane and its node in ${CLUSTER_DIR#"$ROOT"/}"
eval "$(bash scripts/cluster.sh up --dir "$CLUSTER_DIR")"
export KUBECONFIG
bash scripts/node.sh up --dir "$CLUSTER_DIR"
log "importing the images into the node (no registry: imagePullPolicy Never)"
bash scripts/node.sh import --dir "$CLUSTER_DIR" "${ARCHIVE[$OPERATOR_IMAGE]}" "${ARCHIVE[$TRAINER_IMAGE]}"
kubectl get nodes -o wide
# shellcheck source=/dev/null
source "$CLUSTER_DIR/node/node.env"

# The node has no kube-proxy, so the `kubernetes` Service's ClusterIP does not route: the
# operator reaches the API server at the bridge address under a name its certificate has
# (charts/dinoflow values apiServer.*, scripts/NODE.md). Jobs without spec.cluster.image get
# the CPU trainer image.
log "helm install $RELEASE charts/dinoflow (namespace $OPERATOR_NS)"
helm upgrade --install "$RELEASE" charts/dinoflow --namespace "$OPERATOR_NS" --create-namespace \
  --set image.pullPolicy=Never --set trainerImage.tag="$VERSION-cpu" \
  --set apiServer.host=kubernetes.default.svc --set apiServer.port="$APISERVER_PORT" \
  --set apiServer.address="$APISERVER_HOST"
# Ready = the leader with synced caches.
kubectl -n "$OPERATOR_NS" rollout status deployment/dinoflow-operator --timeout="${TIMEOUT}s" ||
  { kubectl -n "$OPERATOR_NS" logs deployment/dinoflow-operator --tail=50 >&2 || true; die "the operator did not become ready within ${TIMEOUT} s"; }
kubectl -n "$OPERATOR_NS" get pods -o wide
log "operator pod ready; leader: $(kubectl -n "$OPERATOR_NS" get lease dinoflow-operator-leader -o jsonpath='{.spec.holderIdentity}')"

# Storage an admin provides (the chart's admission policy refuses hostPath volumes in jobs):
# the dataset read-only and an output directory, each a PersistentVolume bound to its claim.
mkdir -p "$OUTPUT"
chmod 0777 "$OUTPUT" # the trainer runs as uid 1000
volume() { # NAME HOST_DIR ACCESS_MODE
  cat <<YAML
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: demo-$1}
spec:
  capacity: {storage: 1Gi}
  accessModes: [$3]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {namespace: $JOB_NS, name: demo-$1}
  hostPath: {path: "$2", type: Directory}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: demo-$1, namespace: $JOB_NS}
spec:
  accessModes: [$3]
  storageClassName: ""
  volumeName: demo-$1
  resources: {requests: {storage: 1Gi}}
YAML
}
{ volume dataset "$DATASET" ReadOnlyMany; volume output "$OUTPUT" ReadWriteOnce; } | kubectl apply -f -

# A rerun trains afresh: the previous demo job and its output go first (a trainer finding
# the finished run's checkpoint would resume at the end and report nothing).
kubectl -n "$JOB_NS" delete pretrainjob "$JOB" --ignore-not-found --wait >/dev/null
rm -rf -- "${OUTPUT:?}/$JOB"
OVERRIDE='{"spec":{"training":{"optim":{"epochs":2},"train":{"officialEpochLength":10},'
OVERRIDE+='"data":{"path":"/data/train-images-idx3-ubyte.gz","valPath":"/data/t10k-images-idx3-ubyte.gz"},'
OVERRIDE+="\"output\":{\"dir\":\"/output/$JOB\"}},"
OVERRIDE+='"cluster":{"imagePullPolicy":"Never","volumes":['
OVERRIDE+='{"name":"dataset","mountPath":"/data","readOnly":true,"persistentVolumeClaim":{"claimName":"demo-dataset","readOnly":true}},'
OVERRIDE+='{"name":"output","mountPath":"/output","persistentVolumeClaim":{"claimName":"demo-output"}}]}}}'
log "applying ${EXAMPLE#"$ROOT"/} with the override $OVERRIDE"
kubectl patch --local -f "$EXAMPLE" --type merge -p "$OVERRIDE" -o yaml | kubectl -n "$JOB_NS" apply -f -
applied=$SECONDS
echo

pod_logs() {
  local pod
  for pod in $(kubectl -n "$JOB_NS" get pods -l "dinoflow.dev/job=$JOB" -o name); do
    printf -- '--- %s\n' "$pod" >&2
    kubectl -n "$JOB_NS" logs "$pod" --tail=40 >&2 || true
  done
}
log "watching the job until it succeeds (k-NN and linear probe at the start and the end)"
columns='NAME:.metadata.name,PHASE:.status.phase,ITERATION:.status.iteration,TOTAL:.status.totalIterations,LOSS:.status.losses.total,CHECKPOINT:.status.lastCheckpoint.iteration'
last=""
shown_pod=false
while true; do
  line=$(kubectl -n "$JOB_NS" get pretrainjob "$JOB" --no-headers -o "custom-columns=$columns")
  [[ "$line" != "$last" ]] && { printf '%s\n' "$line"; last=$line; }
  phase=$(kubectl -n "$JOB_NS" get pretrainjob "$JOB" -o jsonpath='{.status.phase}')
  if ! $shown_pod && [[ "$phase" == Running ]]; then
    pod=$(kubectl -n "$JOB_NS" get pods -l "dinoflow.dev/job=$JOB" \
      -o jsonpath='{range .items[*]}{.metadata.name} on node {.spec.nodeName}, IP {.status.podIP}, {.status.containerStatuses[0].containerID}{"\n"}{end}')
    [[ "$pod" == *containerd://* ]] && { log "trainer pod $pod"; shown_pod=true; }
  fi
  [[ "$phase" == Succeeded ]] && break
  if [[ "$phase" == Failed ]]; then
    kubectl -n "$JOB_NS" describe pretrainjob "$JOB" >&2
    pod_logs
    die "the job failed"
  fi
  if ((SECONDS - applied >= TIMEOUT)); then
    kubectl -n "$JOB_NS" describe pretrainjob "$JOB" >&2
    pod_logs
    die "the job did not succeed within ${TIMEOUT} s"
  fi
  sleep 2
done
echo
kubectl -n "$JOB_NS" get pretrainjob "$JOB" -o wide
kubectl -n "$JOB_NS" get pretrainjob "$JOB" -o jsonpath='{range .status.evaluations[*]}[demo] evaluation {.name} at iteration {.iteration}: {.metrics}{"\n"}{end}'
CHECKPOINT=$(kubectl -n "$JOB_NS" get pretrainjob "$JOB" -o jsonpath='{.status.lastCheckpoint.path}')
log "checkpoint (verified by the trainer, reported in the job's status): $CHECKPOINT, on this host ${OUTPUT#"$ROOT"/}/${CHECKPOINT#/output/}"
log "metrics.jsonl and logs: ${OUTPUT#"$ROOT"/}/$JOB; trainer log: kubectl logs -l dinoflow.dev/job=$JOB"
log "done in $((SECONDS - START - SKEW)) s"
echo
log "cluster, node and release still up. To use them: export KUBECONFIG=$KUBECONFIG"
log "to stop them: scripts/cluster.sh down --dir ${CLUSTER_DIR#"$ROOT"/}"
