#!/usr/bin/env bash
# dashboard-live.sh — a real Prometheus (Debian's package) scrapes the local cluster's webhook
# (the leader's controller metrics) and its three agents, with kube-migrate's alert rules loaded,
# while two nodes are drained and one migration is made to fail; then checks:
#   * every target is up, and Prometheus counts as many succeeded migrations as the API server
#     holds Succeeded PodMigrations (taken after the drains), and the failed one with its reason;
#   * KubeMigrateMigrationFailed fires for the provoked failure (reason NoTarget), and
#     KubeMigrateStateLost does not (nothing lost state);
#   * every main panel of the Grafana dashboard has data (scripts/dashboard_picture.py runs
#     the panels' own queries).
# With --picture FILE it also draws those panels into FILE (matplotlib, Debian's
# python3-matplotlib, installed with apt if missing): docs/dashboard.png was made by
#   scripts/dashboard-live.sh --picture docs/dashboard.png
#
# Usage: scripts/dashboard-live.sh [--picture FILE]   (Prometheus on 127.0.0.1:29290;
#        KM_DASHBOARD_KEEP=1 leaves it and the local cluster running)
set -euo pipefail
cd "$(dirname "$0")/.."
picture=
case ${1:-} in
  --picture) picture=$(realpath -m "${2:?--picture FILE}") ;;
  "") ;;
  *) echo "usage: $0 [--picture FILE]" >&2; exit 2 ;;
esac
prom_port=${KM_DASHBOARD_PROMETHEUS_PORT:-29290}
prom=http://127.0.0.1:$prom_port
ns=dashboard-live

log() { printf '[dashboard-live] %s\n' "$*" >&2; }
die() {
  log "FAILED: $*"
  if [[ -n ${KUBECONFIG:-} ]]; then
    kubectl get podmigrations -A -o custom-columns=NAME:.metadata.name,PHASE:.status.phase,REASON:.status.reason,SOURCE:.spec.sourceNode,TARGET:.status.targetNode >&2 || true
    kubectl get podmigrations -A -o json |
      jq -r '.items[] | select(.status.phase == "Failed") | "\(.metadata.name): \(.status.message)"' >&2 || true
    curl -sf "$prom/api/v1/query" --data-urlencode 'query=kube_migrate_migrations_total[5m]' |
      jq -c '.data.result[] | {metric: .metric, values: [.values[] | .[1]] | unique}' >&2 || true
    rm -rf /tmp/dashboard-live-logs
    if cp -r /tmp/kube-migrate-cluster/km/logs /tmp/dashboard-live-logs &&
      kubectl get podmigrations -A -o yaml >/tmp/dashboard-live-logs/podmigrations.yaml; then
      log "logs and PodMigrations kept in /tmp/dashboard-live-logs"
    fi
  fi
  exit 1
}

install_apt() { # package
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$1" >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$1" >&2; }
}
command -v prometheus >/dev/null || { log "installing Debian's prometheus package (apt)"; install_apt prometheus; }
# The picture's Python: PATH's if it has matplotlib, else Debian's (which apt gives it to; PATH's
# may be another interpreter, as pyenv's on machines of this kind).
py=python3
if [[ -n $picture ]] && ! python3 -c 'import matplotlib' 2>/dev/null; then
  py=/usr/bin/python3
  if ! "$py" -c 'import matplotlib' 2>/dev/null; then
    log "installing Debian's python3-matplotlib (apt)"
    install_apt python3-matplotlib
  fi
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$prom_port") 2>/dev/null; then die "port $prom_port is in use"; fi

work=$(mktemp -d)
prom_pid=
cleanup() {
  if [[ ${KM_DASHBOARD_KEEP:-} == 1 ]]; then
    log "left running (KM_DASHBOARD_KEEP=1): Prometheus $prom (pid $prom_pid), the local cluster"
    return
  fi
  if [[ -n $prom_pid ]]; then kill "$prom_pid" 2>/dev/null || true; wait "$prom_pid" 2>/dev/null || true; fi
  scripts/local-cluster.sh down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

log "local cluster"
eval "$(scripts/local-cluster.sh up)"

log "Prometheus scraping the webhook (127.0.0.1:18080) and the agents (127.0.0.1:19090-19092)"
cp deploy/monitoring/kube-migrate.rules.yaml "$work/"
# The job names the rules and the dashboard expect; a 2 s scrape so a short run has points.
cat >"$work/prometheus.yml" <<'YAML'
global: { scrape_interval: 2s, evaluation_interval: 2s }
rule_files: [kube-migrate.rules.yaml]
scrape_configs:
  - job_name: kube-migrate-webhook
    static_configs: [{ targets: ["127.0.0.1:18080"] }]
  - job_name: kube-migrate-agent
    static_configs: [{ targets: ["127.0.0.1:19090", "127.0.0.1:19091", "127.0.0.1:19092"] }]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
for _ in $(seq 60); do curl -sf "$prom/-/ready" >/dev/null && break; sleep 1; done
curl -sf "$prom/-/ready" >/dev/null || { tail -20 "$work/prometheus.log" >&2; die "Prometheus not ready"; }
# Its first scrapes come a few seconds after it is ready (target discovery settles first): the
# run starts once every target was scraped, so the range holds what came before the drains.
for _ in $(seq 60); do
  [[ $(curl -sf "$prom/api/v1/query" --data-urlencode 'query=count(up == 1)' | jq -r '.data.result[0].value[1] // 0') == 4 ]] && break
  sleep 1
done
start=$(date +%s)

log "workload on node-a: 6 opted-in counters (4 of 2 MiB, 2 of 24 MiB) and one that cannot move"
kubectl create namespace "$ns" >/dev/null
kubectl cordon node-b node-c >/dev/null
deployment() { # name replicas state_bytes
  cat <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: { name: $1, namespace: $ns }
spec:
  replicas: $2
  selector: { matchLabels: { app: $1 } }
  template:
    metadata: { labels: { app: $1 }, annotations: { migrate.io/stateful: "true" } }
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{ name: app, image: registry.local/counter:1, env: [{ name: STATE_BYTES, value: "$3" }] }]
---
YAML
}
{
  deployment small 4 $((2 << 20))
  deployment large 2 $((24 << 20))
  # No node matches its target: the migration fails (NoTarget) and, on-failure evict, the
  # eviction goes through as it would without kube-migrate.
  cat <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: nowhere
  namespace: $ns
  annotations: { migrate.io/stateful: "true", migrate.io/target-node: node-zzz }
spec:
  nodeName: node-a
  terminationGracePeriodSeconds: 1
  containers: [{ name: app, image: registry.local/counter:1 }]
YAML
} | kubectl apply -f - >/dev/null
kubectl -n "$ns" wait --for=condition=Ready pod --all --timeout=120s >/dev/null
kubectl uncordon node-b node-c >/dev/null

log "kubectl drain node-a, then node-b"
kubectl drain node-a --ignore-daemonsets --delete-emptydir-data --force --timeout=300s >"$work/drain-a.log" 2>&1 ||
  { cat "$work/drain-a.log" >&2; die "drain of node-a"; }
kubectl uncordon node-a >/dev/null
kubectl -n "$ns" wait --for=condition=Ready pod -l 'app in (small,large)' --timeout=120s >/dev/null
kubectl drain node-b --ignore-daemonsets --delete-emptydir-data --force --timeout=300s >"$work/drain-b.log" 2>&1 ||
  { cat "$work/drain-b.log" >&2; die "drain of node-b"; }
kubectl uncordon node-b >/dev/null
# A drain ends once the state is verified elsewhere; restores may still be finishing.
for _ in $(seq 120); do
  running=$(kubectl get podmigrations -A -o json | jq '[.items[] | select(.status.phase != "Succeeded" and .status.phase != "Failed")] | length')
  [[ $running == 0 ]] && break
  sleep 1
done
[[ $running == 0 ]] || die "$running migrations still running 2 minutes after the drains"
sleep 10 # a few more scrapes and rule evaluations

succeeded=$(kubectl get podmigrations -A -o json | jq '[.items[] | select(.status.phase == "Succeeded")] | length')
failed=$(kubectl get podmigrations -A -o json | jq -r '[.items[] | select(.status.phase == "Failed") | .status.reason] | join(",")')
log "the API server holds $succeeded Succeeded PodMigrations and Failed ones with reasons [$failed]"
[[ $succeeded -ge 6 ]] || die "expected at least 6 succeeded migrations, found $succeeded"
[[ $failed == NoTarget ]] || die "expected exactly one failed migration, reason NoTarget: [$failed]"

instant() { # PromQL -> the first sample's value, or "none"
  curl -sf "$prom/api/v1/query" --data-urlencode "query=$1" | jq -r '.data.result[0].value[1] // "none"'
}
ups=$(instant 'sum(up{job=~"kube-migrate-webhook|kube-migrate-agent"})')
[[ $ups == 4 ]] || die "targets up: $ups of 4"
counted=$(instant 'sum(kube_migrate_migrations_total{outcome="succeeded"})')
[[ $counted == "$succeeded" ]] || die "Prometheus counts $counted succeeded migrations, the API server holds $succeeded"
counted_failed=$(instant 'sum(kube_migrate_migrations_total{outcome="failed",reason="NoTarget"})')
[[ $counted_failed == 1 ]] || die "Prometheus counts $counted_failed NoTarget failures"
log "Prometheus: 4 targets up, $counted succeeded and $counted_failed NoTarget failure, as the API server says"

firing() { # alertname [label=value] -> the firing alerts' labels, one JSON per line
  curl -sf "$prom/api/v1/alerts" |
    jq -c --arg name "$1" '.data.alerts[] | select(.labels.alertname == $name and .state == "firing") | .labels'
}
for _ in $(seq 30); do
  [[ -n $(firing KubeMigrateMigrationFailed) ]] && break
  sleep 2
done
alert=$(firing KubeMigrateMigrationFailed)
[[ $alert == *'"reason":"NoTarget"'* ]] || die "KubeMigrateMigrationFailed is not firing for NoTarget: ${alert:-nothing firing}"
log "firing: $alert"
[[ -z $(firing KubeMigrateStateLost) ]] || die "KubeMigrateStateLost fires, though no state was lost"
errors=$(curl -sf "$prom/api/v1/rules" | jq '[.data.groups[].rules[] | select(.health != "ok")] | length')
[[ $errors == 0 ]] || die "$errors rules are not healthy"

# What the dashboard shows over the run, as its panels compute it (increase() over the range):
# every success, and a mean drain duration for both drained nodes (a series born non-zero
# would lose its first event: the controller creates them at zero).
end=$(date +%s)
range=$((end - start))
# increase() extrapolates to the range's ends, only upwards here (the series starts at 0, where
# it stops): at most a 2 s scrape interval over the ~25 s range, about 8 %. A lost first event
# leaves it at most (n - 1) * 1.08, below n - 0.25 for the n here (about 9).
shown=$(instant "sum(increase(kube_migrate_migrations_total{outcome=\"succeeded\"}[${range}s]))")
awk -v v="$shown" -v n="$succeeded" 'BEGIN { exit !(v >= n - 0.25 && v <= n * 1.15 + 0.5) }' ||
  die "the dashboard's range shows $shown succeeded migrations, the API server holds $succeeded"
for node in node-a node-b; do
  mean=$(instant "sum(increase(kube_migrate_drain_duration_seconds_sum{node=\"$node\"}[${range}s])) / sum(increase(kube_migrate_drain_duration_seconds_count{node=\"$node\"}[${range}s]))")
  [[ $mean =~ ^[0-9.e+-]+$ && $mean != 0 ]] || die "no mean drain duration for $node on the dashboard: $mean"
  log "dashboard: mean drain duration of $node ${mean} s"
done
log "dashboard: $shown succeeded migrations in the range, as the API server says"

log "the dashboard's main panels, from Prometheus's query API"
"$py" scripts/dashboard_picture.py "$prom" "$start" "$end" ${picture:+--picture "$picture"}
echo "dashboard-live: ok ($range s of metrics; succeeded $succeeded, failed NoTarget 1, alert fired)"
