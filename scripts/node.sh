#!/usr/bin/env bash
# A real Kubernetes node beside a local control plane from scripts/cluster.sh: kubelet,
# containerd (runc, overlayfs), a CNI bridge and CoreDNS serving cluster.local from the API
# server. Settings and the reasons for them: scripts/NODE.md.
#
#   scripts/node.sh up     [--dir DIR] [--label KEY=VALUE]...  start the node, wait until Ready
#   scripts/node.sh down   [--dir DIR]         delete its pods, stop it, remove what it left
#   scripts/node.sh status [--dir DIR]         processes and the Node's Ready condition
#   scripts/node.sh import [--dir DIR] FILE... import oci-archive images into the node's containerd
#   scripts/node.sh tag    [--dir DIR] SOURCE TARGET  give an image in the node a second name
#   scripts/node.sh busybox-image              build (once, cached) a busybox test image as an
#                                              oci-archive; prints its path and image name
#
# DIR is the cluster's directory (default ./out/cluster, as for cluster.sh); the node keeps
# everything in DIR/node: configs, certificates signed by the cluster CA, containerd and kubelet
# state, logs/ and pids/. The Node is named `localhost`. Each node picks its own bridge name,
# private /24, ports and cgroup root, so nodes of several clusters run side by side.
# `scripts/cluster.sh down` runs `down` here first. Pods have no default route: their traffic
# stays on this machine. Binaries come from $DINOFLOW_CACHE/bin (scripts/build-node.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/node.sh"
CACHE="${DINOFLOW_CACHE:-$HOME/.cache/dinoflow}"
BIN="$CACHE/bin"
TIMEOUT="${DINOFLOW_NODE_TIMEOUT:-120}"
NODE_NAME=localhost
COMPONENTS=(containerd coredns kubelet)
PORT_LOCK="${TMPDIR:-/tmp}/dinoflow-cluster-ports.lock"
RUNC="${DINOFLOW_RUNC:-/usr/sbin/runc}"

LOG_TAG=node
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
DIR="$ROOT/out/cluster"
LABELS=()
FILES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="${2:?--dir needs a path}"; shift 2 ;;
    --dir=*) DIR="${1#--dir=}"; shift ;;
    --label) LABELS+=("${2:?--label needs KEY=VALUE}"); shift 2 ;;
    -h | --help) usage ;;
    -*) die "unknown argument '$1' (see: $SELF --help)" ;;
    *) FILES+=("$1"); shift ;;
  esac
done
if [[ -d "$DIR" ]]; then DIR="$(cd "$DIR" && pwd)"; elif [[ "$DIR" != /* ]]; then DIR="$PWD/$DIR"; fi
PKI="$DIR/pki"
N="$DIR/node"
LOGS="$N/logs"
PIDS="$N/pids"
PROC_MARK="$N"
SOCK="$N/containerd.sock"

bin() {
  [[ -x "$BIN/$1" ]] || die "$BIN/$1 not found: run scripts/setup.sh (scripts/build-node.sh builds the node)"
  printf '%s\n' "$BIN/$1"
}
kubectl_admin() { "$(bin kubectl)" --kubeconfig "$DIR/kubeconfig" --request-timeout=10s "$@"; }
# ctr 2.4 takes the socket as a plain absolute path ("unix://PATH" fails its stat check).
ctr_node() { "$(bin ctr)" -a "$SOCK" -n k8s.io "$@"; }

# A private /24 (10.64.0.0-10.127.255.0) that no interface or route on the host already uses.
pick_subnet() {
  local a b tries=0
  while ((tries++ < 200)); do
    a=$((64 + RANDOM % 64)); b=$((RANDOM % 256))
    # Taken when a route other than the default covers it, or an interface has an address in it.
    ip -4 route show to match "10.$a.$b.1" | grep -qv '^default' && continue
    ip -4 -o addr show | grep -q " 10\.$a\.$b\." && continue
    printf '10.%s.%s\n' "$a" "$b"
    return 0
  done
  die "no free private /24 found in 10.64.0.0/10"
}

# --- certificates ----------------------------------------------------------------------------

# sign NAME SUBJECT EKU [SANS]: a key and certificate in $N/pki signed by the cluster CA.
sign() {
  local name=$1 subject=$2 eku=$3 sans=${4:-} d="$N/pki"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/$name.key" 2>/dev/null
  openssl req -new -key "$d/$name.key" -subj "$subject" -out "$d/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$eku"
    [[ -n "$sans" ]] && echo "subjectAltName=$sans"
  } >"$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 -extfile "$d/$name.ext" \
    -out "$d/$name.crt" 2>/dev/null
  rm -f "$d/$name.csr" "$d/$name.ext"
}

# kubeconfig FILE USER CERT: a kubeconfig for the cluster's API server with a $N/pki cert.
kubeconfig() {
  local server
  server=$(awk '/server:/ { print $2; exit }' "$DIR/kubeconfig")
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dinoflow
  cluster:
    server: $server
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $N/pki/$3.crt
    client-key: $N/pki/$3.key
contexts:
- name: dinoflow
  context: {cluster: dinoflow, user: $2}
current-context: dinoflow
EOF
  chmod 600 "$1"
}

# --- images ----------------------------------------------------------------------------------

# buildah with its own storage in a temporary directory: nothing shared with other builds.
# build_image NAME ARCHIVE ROOTFS_DIR ENTRYPOINT_JSON
build_image() {
  local name=$1 archive=$2 rootfs=$3 entrypoint=$4 tmp ctr
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/dinoflow-buildah-XXXXXX")
  local b=(buildah --root "$tmp/root" --runroot "$tmp/run" --storage-driver vfs)
  ctr=$("${b[@]}" from scratch)
  "${b[@]}" copy "$ctr" "$rootfs" / >/dev/null
  "${b[@]}" config --entrypoint "$entrypoint" --cmd '' "$ctr"
  "${b[@]}" commit -q "$ctr" "$name" >/dev/null
  mkdir -p "$(dirname "$archive")"
  rm -f "$archive.tmp"
  "${b[@]}" push -q "$name" "oci-archive:$archive.tmp:$name"
  "${b[@]}" rm -a >/dev/null 2>&1 || true
  "${b[@]}" rmi -a -f >/dev/null 2>&1 || true
  # vfs layers are plain directories, but unmount anything buildah may have left before removal.
  umount -R "$tmp/root" 2>/dev/null || true
  rm -rf "$tmp"
  mv "$archive.tmp" "$archive"
}

pause_image() {
  local pause tag tmp
  pause=$(bin dinoflow-pause)
  tag=$(sha256sum "$pause" | cut -c1-12)
  PAUSE_IMAGE="localhost/dinoflow/pause:$tag"
  PAUSE_ARCHIVE="$CACHE/images/pause-$tag.oci.tar"
  [[ -f "$PAUSE_ARCHIVE" ]] && return 0
  command -v buildah >/dev/null || die "buildah not found: run scripts/setup.sh"
  log "building the pause image $PAUSE_IMAGE"
  tmp=$(mktemp -d)
  install -m 0755 "$pause" "$tmp/pause"
  build_image "$PAUSE_IMAGE" "$PAUSE_ARCHIVE" "$tmp" '["/pause"]'
  rm -rf "$tmp"
}

cmd_busybox_image() {
  local busybox version name archive tmp app
  busybox=$(command -v busybox) || die "busybox not found: run scripts/setup.sh (Debian's busybox-static)"
  # The image has no libc: only a static busybox runs in it.
  if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is dynamically linked: install Debian's busybox-static"; fi
  local applets="awk cat echo grep hostname ip ls nc nslookup ps sh sleep tail"
  # The tag changes with the busybox binary and with the applet list.
  version=$({ sha256sum "$busybox"; echo "$applets"; } | sha256sum | cut -c1-12)
  name="localhost/dinoflow/busybox-test:$version"
  archive="$CACHE/images/busybox-test-$version.oci.tar"
  if [[ ! -f "$archive" ]]; then
    log "building the test image $name"
    tmp=$(mktemp -d)
    mkdir -p "$tmp/bin" "$tmp/tmp" "$tmp/etc"
    install -m 0755 "$busybox" "$tmp/bin/busybox"
    for app in $applets; do ln -s busybox "$tmp/bin/$app"; done
    chmod 1777 "$tmp/tmp"
    build_image "$name" "$archive" "$tmp" '["/bin/sh"]'
    rm -rf "$tmp"
  fi
  printf '%s %s\n' "$archive" "$name"
}

# The API server's port (cluster.sh binds it on every address, so pods reach it at the bridge's
# address; there is no kube-proxy behind the `kubernetes` Service's ClusterIP).
api_port() { awk -F: '/server:/ { print $NF; exit }' "$DIR/kubeconfig"; }

# tag SOURCE TARGET: a second name for an image already in the node (e.g. a new release tag of
# the same archive), as a registry push of a re-tagged image would give.
cmd_tag() {
  [[ ${#FILES[@]} -eq 2 ]] || die "tag needs SOURCE and TARGET image references"
  [[ -S "$SOCK" ]] || die "no node in $DIR (no $SOCK): run $SELF up --dir $DIR"
  ctr_node images tag --force "${FILES[0]}" "${FILES[1]}" >&2
}

cmd_import() {
  [[ ${#FILES[@]} -gt 0 ]] || die "import needs one or more oci-archive files"
  [[ -S "$SOCK" ]] || die "no node in $DIR (no $SOCK): run $SELF up --dir $DIR"
  local f
  for f in "${FILES[@]}"; do
    [[ -f "$f" ]] || die "no such image archive: $f"
    # ctr 2.4 wants the absolute socket path itself (see ctr_node).
    ctr_node images import --snapshotter overlayfs "$f" >&2
  done
}

# --- cgroups, mounts, network namespaces -----------------------------------------------------

cgroup_mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts; }

make_cgroup_root() {
  local m
  for m in $(cgroup_mounts); do
    mkdir -p "$m$CGROUP_ROOT"
    # A new cpuset cgroup starts with no CPUs and no memory nodes: inherit the parent's.
    if [[ -f "$m/cpuset.cpus" && -f "$m$CGROUP_ROOT/cpuset.cpus" ]]; then
      [[ -n "$(<"$m$CGROUP_ROOT/cpuset.cpus")" ]] || cat "$m/cpuset.cpus" >"$m$CGROUP_ROOT/cpuset.cpus"
      [[ -n "$(<"$m$CGROUP_ROOT/cpuset.mems")" ]] || cat "$m/cpuset.mems" >"$m$CGROUP_ROOT/cpuset.mems"
    fi
  done
}

# Every process in the node's cgroup tree (the pods' containers).
cgroup_pids() {
  local m
  for m in $(cgroup_mounts); do
    [[ -d "$m$CGROUP_ROOT" ]] && find "$m$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -u
}

remove_cgroups() {
  local m i
  for m in $(cgroup_mounts); do
    [[ -d "$m$CGROUP_ROOT" ]] || continue
    for ((i = 0; i < 20; i++)); do
      find "$m$CGROUP_ROOT" -depth -type d -exec rmdir {} \; 2>/dev/null
      [[ -d "$m$CGROUP_ROOT" ]] || break
      sleep 0.2
    done
    [[ -d "$m$CGROUP_ROOT" ]] && log "could not remove cgroup $m$CGROUP_ROOT"
  done
  return 0
}

# Mount points under $N, deepest first (kubelet's bind mount of its root dir, overlay rootfs,
# shm, network namespaces, projected volumes).
mounts_under() {
  awk -v dir="$N" '{ p = $5; gsub(/\\040/, " ", p); if (p == dir || index(p, dir "/") == 1) print p }' \
    /proc/self/mountinfo | awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-
}

unmount_all() {
  local p i
  for ((i = 0; i < 5; i++)); do
    [[ -z "$(mounts_under)" ]] && return 0
    while IFS= read -r p; do
      [[ -n "$p" ]] && { umount "$p" 2>/dev/null || umount -l "$p" 2>/dev/null || true; }
    done < <(mounts_under)
  done
  [[ -z "$(mounts_under)" ]] || log "mounts left under $N: $(mounts_under | tr '\n' ' ')"
}

# --- configuration ---------------------------------------------------------------------------

write_configs() {
  mkdir -p "$N/cni/conf" "$N/cni/ipam" "$N/containerd" "$N/kubelet" "$N/coredns" "$N/pod-logs" "$N/volume-plugins"
  cat >"$N/containerd/config.toml" <<EOF
version = 3
root = "$N/containerd/root"
state = "$N/containerd/state"
# Plugins that would touch paths shared by every containerd on the host (/opt/containerd, the
# NRI socket) or need what the node does not use.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins.'io.containerd.cri.v1.runtime']
  # Root here lacks CAP_SYS_RESOURCE: lowering the pause container's oom_score_adj to -998
  # fails every sandbox ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  # Network namespaces under the state dir, not the host-wide /var/run/netns.
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$RUNC"
        # runc's state per node, not in the host-wide /run/containerd/runc.
        Root = "$N/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$BIN/cni"]
    conf_dir = "$N/cni/conf"
    max_conf_num = 1

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
  # The bridge is made by `up` (CoreDNS listens on its address before any pod exists); the
  # plugin attaches pods to it. isGateway false: the plugin then leaves the host's ip_forward
  # alone (pods and the host share the /24, nothing is routed). routes []: no default route.
  cat >"$N/cni/conf/10-dinoflow.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$BRIDGE",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$N/cni/ipam",
        "ranges": [[{ "subnet": "$SUBNET.0/24", "rangeStart": "$SUBNET.10", "rangeEnd": "$SUBNET.250", "gateway": "$SUBNET.1" }]],
        "routes": []
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
  cat >"$N/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $N/pki/kubelet-serving.crt
tlsPrivateKeyFile: $N/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$SOCK
imageServiceEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
failCgroupV1: false
failSwapOn: false
# Otherwise the kubelet adds KUBE-FIREWALL rules to the host's INPUT/OUTPUT chains.
makeIPTablesUtilChains: false
clusterDomain: cluster.local
clusterDNS: [$SUBNET.1]
resolvConf: /etc/resolv.conf
podLogsDir: $N/pod-logs
volumePluginDir: $N/volume-plugins
serializeImagePulls: false
# A small shared disk: evict only when nearly full, never garbage-collect the test's images.
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
EOF
  cat >"$N/coredns/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 {
    bind $SUBNET.1
    errors
    ready 127.0.0.1:$COREDNS_READY_PORT
    kubernetes cluster.local in-addr.arpa {
        kubeconfig $N/coredns/kubeconfig dinoflow
        pods disabled
        ttl 5
    }
}
EOF
}

# RBAC of the node's non-node clients: the API server's kubelet client may use the kubelet API
# (logs, exec), CoreDNS may read what it serves. Applied to the cluster at every `up`.
apply_rbac() {
  kubectl_admin apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "dinoflow:apiserver-kubelet-client"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kubelet-api-admin"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "dinoflow:coredns"}
rules:
- {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "dinoflow:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "dinoflow:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "dinoflow:coredns"}
EOF
}

# --- commands --------------------------------------------------------------------------------

fail_up() {
  printf '[node] error: %s\n' "$1" >&2
  local c
  for c in "${COMPONENTS[@]}"; do
    if [[ -s "$LOGS/$c.log" ]]; then
      printf '[node] --- last lines of %s ---\n' "$LOGS/$c.log" >&2
      tail -n 15 "$LOGS/$c.log" >&2
    fi
  done
  cmd_down >&2 || true
  exit 1
}

node_ready() {
  [[ "$(kubectl_admin get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

cmd_up() {
  [[ -f "$DIR/cluster.env" && -f "$PKI/ca.key" ]] || die "no cluster in $DIR: run scripts/cluster.sh up --dir $DIR first"
  [[ -f "$PKI/apiserver-kubelet-client.crt" ]] ||
    die "the cluster in $DIR predates kubelet client certificates: restart it (scripts/cluster.sh down/up)"
  local c
  for c in kubelet containerd containerd-shim-runc-v2 ctr coredns dinoflow-pause cni/bridge cni/host-local cni/loopback cni/portmap; do bin "$c" >/dev/null; done
  [[ -x "$RUNC" ]] || die "$RUNC not found: run scripts/setup.sh (Debian's runc)"
  [[ $(id -u) -eq 0 ]] || die "the node needs root (containers, mounts, the bridge, cgroups)"
  if [[ -f "$N/node.env" ]] && owned_pid kubelet >/dev/null && node_ready; then
    log "already up in $N"
    return 0
  fi
  cmd_down 2>/dev/null || true
  # Any failure from here on (set -e included) leaves nothing behind.
  trap 'rc=$?; if [[ $rc -ne 0 ]]; then cmd_down >&2 || true; fi' EXIT
  local start=$SECONDS
  mkdir -p "$N/pki" "$LOGS" "$PIDS" "$N/kubelet" "$N/coredns"
  chmod 700 "$N/pki"
  pause_image

  exec 9>"$PORT_LOCK"
  flock -w 300 9 || die "could not take the port lock $PORT_LOCK within 300 s"
  KUBELET_PORT=$(pick_port)
  KUBELET_HEALTHZ_PORT=$(pick_port)
  COREDNS_READY_PORT=$(pick_port)
  SUBNET=$(pick_subnet)
  local id
  id=$(printf '%s' "$DIR" | sha256sum | cut -c1-8)
  BRIDGE="dfn$id"
  CGROUP_ROOT="/dinoflow-node-$id"
  ip link add name "$BRIDGE" type bridge
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  flock -u 9
  exec 9>&-
  cat >"$N/node.env" <<EOF
BRIDGE=$BRIDGE
SUBNET=$SUBNET.0/24
DNS_IP=$SUBNET.1
CGROUP_ROOT=$CGROUP_ROOT
KUBELET_PORT=$KUBELET_PORT
KUBELET_HEALTHZ_PORT=$KUBELET_HEALTHZ_PORT
COREDNS_READY_PORT=$COREDNS_READY_PORT
CONTAINERD_SOCKET=$SOCK
PAUSE_IMAGE=$PAUSE_IMAGE
APISERVER_HOST=$SUBNET.1
APISERVER_PORT=$(api_port)
EOF
  make_cgroup_root

  sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  sign kubelet-serving "/CN=$NODE_NAME" serverAuth "DNS:$NODE_NAME,IP:127.0.0.1"
  sign coredns "/CN=dinoflow:coredns" clientAuth
  kubeconfig "$N/kubelet/kubeconfig" "system:node:$NODE_NAME" kubelet
  kubeconfig "$N/coredns/kubeconfig" "dinoflow:coredns" coredns
  write_configs
  apply_rbac

  log "starting containerd ($SOCK)"
  # The shim is looked up on PATH.
  start_component containerd env PATH="$BIN:$PATH" "$(bin containerd)" --config "$N/containerd/config.toml"
  local deadline=$((SECONDS + TIMEOUT))
  until [[ -S "$SOCK" ]] && ctr_node version >/dev/null 2>&1; do
    started_alive containerd || fail_up "containerd exited during start-up"
    ((SECONDS < deadline)) || fail_up "containerd did not answer on $SOCK within ${TIMEOUT} s"
    sleep 0.2
  done
  FILES=("$PAUSE_ARCHIVE")
  cmd_import || fail_up "importing the pause image $PAUSE_ARCHIVE failed"

  log "starting CoreDNS on $SUBNET.1:53 and the kubelet (:$KUBELET_PORT, bridge $BRIDGE, $SUBNET.0/24)"
  start_component coredns "$(bin coredns)" -conf "$N/coredns/Corefile"
  local labels=()
  if [[ ${#LABELS[@]} -gt 0 ]]; then labels=(--node-labels "$(IFS=,; echo "${LABELS[*]}")"); fi
  start_component kubelet "$(bin kubelet)" --config "$N/kubelet/config.yaml" \
    --kubeconfig "$N/kubelet/kubeconfig" --root-dir "$N/kubelet/root" \
    --hostname-override "$NODE_NAME" "${labels[@]}" --v 1

  until node_ready; do
    started_alive kubelet || fail_up "the kubelet exited during start-up"
    started_alive coredns || fail_up "CoreDNS exited during start-up"
    ((SECONDS < deadline)) || fail_up "node $NODE_NAME not Ready within ${TIMEOUT} s"
    sleep 0.5
  done
  until [[ "$(curl -sS --max-time 2 "http://127.0.0.1:$COREDNS_READY_PORT/ready" 2>/dev/null)" == OK ]]; do
    started_alive coredns || fail_up "CoreDNS exited during start-up"
    ((SECONDS < deadline)) || fail_up "CoreDNS not ready within ${TIMEOUT} s"
    sleep 0.3
  done
  log "node $NODE_NAME Ready in $((SECONDS - start)) s; logs in $LOGS/"
}

cmd_down() {
  [[ -d "$N" ]] || { log "down: no node in $DIR"; return 0; }
  mkdir -p "$PIDS"
  BRIDGE=""; CGROUP_ROOT=""
  # shellcheck source=/dev/null
  [[ -f "$N/node.env" ]] && source "$N/node.env"
  # Pods first, through the kubelet while it runs: it stops their sandboxes (CNI DEL releases
  # the addresses and veths, the network namespaces go).
  if owned_pid kubelet >/dev/null && [[ -f "$DIR/kubeconfig" ]]; then
    kubectl_admin delete pods --all-namespaces --field-selector "spec.nodeName=$NODE_NAME" \
      --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 100; i++)); do
      [[ -z "$(ctr_node tasks ls -q 2>/dev/null)" ]] && break
      # A task listed as STOPPED is done; only running ones keep us waiting.
      ctr_node tasks ls 2>/dev/null | awk 'NR > 1 && $3 != "STOPPED" { r = 1 } END { exit !r }' || break
      sleep 0.2
    done
  fi
  stop_component kubelet
  stop_component coredns
  # Whatever still runs in the node's cgroups (a pod the kubelet had no time for).
  if [[ -n "$CGROUP_ROOT" ]]; then
    local pid
    for pid in $(cgroup_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  if owned_pid containerd >/dev/null; then
    local t
    for t in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks delete -f "$t" >/dev/null 2>&1 || true; done
  fi
  stop_component containerd
  # Shims outlive containerd by design; ours name our socket on their command line.
  local p
  for p in /proc/[0-9]*; do
    [[ -r "$p/cmdline" ]] || continue
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $SOCK "; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  unmount_all
  # The shims' socket dir is fixed (/run/containerd/s); remove it only when no other node uses it.
  rmdir /run/containerd/s /run/containerd 2>/dev/null || true
  if [[ -n "$BRIDGE" ]] && ip link show "$BRIDGE" >/dev/null 2>&1; then
    # Deleting the bridge leaves the veths of pods whose sandbox was never stopped: remove them.
    local veth
    for veth in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }'); do
      ip link del "$veth" 2>/dev/null || true
    done
    ip link del "$BRIDGE"
    log "removed bridge $BRIDGE"
  fi
  [[ -n "$CGROUP_ROOT" ]] && remove_cgroups
  if [[ -n "$(mounts_under)" ]]; then
    log "down: kept $N (mounts left)"
    return 1
  fi
  rm -rf -- "$N"
  log "down: no process of the node in $DIR left; removed $N"
}

cmd_status() {
  local c pid rc=0
  for c in "${COMPONENTS[@]}"; do
    if pid=$(owned_pid "$c"); then
      printf '%-12s running (pid %s), log %s\n' "$c" "$pid" "$LOGS/$c.log"
    else
      printf '%-12s stopped\n' "$c"
      rc=1
    fi
  done
  if node_ready; then printf '%-12s Ready\n' "node/$NODE_NAME"; else printf '%-12s not Ready\n' "node/$NODE_NAME"; rc=1; fi
  return "$rc"
}

case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  import) cmd_import ;;
  tag) cmd_tag ;;
  busybox-image) cmd_busybox_image ;;
  -h | --help | help) usage ;;
  *) die "unknown command '$cmd': use up, down, status, import, tag or busybox-image" ;;
esac
