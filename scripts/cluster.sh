#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 for the demo and the end-to-end tests:
# etcd, kube-apiserver (TLS, client certificates, RBAC, service-account keys),
# kube-controller-manager (garbage collector, service accounts, ...) and kube-scheduler.
#
#   scripts/cluster.sh up     [--dir DIR] [--owner-pid PID] [--ephemeral]   start, wait until ready
#   scripts/cluster.sh down   [--dir DIR]                     stop what `up` started in DIR
#   scripts/cluster.sh status [--dir DIR]                     processes and /readyz; exit 1 if not ready
#   scripts/cluster.sh env    [--dir DIR]                     print `export KUBECONFIG=...`
#   scripts/cluster.sh install-crds [--dir DIR] FILE...       apply CRDs server-side, wait until Established
#
# DIR (default ./out/cluster) holds everything of one cluster: pki/, etcd data, kubeconfigs,
# logs/<component>.log and pids/<component>.pid. Each cluster picks free ports, so several
# can run side by side in different dirs. With --owner-pid, a watchdog stops the cluster when
# that process exits (tests use it so a crashed test run leaves nothing behind); with
# --ephemeral, `down` also deletes DIR.
# Binaries come from $DINOFLOW_CACHE/bin (scripts/setup.sh builds them), else from PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/cluster.sh"
CACHE="${DINOFLOW_CACHE:-$HOME/.cache/dinoflow}"
TIMEOUT="${DINOFLOW_CLUSTER_TIMEOUT:-120}"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)
# A lock shared by every cluster on the machine: held from choosing ports until they are bound,
# so two clusters starting at once cannot pick the same port.
PORT_LOCK="${TMPDIR:-/tmp}/dinoflow-cluster-ports.lock"

# Progress goes to stderr (lib.sh's log) so that stdout carries only the `export` line:
# eval "$(cluster.sh up)".
LOG_TAG=cluster
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
DIR="$ROOT/out/cluster"
OWNER_PID=""
EPHEMERAL=false
FILES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="${2:?--dir needs a path}"; shift 2 ;;
    --dir=*) DIR="${1#--dir=}"; shift ;;
    --owner-pid) OWNER_PID="${2:?--owner-pid needs a pid}"; shift 2 ;;
    --ephemeral) EPHEMERAL=true; shift ;;
    -h | --help) usage ;;
    -*) die "unknown argument '$1' (see: $SELF --help)" ;;
    *) FILES+=("$1"); shift ;;
  esac
done
[[ "$cmd" == up ]] && mkdir -p "$DIR"
if [[ -d "$DIR" ]]; then DIR="$(cd "$DIR" && pwd)"; elif [[ "$DIR" != /* ]]; then DIR="$PWD/$DIR"; fi
PKI="$DIR/pki"
LOGS="$DIR/logs"
PIDS="$DIR/pids"
PROC_MARK="$DIR"
KUBECONFIG_ADMIN="$DIR/kubeconfig"

find_bin() {
  local name=$1
  if [[ -x "$CACHE/bin/$name" ]]; then
    printf '%s\n' "$CACHE/bin/$name"
  elif command -v "$name" >/dev/null; then
    command -v "$name"
  else
    die "$name not found in $CACHE/bin or PATH: run scripts/setup.sh (it builds the control plane)"
  fi
}

wait_listening() {
  local name=$1 port=$2 i
  for ((i = 0; i < TIMEOUT * 10; i++)); do
    port_in_use "$port" && return 0
    started_alive "$name" || fail_up "$name exited before listening on port $port"
    sleep 0.1
  done
  fail_up "$name did not listen on port $port within ${TIMEOUT} s"
}

# --- certificates and kubeconfigs ------------------------------------------------------------

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign_cert NAME SUBJECT EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
sign_cert() {
  local name=$1 subject=$2 eku=$3 sans=${4:-}
  new_key "$PKI/$name.key"
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$eku"
    echo "authorityKeyIdentifier=keyid"
    [[ -n "$sans" ]] && echo "subjectAltName=$sans"
  } >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 -extfile "$PKI/$name.ext" \
    -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

make_pki() {
  [[ -f "$PKI/.complete" ]] && return 0
  log "creating certificates in $PKI (CA, apiserver serving, client certs, service-account keys)"
  rm -rf "$PKI"
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  new_key "$PKI/ca.key"
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=dinoflow-local-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$PKI/ca.crt" 2>/dev/null
  sign_cert apiserver "/CN=kube-apiserver" serverAuth \
    "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign_cert admin "/O=system:masters/CN=dinoflow-admin" clientAuth
  sign_cert controller-manager "/CN=system:kube-controller-manager" clientAuth
  sign_cert scheduler "/CN=system:kube-scheduler" clientAuth
  # Front-proxy (aggregation) client: with requestheader settings published, the
  # controller-manager and scheduler find a complete extension-apiserver-authentication
  # ConfigMap; without them they retry with backoff for minutes before serving.
  sign_cert front-proxy-client "/CN=front-proxy-client" clientAuth
  # Service-account tokens are signed with this pair (ES256).
  new_key "$PKI/sa.key"
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  touch "$PKI/.complete"
}

# The API server's client certificate for kubelets (logs, exec, port-forward): a real node
# (scripts/node.sh) then authenticates it by certificate and authorizes it by webhook instead of
# allowing anonymous access. Made apart from make_pki so that clusters created before it get it.
make_kubelet_client_cert() {
  [[ -f "$PKI/apiserver-kubelet-client.crt" ]] && return 0
  sign_cert apiserver-kubelet-client "/O=dinoflow:kubelet-api/CN=kube-apiserver-kubelet-client" clientAuth
}

# write_kubeconfig FILE USER CERT_NAME SERVER
write_kubeconfig() {
  local file=$1 user=$2 cert=$3 server=$4
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dinoflow
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$cert.crt")
    client-key-data: $(base64 -w0 "$PKI/$cert.key")
contexts:
- name: dinoflow
  context:
    cluster: dinoflow
    user: $user
current-context: dinoflow
EOF
  chmod 600 "$file"
}

# --- health ----------------------------------------------------------------------------------

kubectl_admin() { "$(find_bin kubectl)" --kubeconfig "$KUBECONFIG_ADMIN" --request-timeout=5s "$@"; }

apiserver_ready() { [[ "$(kubectl_admin get --raw /readyz 2>/dev/null)" == "ok" ]]; }

healthz_ok() { [[ "$(curl -ksS --max-time 3 "https://127.0.0.1:$1/healthz" 2>/dev/null)" == "ok" ]]; }

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do owned_pid "$c" >/dev/null || return 1; done
}

cluster_ready() {
  [[ -f "$DIR/cluster.env" ]] || return 1
  # shellcheck source=/dev/null
  source "$DIR/cluster.env"
  all_running && apiserver_ready && healthz_ok "$CONTROLLER_MANAGER_PORT" && healthz_ok "$SCHEDULER_PORT"
}

fail_up() {
  printf '[cluster] error: %s\n' "$1" >&2
  local c
  for c in "${COMPONENTS[@]}"; do
    if [[ -s "$LOGS/$c.log" ]]; then
      printf '[cluster] --- last lines of %s ---\n' "$LOGS/$c.log" >&2
      tail -n 15 "$LOGS/$c.log" >&2
    fi
  done
  cmd_down >&2
  exit 1
}

# --- commands --------------------------------------------------------------------------------

cmd_up() {
  local etcd apiserver cm scheduler
  etcd=$(find_bin etcd)
  apiserver=$(find_bin kube-apiserver)
  cm=$(find_bin kube-controller-manager)
  scheduler=$(find_bin kube-scheduler)
  find_bin kubectl >/dev/null
  command -v openssl >/dev/null || die "openssl not found: run scripts/setup.sh"
  command -v curl >/dev/null || die "curl not found: run scripts/setup.sh"

  if cluster_ready; then
    log "already up in $DIR"
    start_watchdog
    cmd_env
    return 0
  fi
  # Half-running from an earlier attempt: start clean (data in etcd is kept).
  cmd_down 2>/dev/null
  local start=$SECONDS
  mkdir -p "$LOGS" "$PIDS" "$DIR/etcd" "$DIR/certs"
  chmod 700 "$DIR/etcd"
  if [[ "$EPHEMERAL" == true ]]; then touch "$DIR/.ephemeral"; fi
  make_pki
  make_kubelet_client_cert

  exec 9>"$PORT_LOCK"
  flock -w 300 9 || die "could not take the port lock $PORT_LOCK within 300 s"
  local etcd_port etcd_peer_port api_port cm_port sched_port
  etcd_port=$(pick_port)
  etcd_peer_port=$(pick_port)
  api_port=$(pick_port)
  cm_port=$(pick_port)
  sched_port=$(pick_port)
  cat >"$DIR/cluster.env" <<EOF
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$etcd_peer_port
APISERVER_PORT=$api_port
CONTROLLER_MANAGER_PORT=$cm_port
SCHEDULER_PORT=$sched_port
EOF
  local server="https://127.0.0.1:$api_port"
  write_kubeconfig "$KUBECONFIG_ADMIN" dinoflow-admin admin "$server"
  write_kubeconfig "$DIR/kubeconfig-controller-manager" system:kube-controller-manager controller-manager "$server"
  write_kubeconfig "$DIR/kubeconfig-scheduler" system:kube-scheduler scheduler "$server"

  log "starting etcd (:$etcd_port), kube-apiserver (:$api_port), kube-controller-manager (:$cm_port), kube-scheduler (:$sched_port)"
  # The endpoint reconciler refuses a loopback address for the `kubernetes` Service, and
  # nothing here routes Service IPs anyway: --endpoint-reconciler-type none on the apiserver.
  # --unsafe-no-fsync: a throwaway test cluster does not need durable writes, and fsync on
  # a shared VM disk slows every API write.
  start_component etcd "$etcd" --name dinoflow --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "dinoflow=http://127.0.0.1:$etcd_peer_port" \
    --log-level warn --unsafe-no-fsync
  # All addresses (as kubeadm does), not only 127.0.0.1: pods of the real node (scripts/node.sh)
  # reach the API server at the node's bridge address, which is made after the API server
  # starts. Every request still needs TLS and a client certificate or token (RBAC); anonymous
  # requests get only the public health and version endpoints.
  start_component kube-apiserver "$apiserver" \
    --bind-address 0.0.0.0 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --requestheader-client-ca-file "$PKI/ca.crt" --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true --profiling=false \
    --endpoint-reconciler-type none \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" --kubelet-certificate-authority "$PKI/ca.crt"
  if [[ -n "$OWNER_PID" ]]; then start_watchdog; fi

  wait_listening etcd "$etcd_port"
  wait_listening kube-apiserver "$api_port"
  # The controller-manager and scheduler exit at once if their RBAC roles are not there yet:
  # start them only when /readyz says the bootstrap policy is in place.
  local deadline=$((SECONDS + TIMEOUT)) c
  until apiserver_ready; do
    for c in etcd kube-apiserver; do owned_pid "$c" >/dev/null || fail_up "$c exited during start-up"; done
    ((SECONDS < deadline)) || fail_up "kube-apiserver /readyz not ok within ${TIMEOUT} s"
    sleep 0.3
  done
  log "kube-apiserver ready after $((SECONDS - start)) s; starting kube-controller-manager and kube-scheduler"
  local common=(--bind-address 127.0.0.1 --leader-elect=false --profiling=false)
  start_component kube-controller-manager "$cm" "${common[@]}" --secure-port "$cm_port" \
    --kubeconfig "$DIR/kubeconfig-controller-manager" \
    --authentication-kubeconfig "$DIR/kubeconfig-controller-manager" \
    --authorization-kubeconfig "$DIR/kubeconfig-controller-manager" \
    --cert-dir "$DIR/certs/controller-manager" \
    --controllers '*' --use-service-account-credentials=true \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --cluster-name dinoflow
  start_component kube-scheduler "$scheduler" "${common[@]}" --secure-port "$sched_port" \
    --kubeconfig "$DIR/kubeconfig-scheduler" \
    --authentication-kubeconfig "$DIR/kubeconfig-scheduler" \
    --authorization-kubeconfig "$DIR/kubeconfig-scheduler" \
    --cert-dir "$DIR/certs/scheduler"
  wait_listening kube-controller-manager "$cm_port"
  wait_listening kube-scheduler "$sched_port"
  flock -u 9
  exec 9>&-

  until healthz_ok "$cm_port" && healthz_ok "$sched_port"; do
    ((SECONDS < deadline)) || fail_up "controller-manager or scheduler /healthz not ok within ${TIMEOUT} s"
    sleep 0.5
  done
  log "controller-manager and scheduler healthy after $((SECONDS - start)) s"
  # Pods need the namespace's default service account, made by the controller-manager.
  until kubectl_admin get serviceaccount default -n default >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail_up "the controller-manager did not create serviceaccount default/default within ${TIMEOUT} s"
    sleep 0.5
  done
  log "ready in $((SECONDS - start)) s: $server, logs in $LOGS/"
  cmd_env
}

start_watchdog() {
  [[ -n "$OWNER_PID" ]] || return 0
  kill -0 "$OWNER_PID" 2>/dev/null || die "--owner-pid $OWNER_PID is not running"
  stop_component watchdog >/dev/null
  # The command line names $DIR so owned_pid recognises the watchdog like the other components.
  # shellcheck disable=SC2016 # the inner script's $1.. are its own arguments
  setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec bash "$2" down --dir "$3"' \
    dinoflow-cluster-watchdog "$OWNER_PID" "$SELF" "$DIR" </dev/null >>"$LOGS/watchdog.log" 2>&1 9>&- &
  printf '%s\n' "$!" >"$PIDS/watchdog.pid"
}

cmd_down() {
  local c
  mkdir -p "$PIDS"
  # Watchdog first so it does not race us; then the reverse of the start order.
  stop_component watchdog
  # A real node beside the cluster (scripts/node.sh) goes first: its pods, mounts, bridge, cgroups.
  if [[ -d "$DIR/node" ]]; then bash "$ROOT/scripts/node.sh" down --dir "$DIR" || log "node down failed (see above)"; fi
  for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_component "$c"; done
  if [[ -f "$DIR/.ephemeral" ]]; then
    rm -rf -- "$DIR"
    log "down: no process of $DIR left; removed it (--ephemeral)"
  else
    log "down: no process of $DIR left"
  fi
}

cmd_status() {
  local c pid rc=0
  for c in "${COMPONENTS[@]}"; do
    if pid=$(owned_pid "$c"); then
      printf '%-24s running (pid %s), log %s\n' "$c" "$pid" "$LOGS/$c.log"
    else
      printf '%-24s stopped\n' "$c"
      rc=1
    fi
  done
  if [[ $rc -eq 0 ]] && apiserver_ready; then
    printf '%-24s ok (KUBECONFIG=%s)\n' "/readyz" "$KUBECONFIG_ADMIN"
  else
    printf '%-24s not ready\n' "/readyz"
    rc=1
  fi
  return "$rc"
}

cmd_env() {
  [[ -f "$KUBECONFIG_ADMIN" ]] || die "no cluster in $DIR: run $SELF up --dir $DIR"
  printf 'export KUBECONFIG=%q\n' "$KUBECONFIG_ADMIN"
}

# `kubectl wait` fails at once ("<nil> is of the type <nil>") on a CRD the API server has not
# yet given a status, so each wait is retried until the CRD has conditions.
cmd_install_crds() {
  [[ ${#FILES[@]} -gt 0 ]] || die "install-crds needs one or more CRD files"
  [[ -f "$KUBECONFIG_ADMIN" ]] || die "no cluster in $DIR: run $SELF up --dir $DIR"
  local f i
  for f in "${FILES[@]}"; do
    kubectl_admin apply --server-side --force-conflicts -f "$f" >&2
    for i in $(seq 30); do
      kubectl_admin wait --for=condition=Established --timeout=60s -f "$f" >/dev/null 2>&1 && break
      [[ $i -eq 30 ]] && { kubectl_admin wait --for=condition=Established -f "$f" >&2; die "$f never became Established"; }
      sleep 1
    done
  done
}

case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  install-crds) cmd_install_crds ;;
  -h | --help | help) usage ;;
  *) die "unknown command '$cmd': use up, down, status, env or install-crds" ;;
esac
