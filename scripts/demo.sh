#!/usr/bin/env bash
# The main job, end to end, on this machine: real Kubernetes nodes (kubelet + CRI-O + crun +
# CRIU, nodes/up.sh) where the machine allows, kube-migrate installed from its release images as
# the README says, a stateful Deployment, `kubectl drain` of its node and what happened. Where
# real nodes cannot run (nodes/up.sh says why: not root, no network namespaces, no cgroup v1,
# CRIU's kernel check), it says so and falls back to the local cluster of test kubelets.
#   --keep            leave the cluster running
#   --test-kubelet    use the test-kubelet cluster even where real nodes could run
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false test_kubelet=false
for a in "$@"; do
  case $a in --keep) keep=true ;; --test-kubelet) test_kubelet=true ;; *) echo "usage: $0 [--keep] [--test-kubelet]" >&2; exit 2 ;; esac
done

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if ! $test_kubelet; then
  say "Starting two real nodes: kubelet, CRI-O, crun, CRIU (first run builds them from source)"
  status=0
  nodes/up.sh 2 > /tmp/kube-migrate-demo-nodes.log 2>&1 || status=$?
  grep -E '^\[nodes' /tmp/kube-migrate-demo-nodes.log || true
  if [[ $status == 0 ]]; then
    $keep && exec scripts/demo-real.sh --keep
    exec scripts/demo-real.sh
  fi
  why=$(grep -m1 '^SKIPPED' /tmp/kube-migrate-demo-nodes.log || echo "nodes/up.sh exited $status, see /tmp/kube-migrate-demo-nodes.log")
  say "Real nodes are not possible here (${why#SKIPPED: }): falling back to the test kubelet, which simulates the runtime"
  nodes/down.sh > /dev/null 2>&1 || true
fi
$keep || trap 'scripts/local-cluster.sh down >/dev/null 2>&1 || true' EXIT

say "Starting the local cluster and kube-migrate (first run builds Kubernetes from source)"
eval "$(scripts/local-cluster.sh up)"
kubectl get nodes -o wide

say "A stateful workload on node-a: a counter holding 8 MiB of state in memory"
kubectl create namespace demo >/dev/null
kubectl cordon node-b node-c >/dev/null
kubectl apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: { name: counter, namespace: demo }
spec:
  replicas: 1
  selector: { matchLabels: { app: counter } }
  template:
    metadata:
      labels: { app: counter }
      annotations: { migrate.io/stateful: "true" }
    spec:
      containers:
        - name: app
          image: registry.local/counter:1
          env: [{ name: STATE_BYTES, value: "8388608" }]
YAML
kubectl -n demo rollout status deploy/counter --timeout=90s
kubectl uncordon node-b node-c >/dev/null
sleep 3
pod=$(kubectl -n demo get pod -l app=counter -o jsonpath='{.items[0].metadata.name}')
echo "pod $pod on $(kubectl -n demo get pod "$pod" -o jsonpath='{.spec.nodeName}'), its log so far:"
kubectl -n demo logs "$pod" | sed -n '1p;$p'

say "kubectl drain node-a"
start=$(date +%s%N)
kubectl drain node-a --ignore-daemonsets --delete-emptydir-data --timeout=300s
echo "drain took $(( ($(date +%s%N) - start) / 1000000 )) ms"

say "The PodMigration"
for _ in $(seq 120); do
  phase=$(kubectl -n demo get podmigrations -o jsonpath='{.items[0].status.phase}')
  [[ $phase == Succeeded || $phase == Failed ]] && break
  sleep 0.5
done
kubectl -n demo get podmigrations -o wide
echo
kubectl -n demo get podmigrations -o jsonpath='{range .items[0].status.phases[*]}{"  "}{.phase}{": "}{.seconds}{" s\n"}{end}'
echo "downtime (source stopped -> replacement Ready): $(kubectl -n demo get podmigrations -o jsonpath='{.items[0].status.downtimeSeconds}') s"
echo "archive: $(kubectl -n demo get podmigrations -o jsonpath='{.items[0].status.containers[0].sizeBytes}') bytes, $(kubectl -n demo get podmigrations -o jsonpath='{.items[0].status.containers[0].digest}')"

say "Where the pod went"
kubectl -n demo get pods -o wide
new=$(kubectl -n demo get pod -l app=counter -o jsonpath='{.items[0].metadata.name}')
echo "first log line of $new:"
kubectl -n demo logs "$new" | head -n 1
echo
echo "events of the PodMigration:"
kubectl -n demo get events --field-selector involvedObject.kind=PodMigration --sort-by=.lastTimestamp \
  -o custom-columns=REASON:.reason,MESSAGE:.message
if $keep; then
  echo
  echo "cluster left running: export KUBECONFIG=$KUBECONFIG; stop it with scripts/local-cluster.sh down"
fi
