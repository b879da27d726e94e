#!/usr/bin/env bash
# The project's test command (README "Tests"); CI runs exactly this.
#   1. formatting and lints (clippy -D warnings)
#   2. the committed CRD matches the Rust types (crdgen)
#   3. unit and integration tests (cargo test); the alert rules and dashboard (scripts/check-monitoring.sh);
#      the Helm chart: lint, template, no drift from manifests/ (scripts/check-helm.sh);
#      the plugin's release archives for linux amd64/arm64 and its krew manifest, installed with
#      krew (scripts/release.sh); 20 s of coverage-guided fuzzing per fuzz target
#      (scripts/fuzz.sh --quick, docs/fuzzing.md)
#   4. end-to-end scenarios on a local cluster built from upstream sources (scripts/e2e.sh),
#      real crun + CRIU containers included where the machine allows; the Helm chart installed
#      on a local control plane (scripts/helm-live.sh); a real Prometheus scraping the local
#      cluster through drains and a provoked failure (scripts/dashboard-live.sh);
#      KUBE_MIGRATE_SKIP_E2E=1 skips them for a quick local run (CI never sets it)
#   5. short versions of the benchmarks (scripts/bench.sh --quick: admission, transfer, image
#      build; scripts/bench-compression.sh --quick: zstd on a CRIU image; scripts/bench-drain.sh
#      --quick: drain on the local cluster), so they cannot rot
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Tools the scripts use that a fresh machine may lack, from Debian's archive.
# socat: scripts/bench-ceiling.sh's raw TLS copy.
for tool in jq socat; do
  if ! command -v "$tool" >/dev/null; then
    step "installing $tool (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$tool" ||
      { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$tool"; }
  fi
done

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "CRD drift check (manifests/crd.yaml vs crdgen)"
generated=$(mktemp)
cargo run --quiet --locked --bin crdgen > "$generated"
if ! diff -u manifests/crd.yaml "$generated"; then
  echo "manifests/crd.yaml is stale: run 'cargo run --bin crdgen > manifests/crd.yaml'" >&2
  exit 1
fi
rm -f "$generated"

step "cargo test"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
cargo test --workspace --locked 2>&1 | tee -a "$results"

step "image writer unit tests (scripts/test_oci_image.py)"
python3 -m unittest discover -s scripts -p 'test_*.py'

step "monitoring: alert rules (promtool check + test) and dashboard metric names (scripts/check-monitoring.sh)"
scripts/check-monitoring.sh

step "Helm chart: lint, template, drift against kubectl kustomize manifests (scripts/check-helm.sh)"
scripts/check-helm.sh

step "kubectl plugin release: static amd64 + arm64 archives, krew manifest, krew install (scripts/release.sh)"
scripts/release.sh

step "fuzzing, 20 s per target (scripts/fuzz.sh --quick; longer runs: docs/fuzzing.md)"
scripts/fuzz.sh --quick 2>&1 | tee -a "$results"

if [[ ${KUBE_MIGRATE_SKIP_E2E:-} == 1 ]]; then
  echo "end-to-end scenarios skipped (KUBE_MIGRATE_SKIP_E2E=1)"
else
  step "end-to-end scenarios (scripts/e2e.sh)"
  scripts/e2e.sh 2>&1 | tee -a "$results"
  step "a real Prometheus on the local cluster: drains, a provoked failure fires its alert, the dashboard's queries (scripts/dashboard-live.sh)"
  scripts/dashboard-live.sh 2>&1 | tee -a "$results"
  step "Helm chart installed, upgraded and uninstalled on a local control plane (scripts/helm-live.sh)"
  scripts/helm-live.sh 2>&1 | tee -a "$results"
  step "end-to-end on real nodes: kubelet + CRI-O + CRIU (scripts/e2e-real.sh)"
  scripts/e2e-real.sh 2>&1 | tee -a "$results"
  step "benchmarks, short versions (figures: docs/benchmarks.md)"
  scripts/bench.sh --quick
  scripts/bench-compression.sh --quick
  scripts/bench-drain.sh --quick
fi
# One closing line for everything that ran. A scenario that could not run on this machine
# prints "SKIPPED: <why>" and counts as skipped, not passed (its test passed: p - s). Each fuzz
# target that ran clean counts as one test; a fuzz step that could not run is one skip.
grep '^SKIPPED:' "$results" || true
awk '/^test result:/ { p += $4; f += $6 } /^FUZZ PASSED:/ || /^SKIPPED: fuzz/ { p++ } /^SKIPPED:/ { s++ }
     /^helm-live: [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 }
     /^dashboard-live: ok / { p++ }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", p - s, f, s }' "$results"
