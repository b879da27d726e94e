#!/usr/bin/env bash
# Drain benchmark (issue #6): wall time of `kubectl drain node-a` with N stateful single-replica
# Deployments on node-a, on the local cluster (scripts/local-cluster.sh), three ways:
#
#   kube-migrate   pods annotated migrate.io/stateful=true: the drain live-migrates them
#                  (checkpoint, transfer, image, restore); per-phase breakdown from the
#                  PodMigrations' status
#   plain          the same pods without the annotation: evicted and recreated fresh, their
#                  in-memory state lost (the floor: what a drain costs without the product)
#   manual PDB     the route operators take today to keep a single-replica app available:
#                  a PDB (minAvailable 1) per app, scale every app to 2 replicas, wait until
#                  Ready, drain, scale back to 1 (availability kept, in-memory state still lost)
#
#   scripts/bench-drain.sh                 N = 1 10 50 (release build; ~15 min on 2 cores)
#   scripts/bench-drain.sh --quick         N = 1 3, for CI (checks the machinery, not figures)
#   PODS="1 10" STATE_BYTES=1048576 scripts/bench-drain.sh
#   MODES="km plain" KM_MAX_PER_NODE=8 scripts/bench-drain.sh   (which drains; controller flags
#                                          by their environment variables, e.g. --max-per-node)
#
# Pods are the test kubelet's simulated containers with STATE_BYTES of state each (default
# 1 MiB), so the figures measure orchestration; e2e/tests/criu.rs measures real CRIU state.
# Prints a markdown table; exits non-zero if any drain fails or any migration does not succeed.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1
if ((QUICK)); then
  PODS=${PODS:-1 3}
  export KUBE_MIGRATE_PROFILE=${KUBE_MIGRATE_PROFILE:-debug}
else
  PODS=${PODS:-1 10 50}
  export KUBE_MIGRATE_PROFILE=${KUBE_MIGRATE_PROFILE:-release}
fi
STATE_BYTES=${STATE_BYTES:-1048576}
NS=bench-drain
# Real containers are not needed here; skipping them keeps the cluster start short.
export KUBE_MIGRATE_CRUN=${KUBE_MIGRATE_CRUN:-0}

log() { printf '[bench-drain] %s\n' "$*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

trap 'scripts/local-cluster.sh down >/dev/null 2>&1 || true' EXIT
scripts/local-cluster.sh up >/dev/null
# shellcheck disable=SC1091
source "${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster}/km/env"

# apps N ANNOTATE — N single-replica Deployments app-0..app-N-1.
apps() {
  local n=$1 annotate=$2 i
  for ((i = 0; i < n; i++)); do
    cat <<YAML
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: app-$i, namespace: $NS }
spec:
  replicas: 1
  selector: { matchLabels: { app: app-$i } }
  template:
    metadata:
      labels: { app: app-$i, bench: drain }
      annotations: { migrate.io/stateful: "$annotate" }
    spec:
      terminationGracePeriodSeconds: 5
      containers: [{ name: app, image: registry.local/app:1, env: [{ name: STATE_BYTES, value: "$STATE_BYTES" }] }]
YAML
  done
}

pdbs() {
  local n=$1 i
  for ((i = 0; i < n; i++)); do
    cat <<YAML
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: { name: app-$i, namespace: $NS }
spec: { minAvailable: 1, selector: { matchLabels: { app: app-$i } } }
YAML
  done
}

running() { # count of Running, undeleted bench pods (optionally on a node)
  kubectl -n "$NS" get pods -l bench=drain -o json |
    jq --arg node "${1:-}" '[.items[] | select(.metadata.deletionTimestamp == null and .status.phase == "Running"
      and ($node == "" or .spec.nodeName == $node))] | length'
}

wait_running() { # n [node]
  local n=$1 node=${2:-} deadline=$((SECONDS + 300))
  until [[ $(running "$node") -ge $n ]]; do
    ((SECONDS < deadline)) || { log "timed out waiting for $n running pods ${node:+on $node}"; kubectl -n "$NS" get pods -o wide >&2; exit 1; }
    sleep 0.5
  done
}

wait_ended() { # n: PodMigrations Succeeded or Failed
  local n=$1 deadline=$((SECONDS + 300))
  until [[ $(kubectl -n "$NS" get podmigrations -o json |
    jq '[.items[] | select(.status.phase == "Succeeded" or .status.phase == "Failed")] | length') -ge $n ]]; do
    ((SECONDS < deadline)) || { log "timed out waiting for $n migrations to end"; return 0; }
    sleep 0.5
  done
}

# setup N ANNOTATE — fresh namespace, N apps all Running on node-a.
setup() {
  kubectl delete namespace "$NS" --wait=true --timeout=300s >/dev/null 2>&1 || true
  kubectl create namespace "$NS" >/dev/null
  kubectl uncordon node-a >/dev/null
  kubectl cordon node-b node-c >/dev/null
  apps "$1" "$2" | kubectl apply -f - >/dev/null
  wait_running "$1" node-a
  kubectl uncordon node-b node-c >/dev/null
}

drain() {
  kubectl drain node-a --ignore-daemonsets --delete-emptydir-data --force --timeout=900s > "$KM_OUT/drain.log" 2>&1 ||
    { log "drain failed:"; tail -n 20 "$KM_OUT/drain.log" >&2; exit 1; }
}

KM_OUT=$(mktemp -d)
ROWS=()
BREAKDOWN=()
MODES=${MODES:-km plain pdb}
for n in $PODS; do
  t_km=- t_plain=- t_pdb=-
  if [[ " $MODES " == *" km "* ]]; then
  # 1. kube-migrate
  log "N=$n: kube-migrate"
  setup "$n" true
  t0=$(now); drain; t_km=$(elapsed "$t0")
  wait_running "$n"
  # A replacement is Running a moment before it is Ready and its migration Succeeded: read
  # the PodMigrations once every one has ended (a loaded machine showed the gap).
  wait_ended "$n"
  kubectl -n "$NS" get podmigrations -o json > "$KM_OUT/pm.json"
  ok=$(jq '[.items[] | select(.status.phase == "Succeeded")] | length' "$KM_OUT/pm.json")
  [[ $ok -eq $n ]] || { log "only $ok of $n migrations succeeded"; jq -r '.items[] | "\(.metadata.name) \(.status.phase) \(.status.message)"' "$KM_OUT/pm.json" >&2; exit 1; }
  # Mean and max of every phase, and of the downtime.
  # Pending split: the part spent queued for a concurrency slot (from the timeline's `queued`
  # to the end of Pending), over the migrations that were queued.
  BREAKDOWN+=("$(jq -r --arg n "$n" '
    def stats: if length == 0 then "-" else "\((add / length * 100 | round) / 100) / \((max * 100 | round) / 100)" end;
    def ts: capture("^(?<s>[^.Z]+)(?<f>[.][0-9]+)?Z$") | (.s + "Z" | fromdateiso8601) + ((.f // "0") | tonumber);
    . as $r
    | [$r.items[] | ([.status.timeline // [] | .[] | select(.step == "queued") | .at][0]) as $q | select($q != null)
        | (.status.phases[] | select(.phase == "Pending")) as $p | (($p.startedAt | ts) + $p.seconds - ($q | ts))] as $queued
    | "| \($n) | " + ([ "Pending", "Checkpointing", "Transferring", "BuildingImage", "Restoring" ]
        | map(. as $p | [$r.items[].status.phases[] | select(.phase == $p) | .seconds] | stats) | join(" | "))
      + " | \($queued | length): " + ($queued | stats)
      + " | " + ([$r.items[].status.downtimeSeconds | select(. != null)] | stats) + " |"' "$KM_OUT/pm.json")")
  kubectl uncordon node-a >/dev/null
  fi

  if [[ " $MODES " == *" plain "* ]]; then
  # 2. plain drain, state lost
  log "N=$n: plain drain"
  setup "$n" false
  t0=$(now); drain; t_plain=$(elapsed "$t0")
  wait_running "$n"
  kubectl uncordon node-a >/dev/null
  fi

  if [[ " $MODES " == *" pdb "* ]]; then
  # 3. manual PDB route
  log "N=$n: manual PDB route"
  setup "$n" false
  pdbs "$n" | kubectl apply -f - >/dev/null
  t0=$(now)
  kubectl cordon node-a >/dev/null
  kubectl -n "$NS" scale deployment --all --replicas=2 >/dev/null
  wait_running $((2 * n))
  drain
  kubectl -n "$NS" scale deployment --all --replicas=1 >/dev/null
  wait_running "$n"
  t_pdb=$(elapsed "$t0")
  kubectl uncordon node-a >/dev/null
  fi

  ROWS+=("| $n | $t_km s | $t_plain s | $t_pdb s |")
done
kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true

echo
echo "kubectl drain wall time, $KUBE_MIGRATE_PROFILE build, STATE_BYTES=$STATE_BYTES, $(nproc) cores, max-per-node ${KM_MAX_PER_NODE:-default}, max-total ${KM_MAX_TOTAL:-default}"
echo
echo "| pods | kube-migrate (state kept) | plain drain (state lost) | manual PDB route (state lost) |"
echo "| ---: | ---: | ---: | ---: |"
printf '%s\n' "${ROWS[@]}"
echo
echo "kube-migrate per-phase seconds, mean / max over the pods"
echo
echo "| pods | Pending | Checkpointing | Transferring | BuildingImage | Restoring | queued for a slot (n: mean / max) | downtime |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${BREAKDOWN[@]}"
rm -rf "$KM_OUT"
