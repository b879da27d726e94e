#!/usr/bin/env bash
# scripts/demo.sh on real nodes (it runs this once nodes/up.sh succeeded): kube-migrate from its
# release images as the README installs it, a stateful Deployment on km-node-1, `kubectl drain
# km-node-1`, and what happened: the PodMigration, where the freeze went, the counter going on.
#   --keep   leave the nodes running (nodes/down.sh stops them)
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
[[ ${1:-} == --keep ]] && keep=true
$keep || trap 'nodes/down.sh > /dev/null 2>&1 || true' EXIT
export KUBECONFIG=${KUBE_MIGRATE_NODES_DIR:-/tmp/kube-migrate-nodes}/cluster/admin.kubeconfig
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing kube-migrate as the README says: release images, kubectl apply -k overlays/images, certs/install.sh"
scripts/images.sh > /tmp/kube-migrate-demo-images.log 2>&1 ||
  { tail -n 20 /tmp/kube-migrate-demo-images.log; exit 1; }
nodes/product.sh install-release
kubectl get nodes -o wide

say "A stateful Deployment on km-node-1: a counter, 10 numbers a second, kept only in its memory"
# The nodes' control plane keeps its state between runs: start from a clean slate.
kubectl uncordon km-node-1 km-node-2 > /dev/null
kubectl delete namespace demo --ignore-not-found --wait=true > /dev/null
kubectl create namespace demo > /dev/null
kubectl cordon km-node-2 > /dev/null
kubectl apply -f - << 'YAML'
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
      terminationGracePeriodSeconds: 1
      containers:
        - name: app
          image: localhost/kube-migrate/busybox:latest
          imagePullPolicy: IfNotPresent
          command: ["/bin/sh", "-c", "i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done"]
YAML
kubectl -n demo rollout status deploy/counter --timeout=90s
kubectl uncordon km-node-2 > /dev/null
sleep 3
pod=$(kubectl -n demo get pod -l app=counter -o jsonpath='{.items[0].metadata.name}')
echo "pod $pod on $(kubectl -n demo get pod "$pod" -o jsonpath='{.spec.nodeName}'), counting: $(kubectl -n demo logs "$pod" | tail -n 1)"

say "kubectl drain km-node-1"
start=$(date +%s%N)
kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --timeout=300s
echo "drain took $((($(date +%s%N) - start) / 1000000)) ms"

say "The PodMigration"
for _ in $(seq 120); do
  phase=$(kubectl -n demo get podmigrations -o jsonpath='{.items[0].status.phase}')
  [[ $phase == Succeeded || $phase == Failed ]] && break
  sleep 0.5
done
kubectl -n demo get podmigrations -o wide
pm=$(kubectl -n demo get podmigrations -o jsonpath='{.items[0].metadata.name}')
echo
echo "source frozen at $(kubectl -n demo get podmigration "$pm" -o jsonpath='{.status.sourceFrozenAt}'), never ran after its checkpoint (window $(kubectl -n demo get podmigration "$pm" -o jsonpath='{.status.sourceWindowSeconds}') s); downtime $(kubectl -n demo get podmigration "$pm" -o jsonpath='{.status.downtimeSeconds}') s. Where it went (seconds after the freeze):"
kubectl -n demo get podmigration "$pm" -o json | jq -r '
  def ts: capture("(?<s>[^.Z]+)(\\.(?<f>[0-9]+))?Z") | ((.s + "Z") | fromdateiso8601) + ("0." + (.f // "0") | tonumber);
  [.status.timeline[] | select(.step != "queued")] as $t | ($t[0].at | ts) as $f
  | $t[] | "  \(.step): \((.at | ts) - $f | . * 100 | round / 100) s"'

say "Where the pod went"
kubectl -n demo get pods -o wide
new=$(kubectl -n demo get pod -l app=counter -o jsonpath='{.items[0].metadata.name}')
echo "its log across the migration (restored by CRI-O: the count goes on where the frozen source stopped):"
kubectl -n demo logs --timestamps "$new" | awk '{ split(substr($1, 12), t, ":"); s = t[1] * 3600 + t[2] * 60 + t[3]
  if (NR > 1 && s - p > 0.5) printf "  %s  (frozen %.1f s: checkpoint, transfer, restore)\n  %s\n", prev, s - p, $2; p = s; prev = $2 }'
echo "  ... now at $(kubectl -n demo logs "$new" | tail -n 1)"
echo
echo "events of the PodMigration:"
kubectl -n demo get events --field-selector involvedObject.kind=PodMigration --sort-by=.lastTimestamp \
  -o custom-columns=REASON:.reason,MESSAGE:.message
if $keep; then
  echo
  echo "nodes left running: export KUBECONFIG=$KUBECONFIG; stop them with nodes/down.sh"
fi
