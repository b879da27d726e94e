# shellcheck shell=bash
# Shared by nodes/*.sh: names, addresses, paths of the real-node harness, and how to run a command
# inside a node. Sourced, not run.
#
# Node i (1-based) of the harness:
#   name km-node-<i>, network namespace km-node-<i> (veth eth0 <-> host km-n<i> on bridge km-nodes0),
#   node IP 10.89.0.<10+i>/24, pod CIDR 10.244.<i>.0/24 (CNI bridge cni0, gateway 10.244.<i>.1),
#   its own mount namespace over the trixie root (nodes/make-root.sh), kept by a helper process,
#   kubelet cgroup root /km-node-<i> (two kubelets under one /kubepods would delete each other's
#   pod cgroups as orphans), state in $KM_NODES_DIR/km-node-<i>.
# The host: bridge km-nodes0 with 10.89.0.1/24 (the apiserver's address for the nodes), a route to
# each pod CIDR via its node IP (the apiserver reaches pods: logs, webhooks by endpoint IP).

# shellcheck disable=SC2034 # the KM_* settings are used by the scripts that source this file
KM_NODES_DIR=${KUBE_MIGRATE_NODES_DIR:-/tmp/kube-migrate-nodes}
KM_BRIDGE=km-nodes0
KM_HOST_IP=10.89.0.1
KM_NET_PREFIX=10.89.0
KM_POD_CIDR_ALL=10.244.0.0/16
KM_CLUSTER_DIR=$KM_NODES_DIR/cluster
# The control plane of the harness: own state dir and ports, so that it never meets the test-kubelet
# cluster of scripts/local-cluster.sh (6443, 12379, ...).
KM_APISERVER_PORT=${KUBE_MIGRATE_NODES_APISERVER_PORT:-36443}
export KUBECONFIG=$KM_CLUSTER_DIR/admin.kubeconfig

node_name() { echo "km-node-$1"; }
node_ip() { echo "$KM_NET_PREFIX.$((10 + $1))"; }
node_pod_cidr() { echo "10.244.$1.0/24"; }
node_dir() { echo "$KM_NODES_DIR/km-node-$1"; }
# The nodes that have a state dir, in order (for down.sh / load-image.sh).
existing_nodes() {
  local d
  for d in "$KM_NODES_DIR"/km-node-*; do [[ -d $d ]] && echo "${d##*-}"; done | sort -n
}

km_log() { printf '[nodes +%ss] %s\n' "$SECONDS" "$*" >&2; }
km_die() { printf '[nodes] ERROR: %s\n' "$*" >&2; exit 1; }

# The clean environment of every command run in a node.
KM_NODE_ENV=(PATH=/opt/km/k8s:/opt/km/crio:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  HOME=/root LANG=C.UTF-8)

helper_pid() { # <i>: pid of the process that holds the node's namespaces, if alive
  local pid
  pid=$(cat "$(node_dir "$1")/run/helper.pid" 2> /dev/null) && [[ -n $pid ]] &&
    [[ $(readlink "/proc/$pid/ns/mnt" 2> /dev/null) == "$(cat "$(node_dir "$1")/run/mntns" 2> /dev/null)" ]] &&
    echo "$pid"
}
# node_exec <i> CMD...: run CMD in node i (its mount and network namespaces, root, clean env).
node_exec() {
  local i=$1 pid; shift
  pid=$(helper_pid "$i") || km_die "node $i is not running"
  nsenter -t "$pid" -m -n -r -w -- env -i "${KM_NODE_ENV[@]}" "$@"
}
# node_bg <i> <name> CMD...: start a long-running CMD in node i, in its own session, stdin closed,
# output to <node dir>/logs/<name>.log; the pid file names CMD itself (the child writes its pid
# before exec). Fd 8 (up.sh's lock) is not inherited: a node outliving up.sh must not hold it.
node_bg() {
  local i=$1 name=$2 d pid; shift 2
  d=$(node_dir "$i"); pid=$(helper_pid "$i") || km_die "node $i is not running"
  rm -f "$d/run/$name.pid"
  [[ ! -f $d/logs/$name.log ]] || mv "$d/logs/$name.log" "$d/logs/$name.log.prev"
  # shellcheck disable=SC2016
  setsid nsenter -t "$pid" -m -n -r -w -- env -i "${KM_NODE_ENV[@]}" \
    /bin/bash -c 'echo $$ > "$0"; exec "$@"' "$d/run/$name.pid" "$@" > "$d/logs/$name.log" 2>&1 < /dev/null 8>&- &
  for _ in $(seq 50); do [[ -s $d/run/$name.pid ]] && break; sleep 0.02; done
}

# wait_until <seconds> <description> CMD...: poll CMD every 0.2 s.
wait_until() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" > /dev/null 2>&1; do
    ((SECONDS < deadline)) || { km_log "timed out after $secs s waiting for $what"; return 1; }
    sleep 0.2
  done
}
