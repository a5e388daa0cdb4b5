# A real Kubernetes node for the local environment: containerd + runc (Debian), a CNI bridge,
# kubelet, kube-scheduler and kube-proxy (built with the API server, see build-k8s.sh). Sourced
# by env.sh, never executed. ../shared/NODE.md (beside the repository) records why each setting
# below is what it is.
#
# Addresses. Everything stays on this machine: the node's address is the gateway address of the
# pods' bridge, which this script creates before anything starts (never the machine's external
# interface; the kernel here has no dummy interfaces). Pods get addresses on that bridge, and
# the API server, Kafka and Redis listen on the node address so that pods can reach them.
#
# The node carries the taint `queueprocessing.dev/node=e2e:NoSchedule`: older tests play the
# kubelet for Deployments that must not really start, so only pods that tolerate the taint (the
# end-to-end tests' chart and QueueProcessors) run here.
#
# Host changes, all undone by `node_cleanup` (env.sh down): the dummy interface and bridge, the
# sysctls the kubelet, kube-proxy and the bridge plugin set (recorded at start, restored at
# stop), kube-proxy's KUBE-* and the CNI plugins' CNI-* iptables chains, the kubepods cgroups,
# network namespaces, mounts under the run directory, and the few paths containerd and the
# kubelet write outside it.

NODE_NAME="qp-node"
POD_BRIDGE="qp-cni0"
POD_CIDR="${QP_POD_CIDR:-10.222.1.0/24}"
POD_GATEWAY="${POD_CIDR%.*}.1"
NODE_IP="$POD_GATEWAY"
SERVICE_CIDR="10.96.0.0/16"
SERVICE_IP_APISERVER="10.96.0.1"
NODE_TAINT="queueprocessing.dev/node=e2e:NoSchedule"
PAUSE_IMAGE="registry.k8s.io/pause:3.10"

NODE_DIR="$QP_RUN/node"
CONTAINERD_SOCK="$NODE_DIR/containerd/containerd.sock"
CNI_CONF_DIR="$NODE_DIR/cni/net.d"
# Sysctls that the node's components change; their original values are restored on `down`.
NODE_SYSCTLS=(vm/overcommit_memory kernel/panic kernel/panic_on_oops net/ipv4/ip_forward
  net/ipv4/conf/all/route_localnet net/bridge/bridge-nf-call-iptables)
# Paths outside the run directory that containerd 1.6 and the kubelet write whatever they are
# told (NODE.md); removed on `down` when this environment created them.
NODE_OUTSIDE_PATHS=(/var/log/containers /var/log/pods /var/lib/kubelet/device-plugins /run/containerd)

ctr_() { ctr -a "$CONTAINERD_SOCK" -n k8s.io "$@"; }

# node_preflight: everything the node needs from the host, as one clear error naming the fix.
node_preflight() {
  [[ $(id -u) -eq 0 ]] || die "the local Kubernetes node needs root (network interfaces, iptables,
  cgroups, mounts). Fix: run as root, or start only what needs no node:
  hack/env.sh up kafka redis prometheus"
  local c
  for c in ip iptables containerd runc ctr; do
    command -v "$c" >/dev/null || die "'$c' is missing (Debian packages containerd runc iproute2 iptables)"
  done
  [[ -x /usr/lib/cni/bridge ]] || die "CNI plugins are missing: apt-get install containernetworking-plugins"
  [[ -d /sys/fs/cgroup/memory || -f /sys/fs/cgroup/cgroup.controllers ]] \
    || die "no cgroup memory controller mounted under /sys/fs/cgroup: the kubelet cannot run pods"
  if ! ip link show "$POD_BRIDGE" >/dev/null 2>&1 && ! ip link add qp-probe0 type bridge 2>/dev/null; then
    die "cannot create a network interface (CAP_NET_ADMIN missing?). Fix: run in a VM or a
  container with CAP_NET_ADMIN and CAP_SYS_ADMIN, or start only: hack/env.sh up kafka redis prometheus"
  fi
  ip link del qp-probe0 2>/dev/null || true
  if [[ -S /run/containerd/containerd.sock ]] || pgrep -x kubelet >/dev/null; then
    running kubelet || die "another containerd or kubelet already runs on this machine (pgrep kubelet;
  /run/containerd/containerd.sock): one node per machine. Fix: stop it (its environment's
  'make env-down'), then retry"
  fi
}

# ---------------------------------------------------------------------------------------------
# Network: the node address and the sysctls.

start_node_network() {
  node_preflight
  mkdir -p "$NODE_DIR"
  # Record the original sysctls once per environment (a second `up` must not record ours).
  if [[ ! -f "$NODE_DIR/sysctl.orig" ]]; then
    local s
    for s in "${NODE_SYSCTLS[@]}"; do
      [[ -f "/proc/sys/$s" ]] && echo "$s=$(cat "/proc/sys/$s")"
    done >"$NODE_DIR/sysctl.orig.tmp"
    mv "$NODE_DIR/sysctl.orig.tmp" "$NODE_DIR/sysctl.orig"
  fi
  # The CNI bridge plugin adopts an existing bridge and its gateway address.
  if ! ip link show "$POD_BRIDGE" >/dev/null 2>&1; then
    ip link add "$POD_BRIDGE" type bridge
    ip addr add "$POD_GATEWAY/${POD_CIDR#*/}" dev "$POD_BRIDGE"
  fi
  ip link set "$POD_BRIDGE" up
  # Pods reach the node address through the bridge gateway (forwarding), and replies between
  # two pods on the bridge pass iptables so that Service NAT is undone.
  echo 1 >/proc/sys/net/ipv4/ip_forward
  [[ -f /proc/sys/net/bridge/bridge-nf-call-iptables ]] && echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
  # A marker file is this service's "process": node_network_up checks the interface.
  touch "$NODE_DIR/network.up"
}

node_network_up() { ip link show "$POD_BRIDGE" >/dev/null 2>&1 && [[ -f "$NODE_DIR/network.up" ]]; }

# ---------------------------------------------------------------------------------------------
# containerd with its own config, sockets and state under the run directory.

start_containerd() {
  node_network_up || die "containerd needs the node network: hack/env.sh start node-network"
  mkdir -p "$NODE_DIR/containerd" "$CNI_CONF_DIR" "$NODE_DIR/cni/ipam"
  cat >"$CNI_CONF_DIR/10-qp.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "qp",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$POD_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CNI
  cat >"$NODE_DIR/containerd/config.toml" <<TOML
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[debug]
  level = "warn"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The VM lacks CAP_SYS_RESOURCE: without this every sandbox fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CNI_CONF_DIR"
TOML
  for p in "${NODE_OUTSIDE_PATHS[@]}"; do
    [[ -e "$p" ]] || echo "$p" >>"$NODE_DIR/created-paths"
  done
  spawn containerd containerd containerd --config "$NODE_DIR/containerd/config.toml"
  wait_for containerd 30 ctr -a "$CONTAINERD_SOCK" version
  import_pause_image
}

# The sandbox ("pause") image: built by hack/image.sh from a tiny static program, never pulled.
import_pause_image() {
  ctr_ images ls -q | grep -qx "$PAUSE_IMAGE" && return 0
  local archive="$QP_ROOT/target/image/pause.oci.tar"
  [[ -f "$archive" ]] || bash "$QP_ROOT/hack/pause-image.sh" --ref "$PAUSE_IMAGE" --output "$archive" >&2
  ctr_ images import --no-unpack=false "$archive" >/dev/null \
    || die "importing $archive into containerd failed"
}

# load_image <oci archive>: make an image available to the node's pods (no registry).
load_image() {
  local archive="$1"
  [[ -f "$archive" ]] || die "no image archive at $archive (build it with: make image)"
  running containerd || die "containerd is not running: make env-up"
  local t=$SECONDS
  ctr_ images import "$archive" >/dev/null || die "importing $archive into containerd failed"
  # The kubelet's eviction manager deletes unused images, the sandbox image included, when the
  # disk runs low (seen here: a full disk left every new pod failing to pull
  # registry.k8s.io/pause). Put it back with every load, so the next pods can start.
  import_pause_image
  log "image $(basename "$archive") imported into the node in $((SECONDS - t))s"
}

# ---------------------------------------------------------------------------------------------
# kubelet, kube-scheduler, kube-proxy

write_component_kubeconfig() {
  # write_component_kubeconfig <file> <token>
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: qp-local
  cluster: {server: "https://$NODE_IP:$PORT_APISERVER", certificate-authority: "$CERTS/ca.crt"}
users:
- name: component
  user: {token: "$2"}
contexts:
- name: qp-local
  context: {cluster: qp-local, user: component}
current-context: qp-local
KC
  chmod 600 "$1"
}

start_kubelet() {
  running containerd || die "the kubelet needs containerd: hack/env.sh start containerd"
  running kube-apiserver || die "the kubelet needs kube-apiserver"
  require_ports kubelet "$PORT_KUBELET" "$PORT_KUBELET_HEALTHZ"
  mkdir -p "$NODE_DIR/kubelet" "$NODE_DIR/pod-logs" "$NODE_DIR/volume-plugins"
  write_component_kubeconfig "$NODE_DIR/kubelet.kubeconfig" "$(secret kubelet_token)"
  cat >"$NODE_DIR/kubelet-config.yaml" <<CFG
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This VM has the hybrid cgroup v1 layout; Kubernetes 1.35 refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
imageServiceEndpoint: unix://$CONTAINERD_SOCK
address: $NODE_IP
port: $PORT_KUBELET
healthzBindAddress: 127.0.0.1
healthzPort: $PORT_KUBELET_HEALTHZ
readOnlyPort: 0
podLogsDir: $NODE_DIR/pod-logs
volumePluginDir: $NODE_DIR/volume-plugins
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $CERTS/ca.crt}
authorization:
  mode: Webhook
# Nothing can be pulled again here, so never collect images.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
# Fast status updates: tests wait for readiness, not for heartbeats.
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 60s
serializeImagePulls: false
maxPods: 60
CFG
  spawn kubelet kubelet "$K8S_BIN/kubelet" --config "$NODE_DIR/kubelet-config.yaml" \
    --kubeconfig "$NODE_DIR/kubelet.kubeconfig" --root-dir "$NODE_DIR/kubelet" \
    --cert-dir "$NODE_DIR/kubelet/pki" --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" \
    --register-with-taints "$NODE_TAINT" --v 1
  wait_for kubelet 60 curl -fsS "http://127.0.0.1:$PORT_KUBELET_HEALTHZ/healthz"
}

start_kube_scheduler() {
  running kube-apiserver || die "kube-scheduler needs kube-apiserver"
  require_ports kube-scheduler "$PORT_SCHEDULER"
  spawn kube-scheduler kube-scheduler "$K8S_BIN/kube-scheduler" \
    --kubeconfig "$KUBECONFIG_FILE" --authentication-kubeconfig "$KUBECONFIG_FILE" \
    --authorization-kubeconfig "$KUBECONFIG_FILE" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$PORT_SCHEDULER" --cert-dir "$CERTS/scheduler" --v 1
  wait_for kube-scheduler 60 curl -fsSk "https://127.0.0.1:$PORT_SCHEDULER/healthz"
}

start_kube_proxy() {
  running kube-apiserver || die "kube-proxy needs kube-apiserver"
  require_ports kube-proxy "$PORT_PROXY_METRICS" "$PORT_PROXY_HEALTHZ"
  # Leave the host's conntrack settings alone (zero = do not touch).
  spawn kube-proxy kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig "$KUBECONFIG_FILE" \
    --hostname-override "$NODE_NAME" --proxy-mode iptables --cluster-cidr "$POD_CIDR" \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 \
    --conntrack-tcp-timeout-close-wait 0 \
    --metrics-bind-address "127.0.0.1:$PORT_PROXY_METRICS" \
    --healthz-bind-address "127.0.0.1:$PORT_PROXY_HEALTHZ" --v 1
  wait_for kube-proxy 60 curl -fsS "http://127.0.0.1:$PORT_PROXY_HEALTHZ/healthz"
}

# The node is Ready once this kubelet has reported it Ready (the Node object, and its last
# status, may survive from an earlier start: a heartbeat from before this call does not count).
wait_node_ready() {
  local kc=("$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE") since
  since="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  node_ready() {
    local ready
    ready="$("${kc[@]}" get node "$NODE_NAME" -o jsonpath='{range .status.conditions[?(@.type=="Ready")]}{.status} {.lastHeartbeatTime}{end}')"
    [[ "${ready%% *}" == True && ! "${ready#* }" < "$since" ]]
  }
  wait_for kubelet 90 node_ready
}

# ---------------------------------------------------------------------------------------------
# Tear-down: pods first (while the kubelet can still stop them), then processes, then the host.

node_delete_pods() {
  running kubelet && running kube-apiserver || return 0
  local kc=("$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE")
  "${kc[@]}" delete pods --all -A --grace-period=5 --wait=false >/dev/null 2>&1 || true
  local deadline=$((SECONDS + 30))
  while ((SECONDS < deadline)); do
    [[ -z "$(ctr_ tasks ls -q 2>/dev/null)" ]] && break
    sleep 0.5
  done
}

# Kill what containerd started in sessions of its own (shims, containers): they outlive
# containerd's process group otherwise.
node_kill_shims() {
  local pid
  for pid in $(pgrep -f "containerd-shim.*-address $CONTAINERD_SOCK" || true); do
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
}

node_cleanup() {
  [[ -d "$NODE_DIR" ]] || return 0
  # Best effort through every step: one thing that is already gone must not stop the rest
  # (`local -` keeps these shell options to this function).
  local -
  set +e +o pipefail
  node_kill_shims
  # kube-proxy's chains, then those of the CNI plugins (portmap, bridge).
  if [[ -x "$K8S_BIN/kube-proxy" ]] && iptables-save 2>/dev/null | grep -q ':KUBE-'; then
    "$K8S_BIN/kube-proxy" --cleanup >>"$LOGS/kube-proxy-cleanup.log" 2>&1 || true
  fi
  local table chain
  for table in filter nat mangle; do
    for chain in $(iptables-save -t "$table" 2>/dev/null | awk '/^:(KUBE|CNI)-/ {print substr($1, 2)}'); do
      iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    # Remove jumps into our chains from the built-in chains, then the chains themselves.
    iptables-save -t "$table" 2>/dev/null | grep -E '^-A [A-Z]+ .*-j (KUBE|CNI)-' | sed 's/^-A /-D /' \
      | while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null || true; done
    for chain in $(iptables-save -t "$table" 2>/dev/null | awk '/^:(KUBE|CNI)-/ {print substr($1, 2)}'); do
      iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
  # Network namespaces of pods, then every mount under the run directory (deepest first).
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do ip netns delete "$ns" 2>/dev/null || true; done
  local m
  for m in $(awk -v d="$NODE_DIR" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for m in $(awk '$2 ~ /^\/run\/containerd\// || $2 ~ /^\/run\/netns\/cni-/ {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  ip link del "$POD_BRIDGE" 2>/dev/null || true
  # The kubelet's cgroups, deepest first, in every hierarchy.
  local d
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d "$d" ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  if [[ -f "$NODE_DIR/sysctl.orig" ]]; then
    local line
    while IFS= read -r line; do echo "${line#*=}" >"/proc/sys/${line%%=*}" 2>/dev/null || true; done <"$NODE_DIR/sysctl.orig"
    # Kept so that `leftovers` can compare the host with what it was.
    cp "$NODE_DIR/sysctl.orig" "$QP_RUN/sysctl.before-node"
  fi
  if [[ -f "$NODE_DIR/created-paths" ]]; then
    local p
    while IFS= read -r p; do rm -rf "$p"; done <"$NODE_DIR/created-paths"
  fi
  rmdir /var/lib/kubelet 2>/dev/null || true
  rm -rf "$NODE_DIR"
}

# node_leftovers: print every trace of the node that `down` should have removed; status 1 if any.
node_leftovers() {
  local -
  set +e +o pipefail
  local found=0 p
  for p in containerd kubelet kube-proxy kube-scheduler containerd-shim; do
    if pgrep -f "$QP_RUN" | xargs -r ps -o comm= -p 2>/dev/null | grep -q "^$p"; then
      echo "process: $p still runs"; found=1
    fi
  done
  if awk -v d="$QP_RUN" 'index($2, d) == 1' /proc/self/mounts | grep -q .; then
    echo "mounts under $QP_RUN:"; awk -v d="$QP_RUN" 'index($2, d) == 1 {print "  " $2}' /proc/self/mounts; found=1
  fi
  if iptables-save 2>/dev/null | grep -qE '^:(KUBE|CNI)-'; then
    echo "iptables chains: $(iptables-save | grep -oE '^:(KUBE|CNI)-[A-Z0-9-]+' | tr '\n' ' ')"; found=1
  fi
  ip link show "$POD_BRIDGE" >/dev/null 2>&1 && { echo "interface: $POD_BRIDGE"; found=1; }
  ls -d /sys/fs/cgroup/*/kubepods 2>/dev/null | sed 's/^/cgroup: /' | grep . && found=1
  ip netns list 2>/dev/null | grep -q '^cni-' && { echo "network namespaces: $(ip netns list | grep '^cni-' | tr '\n' ' ')"; found=1; }
  if [[ -f "$QP_RUN/sysctl.before-node" ]]; then
    local line now
    while IFS= read -r line; do
      now="$(cat "/proc/sys/${line%%=*}" 2>/dev/null || true)"
      [[ "$now" == "${line#*=}" ]] || { echo "sysctl ${line%%=*} = $now (was ${line#*=})"; found=1; }
    done <"$QP_RUN/sysctl.before-node"
  fi
  return $found
}
