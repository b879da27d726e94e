#!/usr/bin/env bash
# Stops what nodes/up.sh started and leaves the machine as it was: every process of every node
# (kubelet, kube-proxy, CRI-O, conmon, containers, the namespace helper), their cgroups, network
# namespaces, veths, host routes and bridge, the harness's control plane, and the sysctls the
# kubelets changed. Mounts need no unmounting: they exist only in the nodes' mount namespaces,
# which vanish with their last process.
#
# Usage: nodes/down.sh [--purge]     (--purge: also delete $KUBE_MIGRATE_NODES_DIR: node storage,
#                                     certificates, etcd data, logs)
# Env: KUBE_MIGRATE_NODES_DIR [/tmp/kube-migrate-nodes]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
purge=0
case "${1:-}" in
  "") ;; --purge) purge=1 ;;
  -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
esac
# shellcheck source=nodes/lib.sh
source "$here/lib.sh"
[[ $(id -u) == 0 ]] || { echo "SKIPPED: needs root"; exit 77; }
[[ -d $KM_NODES_DIR ]] || { km_log "no state dir $KM_NODES_DIR; nothing to do"; exit 0; }
exec 8> "$KM_NODES_DIR/.lock"
flock -w 60 8 || km_die "another nodes/up.sh or down.sh holds $KM_NODES_DIR/.lock"

# pids_of_node <i>: every process of node i: in its mount or network namespace (kubelet, CRI-O,
# kube-proxy, hostNetwork containers, the helper) or in a cgroup under its cgroup root (conmon and
# the containers, which have namespaces of their own).
pids_of_node() {
  local i=$1 name mntns netns p pid
  name=$(node_name "$i")
  mntns=$(cat "$(node_dir "$i")/run/mntns" 2> /dev/null || true)
  netns=$(readlink "/proc/$(cat "$(node_dir "$i")/run/helper.pid" 2> /dev/null || echo none)/ns/net" 2> /dev/null || true)
  {
    for p in /proc/[0-9]*; do
      pid=${p#/proc/}
      [[ $pid != "$$" && $pid != "$BASHPID" ]] || continue
      local m n
      m=$(readlink "$p/ns/mnt" 2> /dev/null) || continue
      n=$(readlink "$p/ns/net" 2> /dev/null) || continue
      if [[ -n $mntns && $m == "$mntns" ]] || [[ -n $netns && $n == "$netns" ]]; then echo "$pid"; fi
    done
    find /sys/fs/cgroup/*/"$name" -name cgroup.procs -exec cat {} + 2> /dev/null || true
  } | sort -un
}

stop_node() {
  local i=$1 name d pid f
  name=$(node_name "$i"); d=$(node_dir "$i")
  # Graceful first: the kubelet and kube-proxy, then CRI-O (it leaves the containers running).
  for f in kubelet kube-proxy crio; do
    pid=$(cat "$d/run/$f.pid" 2> /dev/null || true)
    if [[ -n $pid ]]; then kill -TERM "$pid" 2> /dev/null || true; fi
  done
  for _ in $(seq 50); do
    local alive=0
    for f in kubelet kube-proxy crio; do
      pid=$(cat "$d/run/$f.pid" 2> /dev/null || true)
      [[ -n $pid ]] && kill -0 "$pid" 2> /dev/null && alive=1
    done
    ((alive)) || break; sleep 0.1
  done
  # A frozen container ignores SIGKILL until thawed (kube-migrate freezes sources).
  if [[ -d /sys/fs/cgroup/freezer/$name ]]; then
    find /sys/fs/cgroup/freezer/"$name" -name freezer.state |
      while read -r f; do echo THAWED > "$f" 2> /dev/null || true; done
  fi
  local pids n=0
  for _ in $(seq 20); do
    pids=$(pids_of_node "$i")
    [[ -n $pids ]] || break
    # shellcheck disable=SC2086
    kill -KILL $pids 2> /dev/null || true
    n=$((n + $(wc -w <<< "$pids"))); sleep 0.2
  done
  [[ -z $(pids_of_node "$i") ]] || km_log "$name: processes left: $(pids_of_node "$i" | tr '\n' ' ')"
  # cgroups, deepest first; retried while the killed tasks go away.
  for _ in $(seq 20); do
    find /sys/fs/cgroup/*/"$name" -depth -type d -exec rmdir {} + 2> /dev/null || true
    compgen -G "/sys/fs/cgroup/*/$name" > /dev/null || break
    sleep 0.2
  done
  compgen -G "/sys/fs/cgroup/*/$name" > /dev/null && km_log "$name: cgroups left: $(echo /sys/fs/cgroup/*/"$name")"
  ip route del "$(node_pod_cidr "$i")" 2> /dev/null || true
  ip netns del "$name" 2> /dev/null || true
  ip link del "km-n$i" 2> /dev/null || true
  rm -f "$d"/run/*.pid "$d/run/mntns"
  km_log "$name: stopped (killed $n processes)"
}

for i in $(existing_nodes); do stop_node "$i"; done
if [[ -d $KM_CLUSTER_DIR ]]; then "$here/../cluster/down.sh" "$KM_CLUSTER_DIR" 2> /dev/null || true; fi
ip link del "$KM_BRIDGE" 2> /dev/null || true
if [[ -s $KM_NODES_DIR/sysctl.saved ]]; then
  # shellcheck disable=SC2046
  sysctl -q -w $(cat "$KM_NODES_DIR/sysctl.saved") && rm -f "$KM_NODES_DIR/sysctl.saved"
  km_log "sysctls restored"
fi
rm -f "$KM_NODES_DIR/nodes"
if ((purge)); then
  [[ -f $KM_NODES_DIR/.kube-migrate-nodes ]] || km_die "not removing $KM_NODES_DIR: no .kube-migrate-nodes marker"
  # Nothing is mounted on the host below it; --one-file-system guards against surprises.
  rm -rf --one-file-system "$KM_NODES_DIR"
  km_log "removed $KM_NODES_DIR"
fi
