#!/usr/bin/env bash
# Stops the control plane started by up.sh in STATE_DIR, and optionally deletes
# STATE_DIR (certificates, etcd data, logs).
#
# Usage: down.sh [--purge] [STATE_DIR]   (default ${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster})
#
# Processes are found by the pid files of up.sh and, for leftovers whose pid
# file is gone or stale, by a command line naming STATE_DIR; a process is only
# signalled when its command line names STATE_DIR, so a reused pid or another
# cluster (other state dir) is never touched. SIGTERM first, SIGKILL after
# KUBE_MIGRATE_STOP_TIMEOUT seconds [10].
set -euo pipefail

purge=0 state_arg=
for a in "$@"; do
  case "$a" in
    --purge) purge=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) echo "unknown option: $a (see --help)" >&2; exit 2 ;;
    *) state_arg=$a ;;
  esac
done
STATE=${state_arg:-${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster}}
STOP_TIMEOUT=${KUBE_MIGRATE_STOP_TIMEOUT:-10}

log() { echo "[down] $*" >&2; }

if [[ ! -d $STATE ]]; then
  log "no state dir $STATE; nothing to do"
  exit 0
fi
STATE=$(cd "$STATE" && pwd)
RUN=$STATE/run

ours() { # <pid>: alive and its command line names this state dir
  local cmd
  cmd=$(tr '\0' ' ' 2> /dev/null < "/proc/$1/cmdline") && [[ $cmd == *"$STATE/"* ]]
}

# Reverse start order: clients before the apiserver, the apiserver before etcd.
pids=()
for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do
  pid=$(cat "$RUN/$c.pid" 2> /dev/null || true)
  if [[ -n $pid ]] && ours "$pid"; then
    log "stopping $c (pid $pid)"
    kill -TERM "$pid" 2> /dev/null || true
    pids+=("$pid")
    # Let the apiserver drain before etcd goes away (bounded, see below).
    if [[ $c == kube-apiserver ]]; then
      for _ in $(seq 50); do ours "$pid" || break; sleep 0.1; done
    fi
  fi
  rm -f "$RUN/$c.pid"
done

# Leftovers: anything else still running from this state dir (e.g. from an
# up.sh that was interrupted before writing a pid file).
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [[ $pid != "$$" && $pid != "$BASHPID" ]] || continue
  exe=$(readlink "$p/exe" 2> /dev/null || true)
  case "${exe##*/}" in
    etcd|kube-apiserver|kube-controller-manager|kube-scheduler) ;;
    *) continue ;;
  esac
  if ours "$pid" && [[ " ${pids[*]-} " != *" $pid "* ]]; then
    log "stopping leftover ${exe##*/} (pid $pid)"
    kill -TERM "$pid" 2> /dev/null || true
    pids+=("$pid")
  fi
done

# Wait for all, then SIGKILL whatever is still there.
deadline=$(( $(date +%s) + STOP_TIMEOUT ))
for pid in "${pids[@]}"; do
  while ours "$pid" && (( $(date +%s) < deadline )); do sleep 0.1; done
  if ours "$pid"; then
    log "pid $pid did not exit after ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2> /dev/null || true
  fi
done
rm -f "$STATE/admin.kubeconfig"
log "stopped (${#pids[@]} processes)"

if (( purge )); then
  # Only delete what up.sh created (it leaves this marker), never e.g. / or $HOME.
  if [[ -f $STATE/.kube-migrate-cluster ]]; then
    rm -rf "$STATE"
    log "removed $STATE"
  else
    log "not removing $STATE: it has no .kube-migrate-cluster marker (not made by up.sh)"
    exit 1
  fi
fi
