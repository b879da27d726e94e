#!/usr/bin/env bash
# End-to-end on real nodes (issue #12): two nodes with a real kubelet, CRI-O, crun and CRIU
# (nodes/up.sh, with the node setup of docs/install-cri-o.md and kube-migrate's runtime hold),
# kube-migrate installed exactly as the README's "Install on a real cluster" says: the release
# images of scripts/images.sh loaded into the nodes' runtime under the names the overlay pins,
# `kubectl apply -k overlays/images`, `KM_EXTRA_SANS=127.0.0.1 certs/install.sh`
# (nodes/product.sh install-release). Then, each reported like a cargo test:
#   bench --quick   nodes/bench.sh for 1 MiB: a real memhog restored with its memory checksum
#   drain-test      `kubectl drain` of a node with an opted-in counter: Succeeded, the source held
#                   frozen from before its checkpoint until killed, and its last number + 1 = the
#                   replacement's first (no number twice, none skipped)
#   workloads-test  an opted-in Deployment, StatefulSet and two-container pod plus an unannotated
#                   Deployment drained together: the opted-in ones restored (new pods, every
#                   container's count going on from before the pod existed), the plain one evicted
#   plugin-test     `kubectl migrate pod --to` (drain-test's checks); a checkpoint-only backup
#                   restored later as a copy on the other node, the original running on untouched
#   leader-test     the controller's leader force-deleted mid-migration: a new leader finishes it
#   tcp-test        a TCP server (nodes/tcp-test.sh) drained with a client pod connected through
#                   its Service: the connection closed (CRIU tcp-close, docs/install-cri-o.md
#                   section 6), the client reconnects to the restored pod (new UID) and gets the
#                   source's last number + 1 from its memory
#   base-image-test a pod from an image only the drained node has: refused before any freeze (the
#                   target agent's check), the same pod counting on; moved once km-node-2 has it
#   rollback-test   a transfer failing after the freeze: the same pod (UID, no restart) counts on
#                   after its pause, the drain is held; then a second drain moves it
#
#   scripts/e2e-real.sh        up, images, install, scenarios, down (always)
#
# Prints "SKIPPED: <why>" (counted as skipped by scripts/test.sh) when this machine cannot run
# real nodes (nodes/up.sh exits 77: not root, no network namespaces, no cgroup v1, CRIU's
# kernel check fails).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

# Every scenario wants a new cluster: nodes/up.sh keeps etcd data and node storage it finds (for
# a quick restart), and objects left by an earlier run on this machine (a half-done migration
# that re-creates its replacement) broke the bench once. What is left when it cannot run (no
# root) is its business to report.
nodes/down.sh --purge > /dev/null 2>&1 || true
status=0
nodes/up.sh 2 || status=$?
if [[ $status == 77 ]]; then
  echo "test result: ok. 1 passed; 0 failed; 0 ignored (real nodes: skipped)"
  exit 0 # nodes/up.sh printed the SKIPPED line
fi
trap 'nodes/down.sh > /dev/null 2>&1 || true' EXIT
[[ $status == 0 ]] || { echo "FAIL: nodes/up.sh exited $status"; exit "$status"; }

# README "Install on a real cluster", step 1 (the images) ...
scripts/images.sh > /tmp/kube-migrate-images.log 2>&1 ||
  { tail -n 30 /tmp/kube-migrate-images.log; echo "FAIL: scripts/images.sh"; exit 1; }
grep -A3 '^==> done' /tmp/kube-migrate-images.log
# ... steps 2 and 3, and the node trust of docs/install-cri-o.md.
nodes/product.sh install-release
echo "installed as the README says: $((SECONDS - started)) s"

# The kubectl plugin, as a user copies it onto the PATH (plugin-test).
cargo build --quiet --locked -p kubectl-migrate
passed=0 failed=0
# rollback-test last: it changes the controller's transfer deadline and restores it on exit.
for t in "nodes/product.sh drain-test" "nodes/product.sh workloads-test" "nodes/product.sh plugin-test" \
  "nodes/product.sh leader-test" "nodes/product.sh base-image-test" "nodes/bench.sh --quick" "nodes/tcp-test.sh" "nodes/product.sh rollback-test"; do
  echo "== $t"
  if $t; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $t"; fi
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
