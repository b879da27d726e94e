#!/usr/bin/env bash
# The project's test command (README "Tests"); CI runs exactly this.
#   1. formatting and lints (clippy -D warnings)
#   2. the committed CRD matches the Rust types (crdgen)
#   3. unit and integration tests (cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

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
log=$(mktemp)
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "\ncargo test: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
