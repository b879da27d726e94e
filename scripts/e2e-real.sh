#!/usr/bin/env bash
# End-to-end on real nodes (issue #12): two nodes with a real kubelet, CRI-O, crun and CRIU
# (nodes/up.sh), kube-migrate installed on them as OCI images of its debug binaries
# (nodes/product.sh install: the manifests with those images, certificates, the node trust of
# docs/install-cri-o.md; the README's release images from scripts/images.sh are not yet what
# this runs), and `kubectl drain` of a
# node with an opted-in counter: the PodMigration must succeed with the source held frozen from
# its checkpoint until it is killed, and the restored process must continue the count with no
# number twice and none skipped (nodes/product.sh drain-test); a transfer that fails after the
# checkpoint must thaw the same source, which counts on, and a second drain then moves it
# (nodes/product.sh rollback-test). The checkpoint image is pulled
# by CRI-O from the target agent's registry with the migration's pull credential (anonymous
# pulls are refused since then), so a pass also shows the runtime's authenticated pull.
#
#   scripts/e2e-real.sh        up, install, drain test, down (always)
#
# Prints "SKIPPED: <why>" (counted as skipped by scripts/test.sh) when this machine cannot run
# real nodes (nodes/up.sh exits 77: not root, no network namespaces, no cgroup v1, CRIU's
# kernel check fails). Binaries: the debug build in target/ (scripts/test.sh builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

# Two scenarios, reported like a cargo test so that scripts/test.sh counts it; a skip is an
# "ok" plus its SKIPPED line, as the CRIU scenario does.
status=0
nodes/up.sh 2 || status=$?
if [[ $status == 77 ]]; then
  echo "test result: ok. 1 passed; 0 failed; 0 ignored (real nodes: skipped)"
  exit 0 # nodes/up.sh printed the SKIPPED line
fi
trap 'nodes/down.sh > /dev/null 2>&1 || true' EXIT
[[ $status == 0 ]] || { echo "FAIL: nodes/up.sh exited $status"; exit "$status"; }

cargo build --locked -p kube-migrate-webhook -p kube-migrate-agent -p kube-migrate-certs
nodes/product.sh install "${CARGO_TARGET_DIR:-target}/debug"
passed=0 failed=0
for t in drain-test rollback-test; do
  echo "== nodes/product.sh $t"
  if nodes/product.sh "$t"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $t"; fi
done
if ((failed == 0)); then
  echo "test result: ok. $passed passed; 0 failed; 0 ignored (real nodes, $((SECONDS - started)) s)"
  # Passed: the nodes' storage (images, checkpoints: gigabytes) is not worth keeping.
  trap - EXIT
  nodes/down.sh --purge > /dev/null 2>&1 || true
else
  echo "test result: FAILED. $passed passed; $failed failed; 0 ignored (real nodes)"
  exit 1
fi
