#!/usr/bin/env bash
# Starts N real Kubernetes nodes on this machine and the control plane they join:
# per node a real kubelet (v1.33.13), CRI-O (v1.34.0) with conmon, crun and CRIU, and kube-proxy,
# in its own network namespace (veth to the host bridge km-nodes0, own IP, own 127.0.0.1) and its
# own mount namespace over a Debian trixie root. Layout and addresses: nodes/lib.sh.
#
# Usage: nodes/up.sh [N]        (N nodes, default 2, at most 9)
# On success the last line on stdout is `export KUBECONFIG=...`; progress goes to stderr.
# Exit codes: 0 ready; 77 SKIPPED (this machine cannot run real nodes: the reason is printed);
# anything else: a failure (logs in $KUBE_MIGRATE_NODES_DIR/km-node-*/logs, .../cluster/logs).
# Stop everything with nodes/down.sh (also after a failure).
#
# Env:
#   KUBE_MIGRATE_NODES_DIR            state dir [/tmp/kube-migrate-nodes]
#   KUBE_MIGRATE_NODES_APISERVER_PORT the harness's apiserver port [36443]; etcd, controller-manager
#                                     and scheduler use 36379/36380/36257/36259 (never the
#                                     test-kubelet cluster's ports)
#   KUBE_MIGRATE_REGISTRY_CA          a CA file the nodes' CRI-O trusts for the kube-migrate agent's
#                                     registry at 127.0.0.1:5443 (docs/install-cri-o.md) [none]
#   KUBE_MIGRATE_CACHE                binary and root cache (nodes/build.sh, nodes/make-root.sh)
#   KUBE_MIGRATE_EVENTED_PLEG=1       the kubelet's EventedPLEG feature gate (alpha) with CRI-O's
#                                     enable_pod_events: container events instead of the 1 s relist
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
# shellcheck source=nodes/lib.sh
source "$here/lib.sh"
N=${1:-2}
[[ $N =~ ^[1-9]$ ]] || km_die "N must be 1..9, not $N"
skip() { echo "SKIPPED: $*"; exit 77; }

# --- can this machine run real nodes? ---------------------------------------------------------
[[ $(id -u) == 0 ]] || skip "needs root (network and mount namespaces, cgroups, CRIU)"
for t in ip nsenter unshare setsid openssl kubectl python3 gcc flock; do
  command -v "$t" > /dev/null || skip "$t is not installed"
done
probe=km-probe-$$
ip netns add "$probe" 2> /dev/null || skip "cannot create network namespaces (ip netns add)"
ip netns del "$probe"
# The kubelets run with the cgroupfs driver on cgroup v1 controllers (this kind of machine:
# v1 hybrid). A cgroup2-only host would need the harness to give each node a cgroup2 subtree.
[[ -d /sys/fs/cgroup/memory && -d /sys/fs/cgroup/freezer ]] ||
  skip "no cgroup v1 memory/freezer hierarchy (cgroup2-only hosts are not supported by this harness)"

# --- binaries, root, images (cached) ----------------------------------------------------------
mkdir -p "$KM_NODES_DIR"
# (fd 8 is closed for everything started below, which outlives this script)
exec 8> "$KM_NODES_DIR/.lock"
flock -n 8 || km_die "another nodes/up.sh or down.sh holds $KM_NODES_DIR/.lock"
touch "$KM_NODES_DIR/.kube-migrate-nodes"
"$here/build.sh" > /dev/null
eval "$("$here/build.sh" --print-env)"
ROOT=$("$here/make-root.sh")
# CRIU must be able to work on this kernel; `criu check` answers in a fraction of a second.
if ! out=$("$here/../criu/enter.sh" -r "$ROOT" criu check 2>&1); then
  skip "criu check fails in the trixie root: $(tail -n 3 <<< "$out" | tr '\n' ' ')"
fi
IMAGES=$KM_NODES_DIR/images
if [[ ! -s $IMAGES/busybox.oci.tar || ! -s $IMAGES/pause.oci.tar ]]; then
  "$here/images/build.sh" "$ROOT" "$IMAGES" > /dev/null
fi
km_log "binaries, root and images ready"

# --- sysctls the kubelet changes (protectKernelDefaults: false) -------------------------------
# Recorded once, before any kubelet ran, so down.sh can put them back. (The CNI bridge's
# ip_forward and kube-proxy's settings are per network namespace: the nodes' own.)
KM_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
if [[ ! -s $KM_NODES_DIR/sysctl.saved ]]; then
  for s in "${KM_SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done > "$KM_NODES_DIR/sysctl.saved.tmp"
  mv "$KM_NODES_DIR/sysctl.saved.tmp" "$KM_NODES_DIR/sysctl.saved"
fi

# Without CAP_SYS_RESOURCE (some sandboxes) nothing can lower oom_score_adj below 0, and crun
# fails every container the kubelet gives a negative score; the nodes then get a crun wrapper.
CAN_LOWER_OOM=1
if ! (echo -1 > /proc/self/oom_score_adj) 2> /dev/null; then
  CAN_LOWER_OOM=0
  km_log "this machine cannot lower oom_score_adj (no CAP_SYS_RESOURCE): negative container scores are raised to 0 (nodes/conf/crun-clamp-oom)"
fi

# --- host network ------------------------------------------------------------------------------
if ! ip link show "$KM_BRIDGE" > /dev/null 2>&1; then
  if ip -o addr show | grep -q " $KM_NET_PREFIX\."; then km_die "$KM_NET_PREFIX.0/24 is already in use on this host"; fi
  ip link add "$KM_BRIDGE" type bridge
  ip addr add "$KM_HOST_IP/24" dev "$KM_BRIDGE"
  ip link set "$KM_BRIDGE" up
fi

# --- control plane -----------------------------------------------------------------------------
names=()
for ((i = 1; i <= N; i++)); do names+=("$(node_name "$i")"); done
KUBE_MIGRATE_APISERVER_NODE_ADDRESS=$KM_HOST_IP \
KUBE_MIGRATE_APISERVER_PORT=$KM_APISERVER_PORT KUBE_MIGRATE_ETCD_PORT=36379 KUBE_MIGRATE_ETCD_PEER_PORT=36380 \
KUBE_MIGRATE_CONTROLLER_MANAGER_PORT=36257 KUBE_MIGRATE_SCHEDULER_PORT=36259 KUBE_MIGRATE_NODES="${names[*]}" \
  "$here/../cluster/up.sh" "$KM_CLUSTER_DIR" > /dev/null 2> "$KM_NODES_DIR/up-control-plane.log" 8>&- ||
  { tail -n 30 "$KM_NODES_DIR/up-control-plane.log" >&2; km_die "control plane did not start"; }
PKI=$KM_CLUSTER_DIR/pki
# Nodes of an earlier, larger run (same state dir) would stay NotReady forever (and hold
# DaemonSet rollouts): remove their Node objects.
for ((j = N + 1; j <= 9; j++)); do kubectl delete node "$(node_name "$j")" --ignore-not-found > /dev/null; done
km_log "control plane ready (https://$KM_HOST_IP:$KM_APISERVER_PORT)"

# sign <out prefix> <subject> <extendedKeyUsage> [subjectAltName]: a P-256 key and a certificate
# from the cluster CA (as cluster/up.sh makes them).
sign() {
  local out=$1 subj=$2 eku=$3 san=${4:-} ext
  ext=$(mktemp)
  printf 'basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = %s\n' "$eku" > "$ext"
  [[ -z $san ]] || echo "subjectAltName = $san" >> "$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$out.key" \
    -subj "$subj" -out "$out.csr" 2> /dev/null
  openssl x509 -req -in "$out.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 365 -sha256 -extfile "$ext" -out "$out.crt" 2> /dev/null
  rm -f "$ext" "$out.csr"; chmod 600 "$out.key"
}
# kubeconfig <file> <user> <cert prefix>: towards the apiserver's bridge address (127.0.0.1 inside
# a node is the node's own loopback).
kubeconfig() {
  kubectl config --kubeconfig="$1" set-cluster km --server="https://$KM_HOST_IP:$KM_APISERVER_PORT" \
    --certificate-authority="$PKI/ca.crt" --embed-certs > /dev/null
  kubectl config --kubeconfig="$1" set-credentials "$2" --client-certificate="$3.crt" --client-key="$3.key" --embed-certs > /dev/null
  kubectl config --kubeconfig="$1" set-context km --cluster=km --user="$2" > /dev/null
  kubectl config --kubeconfig="$1" use-context km > /dev/null
}

# --- one node ----------------------------------------------------------------------------------
start_node() {
  local i=$1 name ip d netns
  name=$(node_name "$i"); ip=$(node_ip "$i"); d=$(node_dir "$i"); netns=$name
  if helper_pid "$i" > /dev/null; then km_log "$name: already running"; return 0; fi
  mkdir -p "$d"/{containers,kubelet,crio,cni,kube-migrate,log,run,logs} \
    "$d"/etc/{crio/crio.conf.d,cni/net.d,kubernetes/pki,containers,kube-migrate}

  # Network: veth eth0 in the node, km-n<i> on the host bridge; routes to the other nodes' pod
  # CIDRs via their node IPs (pod to pod across nodes without forwarding on the host).
  if ! ip netns list | grep -qw "$netns"; then
    ip netns add "$netns"
    ip link add "km-n$i" type veth peer name eth0 netns "$netns"
    ip link set "km-n$i" master "$KM_BRIDGE" up
    ip -n "$netns" link set lo up
    ip -n "$netns" addr add "$ip/24" dev eth0
    ip -n "$netns" link set eth0 up
    ip -n "$netns" route add default via "$KM_HOST_IP"
    ip netns exec "$netns" sysctl -qw net.ipv4.ip_forward=1
  fi
  for ((j = 1; j <= N; j++)); do
    ((j == i)) || ip -n "$netns" route replace "$(node_pod_cidr "$j")" via "$(node_ip "$j")"
  done
  ip route replace "$(node_pod_cidr "$i")" via "$ip" dev "$KM_BRIDGE"

  # cgroups: the kubelet's cgroup root must exist; a new v1 cpuset is empty (no task could join),
  # so it gets its parent's CPUs and memory nodes.
  local c
  for c in /sys/fs/cgroup/*/; do
    [[ $c == */unified/ ]] && continue
    mkdir -p "$c$name"
  done
  cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset/$name/cpuset.cpus"
  cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset/$name/cpuset.mems"

  # Configuration (the node's /etc/crio, /etc/cni, /etc/containers, /etc/kubernetes).
  echo "# empty: the settings are in crio.conf.d/ (nodes/conf/crio.conf.d)" > "$d/etc/crio/crio.conf"
  cp "$here"/conf/crio.conf.d/*.conf "$d/etc/crio/crio.conf.d/"
  rm -f "$d/etc/crio/crio.conf.d/"{90-harness-oom,20-evented-pleg}.conf
  if [[ ${KUBE_MIGRATE_EVENTED_PLEG:-} == 1 ]]; then
    printf '[crio.runtime]\nenable_pod_events = true\n' > "$d/etc/crio/crio.conf.d/20-evented-pleg.conf"
  fi
  # kube-migrate's runtime hold (docs/install-cri-o.md, section 5) at the path the drop-in names;
  # where crun needs the oom clamp, the hold wrapper calls the clamp wrapper, which calls crun.
  mkdir -p "$d/libexec/kube-migrate"
  if ((CAN_LOWER_OOM)); then
    cp "$here/../deploy/node/crun-hold" "$d/libexec/kube-migrate/crun-hold"
  else
    cp "$here/conf/crun-clamp-oom" "$d/etc/crio/crun-clamp-oom"
    sed 's#^runtime=/usr/bin/crun$#runtime=/etc/crio/crun-clamp-oom#' "$here/../deploy/node/crun-hold" \
      > "$d/libexec/kube-migrate/crun-hold"
    grep -q '^runtime=/etc/crio/crun-clamp-oom$' "$d/libexec/kube-migrate/crun-hold" ||
      km_die "deploy/node/crun-hold: no runtime= line to chain the oom clamp behind"
  fi
  chmod 0755 "$d/libexec/kube-migrate/crun-hold"
  # kube-migrate's CRIU options, which the wrapper hands CRIU (docs/install-cri-o.md, section 6).
  cp "$here/../deploy/node/criu.conf" "$d/etc/kube-migrate/criu.conf"
  [[ -s $d/etc/containers/policy.json ]] || cp -a "$ROOT/etc/containers/." "$d/etc/containers/"
  cp "$here/conf/storage.conf" "$d/etc/containers/storage.conf"
  # Distinct per node (cAdvisor's system UUID, Node.status.nodeInfo.machineID).
  [[ -s $d/etc/machine-id ]] || od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$d/etc/machine-id"
  if [[ -n ${KUBE_MIGRATE_REGISTRY_CA:-} ]]; then
    mkdir -p "$d/etc/containers/certs.d/127.0.0.1:5443"
    cp "$KUBE_MIGRATE_REGISTRY_CA" "$d/etc/containers/certs.d/127.0.0.1:5443/ca.crt"
  fi
  cat > "$d/etc/cni/net.d/10-km-pods.conflist" << EOF2
{
  "cniVersion": "1.0.0",
  "name": "km-pods",
  "plugins": [
    { "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "$(node_pod_cidr "$i")" }]],
                "routes": [{ "dst": "0.0.0.0/0" }] } }
  ]
}
EOF2
  local k=$d/etc/kubernetes
  cp "$PKI/ca.crt" "$k/pki/ca.crt"
  if ! openssl x509 -checkend 86400 -noout -in "$k/pki/kubelet.crt" > /dev/null 2>&1 ||
     ! openssl x509 -checkend 86400 -noout -in "$k/pki/kubelet-client.crt" > /dev/null 2>&1 ||
     ! openssl verify -CAfile "$PKI/ca.crt" "$k/pki/kubelet.crt" > /dev/null 2>&1; then
    # Serving: the apiserver (logs, exec) and the agent dial https://<node IP>:10250.
    sign "$k/pki/kubelet" "/CN=system:node:$name/O=system:nodes" serverAuth "DNS:$name,IP:$ip"
    # Client: the identity the Node authorizer and NodeRestriction expect.
    sign "$k/pki/kubelet-client" "/CN=system:node:$name/O=system:nodes" clientAuth
    # kube-proxy: bound to system:node-proxier by the default RBAC policy.
    sign "$k/pki/kube-proxy" "/CN=system:kube-proxy" clientAuth
  fi
  kubeconfig "$k/kubelet.kubeconfig" "system:node:$name" "$k/pki/kubelet-client"
  kubeconfig "$k/kube-proxy.kubeconfig" system:kube-proxy "$k/pki/kube-proxy"
  cat > "$k/kubelet.yaml" << EOF2
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: /etc/kubernetes/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: /etc/kubernetes/pki/kubelet.crt
tlsPrivateKeyFile: /etc/kubernetes/pki/kubelet.key
cgroupDriver: cgroupfs
# Own cgroup root per node: kubelets sharing /kubepods remove each other's pod cgroups as orphans.
cgroupRoot: /$name
containerRuntimeEndpoint: unix:///var/run/crio/crio.sock
failSwapOn: false
protectKernelDefaults: false
makeIPTablesUtilChains: false
resolvConf: /etc/resolv.conf
# The default /usr/libexec/kubernetes is in the read-only root.
volumePluginDir: /var/lib/kubelet/volumeplugins
clusterDomain: cluster.local
registerNode: true
# The images are loaded, not pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
featureGates: {EventedPLEG: $([[ ${KUBE_MIGRATE_EVENTED_PLEG:-} == 1 ]] && echo true || echo false)}
EOF2
  cat > "$k/kube-proxy.yaml" << EOF2
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: /etc/kubernetes/kube-proxy.kubeconfig}
hostnameOverride: $name
mode: iptables
clusterCIDR: $KM_POD_CIDR_ALL
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# 0: leave the conntrack sysctls alone (nf_conntrack_max is machine-wide).
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
# false: no route_localnet sysctl, no NodePorts on 127.0.0.1.
iptables: {localhostNodePorts: false}
nodePortAddresses: [primary]
EOF2

  # The node's mount namespace, kept by a helper (sleep) in the node's network namespace:
  # the trixie root read-only, fresh /run /tmp, the node's state dirs at the standard paths.
  rm -f "$d/run/helper.pid" "$d/run/mntns"
  # shellcheck disable=SC2016 # for the inner bash
  setsid nsenter --net="/run/netns/$netns" -- unshare --mount --propagation slave -- /bin/bash -euo pipefail -c '
    R=$1 d=$2 k8s=$3 crio=$4 images=$5
    mount --bind "$R" "$R"
    for t in run tmp var/tmp; do mount -t tmpfs -o mode=1777,nosuid,nodev "km-$t" "$R/$t"; done
    mkdir -p "$R/run/lock"
    mount --rbind /dev "$R/dev"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
    mount --bind "$R/dev/pts/ptmx" "$R/dev/ptmx"
    # A sysfs of this network namespace (the kubelet, CNI and CRIU see the node'"'"'s links), plus the
    # host cgroup v1 controllers without the cgroup2 "unified" mount (crun refuses the hybrid
    # layout), and no hugepage sizes (hugetlb is not a v1 controller here; the kubelet would ask
    # CRI-O for hugetlb limits: "open /sys/fs/cgroup/hugetlb/kubepods/...: no such file").
    mount -t sysfs sysfs "$R/sys"
    mount --rbind /sys/fs/cgroup "$R/sys/fs/cgroup"
    umount -l "$R/sys/fs/cgroup/unified"
    mount -t tmpfs -o ro,size=4k km-nohuge "$R/sys/kernel/mm/hugepages"
    mount -t proc proc "$R/proc"
    b() { mkdir -p "$R$2"; mount --rbind "$1" "$R$2"; }
    b "$d/containers" /var/lib/containers
    b "$d/kubelet" /var/lib/kubelet
    b "$d/crio" /var/lib/crio
    b "$d/cni" /var/lib/cni
    b "$d/kube-migrate" /var/lib/kube-migrate
    b "$d/libexec" /usr/local/libexec
    b "$d/log" /var/log
    b "$d/etc/crio" /etc/crio
    b "$d/etc/cni" /etc/cni
    b "$d/etc/containers" /etc/containers
    b "$d/etc/kubernetes" /etc/kubernetes
    b "$d/etc/kube-migrate" /etc/kube-migrate
    [[ -e $R/etc/machine-id ]] || : > "$R/etc/machine-id"
    mount --bind "$d/etc/machine-id" "$R/etc/machine-id"
    b "$k8s" /opt/km/k8s
    b "$crio" /opt/km/crio
    # At the same paths as on the host: pid files (nodes/lib.sh node_bg) and the OCI archives to
    # load (nodes/load-image.sh). Under /tmp: on the node'"'"'s own tmpfs, not in the shared root.
    b "$d/run" "$d/run"
    b "$images" "$images"
    mount -o remount,bind,ro "$R"
    cd "$R"; pivot_root . .oldroot; umount -l /.oldroot
    # Volumes the kubelet mounts under /var/lib/kubelet must reach the containers.
    mount --make-rshared /
    echo $$ > "$d/run/helper.pid"
    readlink /proc/self/ns/mnt > "$d/run/mntns.tmp"
    exec sleep infinity
  ' km-node "$ROOT" "$d" "$KUBE_MIGRATE_NODE_BIN_DIR" "$KUBE_MIGRATE_CRIO_BIN_DIR" "$IMAGES" \
    > "$d/logs/helper.log" 2>&1 < /dev/null 8>&- &
  wait_until 10 "$name mount namespace" test -s "$d/run/mntns.tmp" ||
    { cat "$d/logs/helper.log" >&2; km_die "$name: node namespace setup failed"; }
  mv "$d/run/mntns.tmp" "$d/run/mntns"
  helper_pid "$i" > /dev/null || { cat "$d/logs/helper.log" >&2; km_die "$name: helper not running"; }

  node_bg "$i" crio crio
  wait_until 30 "$name CRI-O socket" node_exec "$i" test -S /var/run/crio/crio.sock ||
    { tail -n 20 "$d/logs/crio.log" >&2; km_die "$name: CRI-O did not start"; }
  node_exec "$i" skopeo copy -q "oci-archive:$IMAGES/pause.oci.tar" containers-storage:localhost/kube-migrate/pause:latest
  node_exec "$i" skopeo copy -q "oci-archive:$IMAGES/busybox.oci.tar" containers-storage:localhost/kube-migrate/busybox:latest
  node_bg "$i" kubelet kubelet --config=/etc/kubernetes/kubelet.yaml --kubeconfig=/etc/kubernetes/kubelet.kubeconfig \
    --hostname-override="$name" --node-ip="$ip" --v=1
  node_bg "$i" kube-proxy kube-proxy --config=/etc/kubernetes/kube-proxy.yaml --v=1
  km_log "$name: started ($ip, pods $(node_pod_cidr "$i"))"
}

for ((i = 1; i <= N; i++)); do start_node "$i"; done
ready() {
  [[ $(kubectl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]]
}
for ((i = 1; i <= N; i++)); do
  wait_until 90 "$(node_name "$i") Ready" ready "$(node_name "$i")" ||
    { tail -n 20 "$(node_dir "$i")/logs/kubelet.log" >&2; km_die "$(node_name "$i") not Ready"; }
done
# The control plane keeps its state between runs: a node cordoned by an earlier run (a drain
# that did not finish) would still be, and kube-migrate's webhook replicas could not spread.
for ((i = 1; i <= N; i++)); do kubectl uncordon "$(node_name "$i")" > /dev/null; done
echo "$N" > "$KM_NODES_DIR/nodes"
km_log "$N node(s) Ready"
echo "export KUBECONFIG=$KUBECONFIG"
