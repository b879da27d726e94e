#!/usr/bin/env bash
# Where the time goes on real nodes (issues #10, #12, #14): for each size, a `memhog` pod holding
# that much pseudo-random anonymous memory (criu/memhog.c: its checksum is read back from memory)
# on km-node-1, `kubectl drain km-node-1`, and from its PodMigration: every phase's seconds, the
# freeze (source frozen -> replacement Ready: `downtimeSeconds`), the pause the program itself
# saw in its 100 ms ticks, the window, the archive size;
# the restored process must report the checksum it started with and verify=ok, and count on.
# Beside it, in the same run, the physical work without Kubernetes: crun + CRIU checkpoint and
# restore of the same program and size (criu/demo.sh memory scenario), and the ratio.
#
#   nodes/bench.sh [SIZES_MIB]        default "1 64 256"; needs nodes/up.sh and kube-migrate
#                                     installed (nodes/product.sh install[-release])
#   nodes/bench.sh --quick            1 MiB only, no baseline (what .ci/run runs)
# Prints one table; figures and the command go to docs/benchmarks.md by hand.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=nodes/lib.sh
source "$here/lib.sh"
# set -e ends the script on the first failing command; say which (the CI failed here once with
# nothing printed).
trap 'echo "nodes/bench.sh: line $LINENO: a command failed (exit $?)" >&2' ERR
quick=0
sizes="1 64 256"
case "${1:-}" in
  --quick) quick=1 sizes=1 ;;
  -h | --help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  "") ;;
  *) sizes=$1 ;;
esac
[[ $(id -u) == 0 ]] || { echo "SKIPPED: needs root"; exit 77; }
helper_pid 1 > /dev/null || { echo "SKIPPED: no real nodes running (nodes/up.sh)"; exit 77; }
P=$KM_NODES_DIR/bench
mkdir -p "$P"

# The memhog image: criu/images.sh's rootfs as a one-layer OCI archive, in every node.
if [[ ! -s $P/memhog.oci.tar ]]; then
  rm -rf "$P/memhog-rootfs"
  "$here/../criu/images.sh" memory "$P/memhog-rootfs" > /dev/null
  "$here/images/oci-archive.py" --out "$P/memhog.oci.tar" --ref localhost/kube-migrate/memhog:latest \
    --dir "$P/memhog-rootfs" --entrypoint /bin/memhog > /dev/null
fi
"$here/load-image.sh" "$P/memhog.oci.tar" localhost/kube-migrate/memhog:latest 2> /dev/null

declare -A BARE
if ((!quick)); then
  # The physical work, same machine, same run: crun checkpoint (CRIU dump + images) and crun
  # restore of memhog at each size, no kubelet, no CRI-O, no kube-migrate.
  SCENARIOS=memory MIBS="$sizes" "$here/../criu/demo.sh" > "$P/bare.log" 2>&1 ||
    { tail -n 20 "$P/bare.log" >&2; km_die "criu/demo.sh failed"; }
  # Its summary rows: MiB RSS_KiB ckpt_ms ckpt_criu_s images_KiB archive_KiB tar_ms restore_ms ...
  while read -r mib _ ck _ _ _ _ rs _; do
    BARE[$mib]=$((ck + rs))
  done < <(awk '/ MiB +RSS_KiB/ { on = 1; next } on && NF >= 9 && $1 ~ /^[0-9]+$/' "$P/bare.log")
fi

rows=() steps=() runtime=()
RUNTIME_STEPS="sandbox sandboxReady pulling pulled creating created starting restored"

# The target runtime's own steps for the replacement, from km-node-2's CRI-O log (info level),
# seconds after FROZEN (epoch seconds): where `scheduled -> started` goes.
runtime_steps() { # FROZEN POD
  python3 - "$1" "$2" "$(node_dir 2)/logs/crio.log" << 'PY'
import re, sys
from datetime import datetime
frozen, pod, log = float(sys.argv[1]), sys.argv[2], sys.argv[3]
marks = [("sandbox", f"Running pod sandbox: default/{pod}/POD"), ("sandboxReady", f"default/{pod}/POD"),
         ("pulling", "Pulling image: "), ("pulled", "Pulled image: "),
         ("creating", f"Creating container: default/{pod}/"), ("created", f"Created container "),
         ("starting", "Starting container: "), ("restored", "Restored container: ")]
seen = {}
for line in open(log, errors="replace"):
    m = re.match(r'time="([^"]+)" level=\w+ msg="(.*)"', line)
    if not m:
        continue
    ts = m.group(1).rstrip("Z")
    whole, _, frac = ts.partition(".")
    t = datetime.fromisoformat(whole + "+00:00").timestamp() + float("0." + (frac or "0"))
    if t < frozen:
        continue
    msg = m.group(2)
    for name, text in marks:
        if name in seen:
            continue
        if name == "sandboxReady" and not msg.startswith("Ran pod sandbox "):
            continue
        if text in msg and (name != "created" or f"default/{pod}/" in msg):
            seen[name] = t - frozen
            break
print("\t".join(f"{seen[n]:.2f}" if n in seen else "-" for n, _ in marks))
PY
}
STEPS='["checkpointed","verified","sourceKilled","imageBuilt","sourceTerminated","replacementSeen","released","scheduled","started","ready"]'

for mib in $sizes; do
  kubectl uncordon km-node-1 > /dev/null
  # A migration of an earlier memhog still running would re-create its replacement under the name.
  kubectl get podmigrations -o jsonpath='{range .items[?(@.spec.podName=="memhog")]}{.metadata.name}{"\n"}{end}' |
    xargs -r kubectl delete podmigration --wait=true > /dev/null
  kubectl delete pod memhog --ignore-not-found --wait=true > /dev/null
  cat << EOF | kubectl create -f - > /dev/null
apiVersion: v1
kind: Pod
metadata:
  name: memhog
  namespace: default
  annotations: {migrate.io/stateful: "true"}
spec:
  nodeName: km-node-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: memhog
    image: localhost/kube-migrate/memhog:latest
    imagePullPolicy: IfNotPresent
    env: [{name: MIB, value: "$mib"}, {name: REPORT_EVERY, value: "10"}]
    resources: {requests: {memory: "$((mib + 16))Mi"}}
EOF
  # shellcheck disable=SC2016 # for the inner bash
  wait_until 120 "memhog ${mib} MiB started" bash -c 'kubectl logs memhog | grep -q "^count 5$"' ||
    km_die "memhog did not start: $(kubectl get pod memhog -o wide; kubectl logs memhog | tail -n 3)"
  # Not `kubectl logs | grep -m1`: grep leaving early can kill kubectl with SIGPIPE, which
  # pipefail turns into a silent exit.
  kubectl logs memhog > "$P/memhog-start.log"
  start=$(grep -m1 '^memhog start' "$P/memhog-start.log")
  sum=$(grep -o 'checksum=[0-9a-f]*' <<< "$start")
  t0=$(date +%s%N)
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=600s > "$P/drain-$mib.log" 2>&1 ||
    { cat "$P/drain-$mib.log" >&2; km_die "kubectl drain failed"; }
  drain_ms=$((($(date +%s%N) - t0) / 1000000))
  pm=$(kubectl get podmigrations --sort-by=.metadata.creationTimestamp \
    -o jsonpath='{range .items[?(@.spec.podName=="memhog")]}{.metadata.name}{"\n"}{end}' | tail -n 1)
  wait_until 600 "PodMigration $pm Succeeded" \
    bash -c "[[ \$(kubectl get podmigration $pm -o jsonpath={.status.phase}) == Succeeded ]]" ||
    km_die "PodMigration $pm: $(kubectl get podmigration "$pm" -o jsonpath='{.status.phase}: {.status.message}')"
  # The restored process's own word: its log (which begins with the source's, kept in the
  # checkpoint) ends, seconds after the restore, with a report of the restored process (one a
  # second): the checksum it started with, read back from memory, verify=ok; and the count goes
  # on by one through the migration.
  sleep 3
  last=$(kubectl logs memhog | grep '^memhog report' | tail -n 1)
  [[ $last == *"$sum verify=ok"* ]] || km_die "restored memhog ${mib} MiB: last report '$last', expected $sum verify=ok"
  gaps=$(kubectl logs memhog | awk '$1 == "count" { if (n && $2 != prev + 1) print prev " -> " $2; prev = $2; n++ }')
  [[ -z $gaps ]] || km_die "memhog ${mib} MiB: count not continuous: $gaps"
  [[ $(kubectl get pod memhog -o jsonpath='{.spec.nodeName}') == km-node-2 ]] || km_die "memhog is not on km-node-2"
  # The pause the program itself saw: the longest gap between two of its `count` lines (one per
  # 100 ms tick; the restored log begins with the source's, timestamps kept), less one tick:
  # from its last tick before the freeze to its first after the restore, with no kubelet
  # status report or readiness in it. Compared with bare crun + CRIU, whose figure has none
  # either.
  paused=$(kubectl logs --timestamps memhog | awk '$2 == "count" {
      split(substr($1, 12), t, ":"); s = t[1] * 3600 + t[2] * 60 + t[3]
      if (n++ && s - p > g) g = s - p; p = s }
    END { printf "%.2f", g - 0.1 }')
  s=$(kubectl get podmigration "$pm" -o json)
  row=$(jq -r --arg mib "$mib" --arg drain "$drain_ms" '.status as $s
    | def ph(p): ([$s.phases[] | select(.phase == p) | .seconds] | add // 0);
    [$mib, (([$s.containers[].sizeBytes] | add) / 1048576 | . * 10 | round / 10),
     ph("Pending"), ph("Checkpointing"), ph("Transferring"), ph("BuildingImage"), ph("Restoring"),
     $s.downtimeSeconds, ($s.sourceWindowSeconds // "-"), (($drain | tonumber) / 1000),
     (if $s.freezeNote then "note" else "held" end)] | @tsv' <<< "$s")
  row+=$'\t'$paused
  bare=${BARE[$mib]:-}
  if [[ -n $bare ]]; then
    row+=$'\t'$(awk -v b="$bare" 'BEGIN { printf "%.2f", b / 1000 }')
    row+=$'\t'$(awk -v d="$(cut -f8 <<< "$row")" -v b="$bare" 'BEGIN { printf "%.1f", d * 1000 / b }')
    row+=$'\t'$(awk -v d="$paused" -v b="$bare" 'BEGIN { printf "%.1f", d * 1000 / b }')
  else
    row+=$'\t-\t-\t-'
  fi
  rows+=("$row")
  # Where the freeze goes: each step of the timeline, seconds after the freeze.
  steps+=("$(jq -r --arg mib "$mib" --argjson steps "$STEPS" '
    def ts: capture("(?<s>[^.Z]+)(\\.(?<f>[0-9]+))?Z") | ((.s + "Z") | fromdateiso8601) + ("0." + (.f // "0") | tonumber);
    .status.timeline as $t | ([$t[] | select(.step == "frozen") | .at | ts] | first) as $f
    | [$mib] + ([$steps[] as $s | [$t[] | select(.step == $s) | .at | ts - $f | . * 100 | round / 100] | first // "-"])
    | @tsv' <<< "$s")")
  frozen=$(jq -r '.status.timeline[] | select(.step == "frozen") | .at' <<< "$s" |
    python3 -c 'import sys, datetime; t = sys.stdin.read().strip().rstrip("Z"); w, _, f = t.partition(".")
print(datetime.datetime.fromisoformat(w + "+00:00").timestamp() + float("0." + (f or "0")))')
  runtime+=("$mib"$'\t'"$(runtime_steps "$frozen" memhog)")
  kubectl uncordon km-node-1 > /dev/null
done
kubectl delete pod memhog --ignore-not-found --wait=false > /dev/null

printf '\nkube-migrate on real nodes (kubelet + CRI-O + crun + CRIU), %s, %s cores\n' "$(date -u +%F)" "$(nproc)"
{
  printf 'MiB\tarchive_MiB\tPending_s\tCheckpointing_s\tTransferring_s\tBuildingImage_s\tRestoring_s\tfreeze_s\twindow_s\tdrain_s\tsource\tpaused_s\tbare_crun_criu_s\tratio\tpaused_ratio\n'
  printf '%s\n' "${rows[@]}"
} | column -t
printf '\nthe timeline (status.timeline), seconds after the freeze\n'
{
  printf 'MiB\t%s\n' "$(jq -r 'join("\t")' <<< "$STEPS")"
  printf '%s\n' "${steps[@]}"
} | column -t
printf '\nthe target runtime (CRI-O log of km-node-2), seconds after the freeze\n'
{
  printf 'MiB\t%s\n' "${RUNTIME_STEPS// /$'\t'}"
  printf '%s\n' "${runtime[@]}"
} | column -t
echo "freeze_s: source frozen -> replacement Ready (status.downtimeSeconds); paused_s: the longest gap in the program's own 100 ms ticks, less a tick (last tick before the freeze -> first after the restore); bare: crun checkpoint + restore of the same program and size (criu/demo.sh); ratio = freeze / bare, paused_ratio = paused / bare"
