#!/usr/bin/env bash
# End-to-end scenarios against the local cluster (real control plane, test kubelets,
# kube-migrate agents and webhook, kubectl drain; real crun + CRIU containers where the
# machine allows). Brings it up, runs, brings it down.
#
#   scripts/e2e.sh            every scenario (e2e/tests/*.rs)
#   scripts/e2e.sh s8         only scenarios whose name contains "s8" (cargo test filter)
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'scripts/local-cluster.sh down >/dev/null 2>&1 || true' EXIT
# Build the scenarios before the cluster starts, so its clock runs only while they do.
cargo test --locked -p kube-migrate-e2e --test drain --test criu --test promise --test freeze --test limits --test plugin --test identity --no-run
# The scenarios are written around two active migrations per node (s11 drains eight pods
# against it), whatever the product's default.
export KUBE_MIGRATE_MAX_PER_NODE=${KUBE_MIGRATE_MAX_PER_NODE:-2}
scripts/local-cluster.sh up >/dev/null
# shellcheck disable=SC1091
source "${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster}/km/env"
# `kubectl migrate` finds the plugin on PATH, as it would for a user who copied it there.
export PATH="${CARGO_TARGET_DIR:-$PWD/target}/${KUBE_MIGRATE_PROFILE:-debug}:$PATH"
status=0
cargo test --locked -p kube-migrate-e2e --test drain --test criu --test promise --test freeze --test limits --test plugin --test identity --no-fail-fast -- --ignored --test-threads=1 --nocapture "$@" || status=$?
# What the product's ServiceAccounts did against what manifests/rbac.yaml grants them; a
# refused request (403) is a missing grant and fails the run.
echo "---- RBAC: requests of kube-migrate's ServiceAccounts (audit log) against manifests/rbac.yaml ----"
python3 scripts/rbac_audit.py "$KUBE_MIGRATE_CLUSTER_DIR/audit/audit.log" manifests/rbac.yaml || status=1
if ((status != 0)); then
  echo "---- logs ----"
  tail -n 40 "$KUBE_MIGRATE_CLUSTER_DIR"/km/logs/*.log || true
fi
exit $status
