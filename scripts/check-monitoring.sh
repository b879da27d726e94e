#!/usr/bin/env bash
# Checks the monitoring kit in deploy/monitoring/ (README "Monitoring"); a step of scripts/test.sh.
#   1. the PrometheusRule is the rules file, regenerated (scripts/gen-prometheusrule.sh --check)
#   2. promtool check rules: the rules file and the PrometheusRule's spec
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
# Env: PROMTOOL (use this binary), KUBE_MIGRATE_CACHE, GO (go command).
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

find_promtool() {
  local candidate
  for candidate in "${PROMTOOL:-}" "$(command -v promtool || true)" "$built"; do
    if [[ -n $candidate ]] && recent_enough "$candidate"; then echo "$candidate"; return; fi
  done
  if [[ -z ${PROMTOOL:-} ]] && ! command -v promtool >/dev/null; then
    log "installing promtool from Debian's archive (apt-get install prometheus)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2 ||
      { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2; } ||
      log "apt could not install prometheus"
    if recent_enough /usr/bin/promtool; then echo /usr/bin/promtool; return; fi
  fi
  log "no promtool >= $PROMTOOL_MIN; building $PROMTOOL_MODULE from the Go module proxy -> $built"
  local go=${GO:-$(command -v go || echo /usr/local/go/bin/go)} tmp
  [[ -x $go ]] || { log "no go toolchain found (set GO=/path/to/go)"; exit 1; }
  mkdir -p "$cache/bin"
  tmp=$(mktemp -d "$cache/bin/promtool-$PROMTOOL_MODULE.tmp.XXXXXX")
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-buildvcs=false \
    "$go" install -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMTOOL_MODULE#v0.}" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_MODULE" >&2
  rm -rf "${built%/promtool}"
  mv "$tmp" "${built%/promtool}"
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

log "2. promtool check rules"
python3 -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], sys.stdout)' \
  "$dir/prometheusrule.yaml" > "$work/prometheusrule-spec.yaml"
"$PROMTOOL" check rules "$dir/kube-migrate.rules.yaml" "$work/prometheusrule-spec.yaml"

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
