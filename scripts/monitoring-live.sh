#!/usr/bin/env bash
# A live run of the alert rules in a real Prometheus server (Debian's `prometheus` package, the
# same build as the promtool of scripts/check-monitoring.sh), scraping kube-migrate's real admin
# router, without a cluster:
#   * `cargo run --example metrics-scrape -- --serve` serves the admin router as job
#     kube-migrate-webhook, with no finished migration at first and, after a while, the first
#     StateLost since its start (a counter series born at 1, which increase() alone misses);
#   * a second target, job kube-migrate-agent, where nothing listens (up == 0).
# Passes when Prometheus has loaded every rule without error, stores the metrics under the
# names the rules use, shows no KubeMigrateStateLost before the failure and a firing one after it
# (GET /api/v1/alerts), and KubeMigrateAgentDown pending. Not part of scripts/test.sh (about a
# minute); the rules' logic is unit-tested by promtool there.
#
# Usage: scripts/monitoring-live.sh   (ports: 127.0.0.1:29180 admin router, :29181 nothing,
#        :29190 Prometheus; override with KM_LIVE_PORT_BASE=<n>: n, n+1, n+10)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
base=${KM_LIVE_PORT_BASE:-29180}
router_port=$base agent_port=$((base + 1)) prom_port=$((base + 10))
prom="http://127.0.0.1:$prom_port"
FAIL_AFTER=20

log() { printf '[monitoring-live] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

command -v prometheus >/dev/null || {
  log "installing Debian's prometheus package (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2
}
for port in "$router_port" "$agent_port" "$prom_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use"; fi
done

work=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --quiet --locked --example metrics-scrape
"${CARGO_TARGET_DIR:-$ROOT/target}/debug/examples/metrics-scrape" \
  --serve "127.0.0.1:$router_port" --state-lost-after "$FAIL_AFTER" 2> "$work/router.log" &
pids+=($!)
started=$SECONDS

cat > "$work/prometheus.yml" <<EOF
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files:
  - $ROOT/deploy/monitoring/kube-migrate.rules.yaml
scrape_configs:
  - job_name: kube-migrate-webhook
    static_configs: [{ targets: ["127.0.0.1:$router_port"] }]
  - job_name: kube-migrate-agent
    static_configs: [{ targets: ["127.0.0.1:$agent_port"] }]
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 &
pids+=($!)

api() { curl -fsS "$prom/api/v1/$1" "${@:2}"; }
for _ in $(seq 60); do curl -fsS "$prom/-/ready" >/dev/null 2>&1 && break; sleep 0.5; done
curl -fsS "$prom/-/ready" >/dev/null || { cat "$work/prometheus.log" >&2; die "Prometheus not ready"; }
log "$(prometheus --version 2>&1 | head -1) ready on $prom"

rules=$(api rules | jq '[.data.groups[].rules[]] | {n: length, bad: [.[] | select(.health == "err") | .name]}')
log "rules loaded: $(jq -c . <<< "$rules")"
[[ $(jq '.n' <<< "$rules") -eq 13 && $(jq '.bad | length' <<< "$rules") -eq 0 ]] || die "rules: $rules"

query() { api query --data-urlencode "query=$1" | jq -r '.data.result | length'; }
for _ in $(seq 20); do [[ $(query 'kube_migrate_webhook_decisions_total') -gt 0 ]] && break; sleep 1; done
for name in kube_migrate_webhook_decisions_total kube_migrate_webhook_latency_seconds_bucket \
  kube_migrate_drain_duration_seconds_count kube_migrate_migrations_in_flight kube_migrate_agent_bytes_total; do
  [[ $(query "$name") -gt 0 ]] || die "Prometheus stores no $name"
done
log "scraped and stored under the rules' names (e.g. kube_migrate_webhook_decisions_total)"

alert_state() { # alertname -> firing / pending / none
  api alerts | jq -r --arg a "$1" '[.data.alerts[] | select(.labels.alertname == $a) | .state] | first // "none"'
}
before=$(alert_state KubeMigrateStateLost)
log "t=$((SECONDS - started))s, before the failure: KubeMigrateStateLost $before"
[[ $before == none ]] || die "KubeMigrateStateLost is $before before any failure"

state=none
while ((SECONDS - started < FAIL_AFTER + 40)); do
  state=$(alert_state KubeMigrateStateLost)
  [[ $state == firing ]] && break
  sleep 1
done
log "t=$((SECONDS - started))s ($(cat "$work/router.log")): KubeMigrateStateLost $state"
[[ $state == firing ]] || die "KubeMigrateStateLost did not fire"
api alerts | jq -c '.data.alerts[] | {alert: .labels.alertname, state, labels: (.labels | del(.alertname)), summary: .annotations.summary}'

agent=$(alert_state KubeMigrateAgentDown)
[[ $agent == pending ]] || die "KubeMigrateAgentDown is $agent, expected pending (for: 5m)"
log "KubeMigrateAgentDown pending (up == 0 for the agent target; fires after 5 minutes)"
echo "ok: a live Prometheus loaded the 13 rules, scraped the admin router, and fired KubeMigrateStateLost"
