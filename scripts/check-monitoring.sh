#!/usr/bin/env bash
# Checks the monitoring kit in deploy/monitoring/ (README "Monitoring"); a step of scripts/test.sh.
#   1. the PrometheusRule is the rules file, regenerated (scripts/gen-prometheusrule.sh --check)
#   2. promtool check rules: the rules file and the PrometheusRule's spec; promtool check config:
#      deploy/monitoring/prometheus.yml (when this promtool knows Kubernetes service discovery)
#   3. promtool test rules: deploy/monitoring/tests/*.test.yaml (every alert firing and not)
#   4. every metric and label named by a rule or a dashboard query is served by kube-migrate:
#      scripts/check_metric_names.py against a scrape of the product's admin router
#      (cargo run --example metrics-scrape)
#   5. both checks can fail: a rule without its new-series operand must fail the unit tests,
#      a dashboard naming a metric that does not exist must fail the name check
#
# promtool: the one on PATH if it is at least $PROMTOOL_MIN; else Debian's `prometheus` package
# (apt; it ships promtool); else built from the Go module proxy
# (github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_MODULE), cached under
# ${KUBE_MIGRATE_CACHE:-~/.cache/kube-migrate}/bin/promtool-<module version>/.
# Env: PROMTOOL (use this binary), PROMTOOL_FROM_SOURCE=1 (ignore PATH and apt: the Go build),
#      KUBE_MIGRATE_CACHE, GO (go command).
set -euo pipefail
cd "$(dirname "$0")/.."

# The rules and tests were written and run with Debian bookworm's promtool 2.42; older ones
# are not tested.
PROMTOOL_MIN=2.42.0
PROMTOOL_MODULE=v0.316.0
dir=deploy/monitoring
cache="${KUBE_MIGRATE_CACHE:-${HOME:?HOME is unset}/.cache/kube-migrate}"
built="$cache/bin/promtool-$PROMTOOL_MODULE/promtool"

log() { printf '[check-monitoring] %s\n' "$*" >&2; }

version_of() { # promtool binary -> "2.42.0"
  "$1" --version 2>/dev/null | sed -n '1s/^promtool, version \([0-9][0-9.]*\).*/\1/p'
}
recent_enough() { # promtool binary
  local v
  [[ -x $1 ]] || return 1
  v=$(version_of "$1")
  [[ -n $v && $(printf '%s\n%s\n' "$PROMTOOL_MIN" "$v" | sort -V | head -1) == "$PROMTOOL_MIN" ]]
}

apt_prometheus() {
  log "installing promtool from Debian's archive (apt-get install prometheus)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2; } ||
    log "apt could not install prometheus"
}

# Module v0.X.Y is Prometheus 2.X.Y, v0.3XY.Z is 3.XY.Z (their tagging since 3.0).
module_release() {
  local m=${1#v0.} minor patch
  minor=${m%%.*} patch=${m#*.}
  if ((minor >= 300)); then echo "3.$((minor - 300)).$patch"; else echo "2.$minor.$patch"; fi
}

build_promtool() {
  local go=${GO:-$(command -v go || echo /usr/local/go/bin/go)} tmp
  log "building promtool $PROMTOOL_MODULE from the Go module proxy -> $built (minutes, once)"
  [[ -x $go ]] || { log "no go toolchain found (set GO=/path/to/go)"; exit 1; }
  mkdir -p "$cache/bin"
  tmp=$(mktemp -d "$cache/bin/promtool-$PROMTOOL_MODULE.tmp.XXXXXX")
  chmod 755 "$tmp"
  # shellcheck disable=SC2064 # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-buildvcs=false "$go" install -trimpath \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$(module_release "$PROMTOOL_MODULE")" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_MODULE" >&2
  rm -rf "${built%/promtool}"
  mv "$tmp" "${built%/promtool}"
  trap - EXIT
}

# PROMTOOL=<binary> uses that one; PROMTOOL_FROM_SOURCE=1 skips PATH and apt (tests the build).
find_promtool() {
  if [[ -n ${PROMTOOL:-} ]]; then
    recent_enough "$PROMTOOL" || { log "PROMTOOL=$PROMTOOL is not a promtool >= $PROMTOOL_MIN"; exit 1; }
    echo "$PROMTOOL"; return
  fi
  local from_source=${PROMTOOL_FROM_SOURCE:-0} path_tool
  path_tool=$(command -v promtool || true)
  if ((!from_source)) && [[ -n $path_tool ]] && recent_enough "$path_tool"; then echo "$path_tool"; return; fi
  if recent_enough "$built"; then echo "$built"; return; fi
  if ((!from_source)); then
    [[ -n $path_tool ]] || apt_prometheus
    path_tool=$(command -v promtool || true)
    if [[ -n $path_tool ]] && recent_enough "$path_tool"; then echo "$path_tool"; return; fi
    log "no promtool >= $PROMTOOL_MIN from apt (${path_tool:-none})"
  fi
  build_promtool
  recent_enough "$built" || { log "$built does not answer --version >= $PROMTOOL_MIN"; exit 1; }
  echo "$built"
}

PROMTOOL=$(find_promtool)
log "promtool: $PROMTOOL ($("$PROMTOOL" --version 2>&1 | head -1))"

if ! python3 -c 'import yaml' 2>/dev/null; then
  log "installing python3-yaml (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-yaml >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-yaml >&2; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "1. the PrometheusRule is generated from the rules file"
scripts/gen-prometheusrule.sh --check

log "2. promtool check rules, check config"
python3 -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], sys.stdout)' \
  "$dir/prometheusrule.yaml" > "$work/prometheusrule-spec.yaml"
"$PROMTOOL" check rules "$dir/kube-migrate.rules.yaml" "$work/prometheusrule-spec.yaml"

# Debian builds Prometheus without Kubernetes service discovery (its client libraries are not
# packaged), so its promtool cannot parse kubernetes_sd_configs; an upstream build can.
if "$PROMTOOL" check config "$dir/prometheus.yml" > "$work/config.out" 2>&1; then
  cat "$work/config.out"
elif grep -q 'field kubernetes_sd_configs not found' "$work/config.out"; then
  echo "not checked: $dir/prometheus.yml (this promtool has no Kubernetes service discovery)"
else
  cat "$work/config.out" >&2
  exit 1
fi

log "3. promtool test rules"
"$PROMTOOL" test rules "$dir"/tests/*.test.yaml

log "4. metric and label names: rules and dashboard against the admin router's /metrics"
cargo run --quiet --locked --example metrics-scrape > "$work/scrape.txt"
python3 scripts/check_metric_names.py --scrape "$work/scrape.txt" \
  --rules "$dir/kube-migrate.rules.yaml" "$dir/prometheusrule.yaml" --dashboard "$dir/grafana-dashboard.json"

log "5. the checks can fail"
# Without the operand that counts counter series born at 1, the first StateLost is missed.
mkdir -p "$work/broken/tests"
cp "$dir"/tests/*.test.yaml "$work/broken/tests/"
python3 - "$dir/kube-migrate.rules.yaml" "$work/broken/kube-migrate.rules.yaml" <<'EOF'
import sys
rules = open(sys.argv[1]).read()
operand = "(kube_migrate_migrations_total unless kube_migrate_migrations_total offset 15m)"
assert operand in rules, "self-test: the operand to remove is not in the rules any more"
open(sys.argv[2], "w").write(rules.replace(operand, "(vector(0) == 1)"))
EOF
if "$PROMTOOL" test rules "$work"/broken/tests/*.test.yaml > "$work/broken.out" 2>&1; then
  log "self-test failed: the unit tests pass on rules that miss the first StateLost"
  exit 1
fi
grep -q 'alertname: KubeMigrateStateLost' "$work/broken.out" ||
  { cat "$work/broken.out" >&2; log "self-test: expected a KubeMigrateStateLost failure"; exit 1; }
echo "ok: the unit tests fail on rules without the new-series operand"
# A dashboard query naming a metric kube-migrate does not serve (a counter without _total).
sed 's/kube_migrate_webhook_decisions_total\[/kube_migrate_webhook_decisions[/' "$dir/grafana-dashboard.json" \
  > "$work/broken-dashboard.json"
if python3 scripts/check_metric_names.py --scrape "$work/scrape.txt" --dashboard "$work/broken-dashboard.json" \
  > "$work/broken-names.out" 2>&1; then
  log "self-test failed: the name check accepts a dashboard naming kube_migrate_webhook_decisions"
  exit 1
fi
grep -q '^MISSING: .*metric kube_migrate_webhook_decisions is not served' "$work/broken-names.out" ||
  { cat "$work/broken-names.out" >&2; log "self-test: expected the missing metric to be reported"; exit 1; }
echo "ok: the name check fails on a dashboard naming kube_migrate_webhook_decisions (no _total)"
