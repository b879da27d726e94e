#!/usr/bin/env bash
# Loads an OCI archive into the containers-storage of running harness nodes, where CRI-O finds it
# (pods then use it with imagePullPolicy: Never or IfNotPresent).
#
# Usage: nodes/load-image.sh FILE.oci.tar REF [NODE_INDEX...]     (default: every running node)
#   REF e.g. localhost/kube-migrate/agent:0.1.0 (an unqualified name gets CRI-O's "localhost/"
#   only if spelled so: give the full reference the pods use)
# Env: KUBE_MIGRATE_NODES_DIR [/tmp/kube-migrate-nodes]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case "${1:-}" in -h|--help|"") sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 2 ;; esac
# shellcheck source=nodes/lib.sh
source "$here/lib.sh"
file=$1 ref=${2:?usage: load-image.sh FILE.oci.tar REF [NODE_INDEX...]}; shift 2
[[ -s $file ]] || km_die "no such archive: $file"
nodes=("$@"); ((${#nodes[@]})) || mapfile -t nodes < <(existing_nodes)
# The nodes see $KM_NODES_DIR/images at the same path (nodes/up.sh): stage the archive there.
mkdir -p "$KM_NODES_DIR/images/load"
staged=$(mktemp "$KM_NODES_DIR/images/load/XXXXXX.oci.tar")
trap 'rm -f "$staged"' EXIT
cp "$file" "$staged"
for i in "${nodes[@]}"; do
  helper_pid "$i" > /dev/null || { km_log "$(node_name "$i"): not running, skipped"; continue; }
  start=$SECONDS
  node_exec "$i" skopeo copy -q "oci-archive:$staged" "containers-storage:$ref"
  km_log "$(node_name "$i"): loaded $ref ($((SECONDS - start)) s)"
done
