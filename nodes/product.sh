#!/usr/bin/env bash
# kube-migrate itself on the real nodes (nodes/up.sh): install it, and drain a node with a stateful
# pod on it.
#
# Usage:
#   nodes/product.sh install BIN_DIR   images from BIN_DIR/kube-migrate-{agent,webhook} (+ the shared
#                                      libraries ldd names, so a debug build works too), loaded into
#                                      every node; manifests/ applied with those images; certificates
#                                      by BIN_DIR/kube-migrate-certs (with IP SAN 127.0.0.1: CRI-O
#                                      dials the agent's registry there), Secrets, caBundles, and the
#                                      CA trusted by every node's CRI-O for 127.0.0.1:5443
#                                      (docs/install-cri-o.md, section 2)
#   nodes/product.sh drain-test        a counter pod (20 numbers a second) annotated
#                                      migrate.io/stateful=true on km-node-1, `kubectl drain
#                                      km-node-1`, then: PodMigration Succeeded with the source held
#                                      frozen through its checkpoint (sourceFrozenAt, no freezeNote,
#                                      window 0), the pod Running on another node, and the source's
#                                      last number + 1 = the replacement's first, its count
#                                      continuous (no number twice, none skipped); uncordons
#   nodes/product.sh rollback-test     the same pod with on-failure: block, and km-node-2 rejecting
#                                      km-node-1's agent: the drain must fail, the migration end
#                                      Failed, the same pod (UID, no restart) count on after its
#                                      freeze; then, fault removed, a second drain must move it
# Env: KUBE_MIGRATE_NODES_DIR [/tmp/kube-migrate-nodes]; KM_MANIFESTS [the repository's manifests/]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case "${1:-}" in install|drain-test|rollback-test) ;; *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 2 ;; esac
# shellcheck source=nodes/lib.sh
source "$here/lib.sh"
[[ $(id -u) == 0 ]] || { echo "SKIPPED: needs root"; exit 77; }
helper_pid 1 > /dev/null || { echo "SKIPPED: no real nodes running (nodes/up.sh)"; exit 77; }
P=$KM_NODES_DIR/product
mkdir -p "$P"
ms() { echo $(($(date +%s%N) / 1000000)); }

install() {
  local bin=${1:?usage: product.sh install BIN_DIR} n lib root
  for n in agent webhook certs; do [[ -x $bin/kube-migrate-$n ]] || km_die "no $bin/kube-migrate-$n"; done
  for n in agent webhook; do
    root=$(mktemp -d "$P/rootfs-$n.XXXXXX")
    mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
    cp "$bin/kube-migrate-$n" "$root/usr/local/bin/"
    # A dynamically linked build (cargo's default) gets its libraries at their usual paths.
    for lib in $(ldd "$bin/kube-migrate-$n" 2> /dev/null | grep -o '/[^ ]*' || true); do
      mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
    done
    echo 'root:x:0:0:root:/:/bin/false' > "$root/etc/passwd"
    "$here/images/oci-archive.py" --out "$P/$n.oci.tar" --ref "localhost/kube-migrate/$n:dev" \
      --dir "$root" --entrypoint "/usr/local/bin/kube-migrate-$n" > /dev/null
    rm -rf "$root"
    "$here/load-image.sh" "$P/$n.oci.tar" "localhost/kube-migrate/$n:dev"
  done
  # The repository's manifests with the images just loaded.
  rm -rf "$P/manifests"; cp -r "${KM_MANIFESTS:-$here/../manifests}" "$P/manifests"
  cat >> "$P/manifests/kustomization.yaml" << EOF2
images:
  - {name: kube-migrate-webhook, newName: localhost/kube-migrate/webhook, newTag: dev}
  - {name: kube-migrate-agent, newName: localhost/kube-migrate/agent, newTag: dev}
EOF2
  kubectl apply -k "$P/manifests" > /dev/null
  # As certs/install.sh, plus the IP SAN the node's runtime needs to trust the agent's registry.
  "$bin/kube-migrate-certs" --out "$P/certs" --namespace kube-migrate --san 127.0.0.1 > /dev/null
  for n in webhook agent; do
    kubectl -n kube-migrate create secret generic "kube-migrate-$n-tls" --from-file=tls.crt="$P/certs/$n.crt" \
      --from-file=tls.key="$P/certs/$n.key" --from-file=ca.crt="$P/certs/ca.crt" --dry-run=client -o yaml |
      kubectl apply -f - > /dev/null
  done
  local bundle; bundle=$(base64 -w0 < "$P/certs/ca.crt")
  kubectl patch validatingwebhookconfiguration kube-migrate-eviction --type=json \
    -p "[{\"op\":\"replace\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"}]" > /dev/null
  kubectl patch mutatingwebhookconfiguration kube-migrate-restore --type=json \
    -p "[{\"op\":\"replace\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"}]" > /dev/null
  # The node setup of docs/install-cri-o.md, section 2 (read by containers/image at every pull).
  for i in $(existing_nodes); do
    mkdir -p "$(node_dir "$i")/etc/containers/certs.d/127.0.0.1:5443"
    cp "$P/certs/ca.crt" "$(node_dir "$i")/etc/containers/certs.d/127.0.0.1:5443/ca.crt"
  done
  kubectl -n kube-migrate rollout status daemonset/kube-migrate-agent --timeout=120s > /dev/null
  kubectl -n kube-migrate rollout status deployment/kube-migrate-webhook --timeout=120s > /dev/null
  kubectl -n kube-migrate get pods -o wide
}

# counter_pod [ANNOTATION...]: a bare pod on km-node-1 printing 20 numbers a second, opted in.
counter_pod() {
  kubectl uncordon km-node-1 > /dev/null
  kubectl delete pod stateful-counter --ignore-not-found --wait=true > /dev/null
  local extra=""
  for a in "$@"; do extra+=", $a"; done
  cat << EOF2 | kubectl apply -f - > /dev/null
apiVersion: v1
kind: Pod
metadata:
  name: stateful-counter
  namespace: default
  annotations: {migrate.io/stateful: "true"$extra}
spec:
  nodeName: km-node-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: counter
    image: localhost/kube-migrate/busybox:latest
    imagePullPolicy: IfNotPresent
    command: ["/bin/sh", "-c", "i=0; while true; do echo \$i; i=\$((i+1)); sleep 0.05; done"]
EOF2
  # shellcheck disable=SC2016 # for the inner bash
  wait_until 60 "stateful-counter Running" bash -c '[[ $(kubectl get pod stateful-counter -o jsonpath={.status.phase}) == Running ]]'
  sleep 3
}

# migration_ends PHASE SECONDS: the name of stateful-counter's latest PodMigration, once it is
# in PHASE (waited for; dies with its message otherwise).
migration_ends() {
  local pm; pm=$(latest_migration)
  [[ -n $pm ]] || km_die "no PodMigration for stateful-counter"
  wait_until "$2" "PodMigration $pm $1" \
    bash -c "[[ \$(kubectl get podmigration $pm -o jsonpath={.status.phase}) == $1 ]]" ||
    km_die "PodMigration $pm: $(kubectl get podmigration "$pm" -o jsonpath='{.status.phase}: {.status.message}')"
  echo "$pm"
}

latest_migration() {
  kubectl get podmigrations --sort-by=.metadata.creationTimestamp \
    -o jsonpath='{range .items[?(@.spec.podName=="stateful-counter")]}{.metadata.name}{"\n"}{end}' | tail -n 1
}

# pause_in_log [FROM]: "<number before> <number after> <seconds>" of the longest pause between two
# lines of stateful-counter's log (they come every 50 ms otherwise), after number FROM.
pause_in_log() {
  kubectl logs --timestamps stateful-counter | awk -v from="${1:-0}" '
    { split(substr($1, 12), t, ":"); s = t[1] * 3600 + t[2] * 60 + t[3] }
    NR > 1 && prev >= from && s - prev_s > pause { pause = s - prev_s; b = prev; f = $2 }
    { prev_s = s; prev = $2 }
    END { printf "%s %s %.2f\n", b, f, pause }'
}

# gaps_in_log: every place where stateful-counter's log does not go on by one.
gaps_in_log() {
  kubectl logs stateful-counter | awk 'NR > 1 && $1 != prev + 1 { print prev " -> " $1 } { prev = $1 }'
}

# migrate_by_drain FROM: `kubectl drain km-node-1` with stateful-counter on it, counting from at
# least FROM; then the checks of drain-test.
migrate_by_drain() {
  local from=$1
  # Everything the source prints, until its container ends (the stream closes then).
  kubectl logs -f stateful-counter > "$P/source.log" 2> "$P/source.err" &
  local follow=$!
  local t0; t0=$(ms)
  # --force: a bare pod (no controller); kube-migrate answers its eviction with 429 until the
  # state is safe on the target, and kubectl drain retries.
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=180s >&2
  echo "kubectl drain km-node-1: $(($(ms) - t0)) ms"
  local pm; pm=$(migration_ends Succeeded 120)
  kubectl get podmigration "$pm" -o wide
  kubectl get pod stateful-counter -o wide
  wait_until 30 "the source's log stream to end" bash -c "! kill -0 $follow 2> /dev/null" ||
    { kill "$follow" 2> /dev/null || true; }
  wait "$follow" 2> /dev/null || true
  sleep 2
  local gaps last first before pause frozen_at note window
  # The replacement's log begins with the source's log as it was at the checkpoint (CRI-O keeps
  # the container log in the archive), then the restored process's lines: the longest pause
  # between two lines (the downtime) is where the restored process began.
  gaps=$(gaps_in_log)
  read -r before first pause < <(pause_in_log "$from")
  last=$(grep -E '^[0-9]+$' "$P/source.log" | tail -n 1)
  frozen_at=$(kubectl get podmigration "$pm" -o jsonpath='{.status.sourceFrozenAt}')
  note=$(kubectl get podmigration "$pm" -o jsonpath='{.status.freezeNote}')
  window=$(kubectl get podmigration "$pm" -o jsonpath='{.status.sourceWindowSeconds}')
  kubectl uncordon km-node-1 > /dev/null
  echo "source: frozen at ${frozen_at:-never}, last number ${last:-none}; replacement: log copied up to $before, restored process began at $first ($pause s later); window ${window:-?} s${note:+; freezeNote: $note}"
  [[ $(kubectl get pod stateful-counter -o jsonpath='{.spec.nodeName}') != km-node-1 ]] || km_die "the pod is still on km-node-1"
  [[ -z $gaps ]] || km_die "count not continuous after the migration: $gaps"
  [[ -n $frozen_at && -z $note ]] || km_die "the source was not held frozen through its checkpoint (${note:-no sourceFrozenAt})"
  [[ -n $last ]] || km_die "no output of the source recorded ($(head -c 300 "$P/source.err"))"
  ((before == last)) || km_die "the checkpoint's copy of the log ends at $before, the source printed up to $last"
  ((first == last + 1)) || km_die "the source's last number was $last but the replacement began at $first: $(
    ((first <= last)) && echo "the source ran on after its checkpoint ($((last - first + 1)) numbers twice)" ||
      echo "$((first - last - 1)) numbers skipped")"
  echo "PASS: stateful-counter migrated off km-node-1 by kubectl drain; the source ended at $last, the replacement went on from $first, no number twice or skipped"
}

drain_test() {
  counter_pod
  migrate_by_drain 0
}

# The transfer fails after the source was frozen and checkpointed (km-node-2 rejects km-node-1's
# agent, the controller's transfer deadline is 20 s): the same pod must carry on from where it
# was, never restarted, the drain held by on-failure: block; then, the fault removed and the
# failed PodMigration deleted, a second drain must move it (CRI-O still sees it running: a stale
# "paused" would fail that checkpoint with "container ... is not running").
rollback_test() {
  local webhook=deployment/kube-migrate-webhook
  local rule=(INPUT -s "$(node_ip 1)" -p tcp --dport 9443 -j REJECT --reject-with tcp-reset)
  # Whatever happens, the cluster is left as it was found.
  # shellcheck disable=SC2064 # the rule is expanded now, while it is in scope
  trap "node_exec 2 iptables -D ${rule[*]} 2> /dev/null || true; kubectl uncordon km-node-1 > /dev/null || true
    kubectl -n kube-migrate set env $webhook KM_TRANSFER_DEADLINE_SECONDS- > /dev/null || true" EXIT
  kubectl -n kube-migrate set env "$webhook" KM_TRANSFER_DEADLINE_SECONDS=20 > /dev/null
  kubectl -n kube-migrate rollout status "$webhook" --timeout=120s > /dev/null
  counter_pod "migrate.io/on-failure: block"
  local uid; uid=$(kubectl get pod stateful-counter -o jsonpath='{.metadata.uid}')
  node_exec 2 iptables -I "${rule[@]}"
  local drained=0
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=45s >&2 || drained=$?
  node_exec 2 iptables -D "${rule[@]}"
  ((drained != 0)) || km_die "kubectl drain completed although the state could not leave km-node-1"
  local pm; pm=$(migration_ends Failed 60)
  kubectl get podmigration "$pm" -o wide
  local spent
  spent=$(kubectl get podmigration "$pm" -o jsonpath='{.status.phases[?(@.phase=="Transferring")].seconds}')
  awk -v s="$spent" 'BEGIN { exit !(s <= 25) }' || km_die "Transferring lasted $spent s, past its deadline of 20 s"
  sleep 2
  local now restarts frozen_at thawed_at gaps before after pause
  now=$(kubectl get pod stateful-counter -o jsonpath='{.metadata.uid} {.spec.nodeName} {.status.phase}')
  restarts=$(kubectl get pod stateful-counter -o jsonpath='{.status.containerStatuses[0].restartCount}')
  frozen_at=$(kubectl get podmigration "$pm" -o jsonpath='{.status.sourceFrozenAt}')
  thawed_at=$(kubectl get podmigration "$pm" -o jsonpath='{.status.sourceThawedAt}')
  gaps=$(gaps_in_log)
  read -r before after pause < <(pause_in_log)
  echo "after the failed transfer ($spent s in Transferring): pod $now, restarts $restarts; frozen at ${frozen_at:-never}, thawed at ${thawed_at:-never}; its log: $before -> $after after $pause s"
  [[ $now == "$uid km-node-1 Running" ]] || km_die "the source pod is not the same pod running on km-node-1: $now (was $uid)"
  [[ $restarts == 0 ]] || km_die "the source container restarted ($restarts): its state is lost"
  [[ -n $frozen_at && -n $thawed_at ]] || km_die "the source was not frozen and thawed: $(kubectl get podmigration "$pm" -o jsonpath='{.status.freezeNote}')"
  [[ -z $gaps ]] || km_die "the source's count jumped: $gaps"
  awk -v p="$pause" 'BEGIN { exit !(p >= 1) }' || km_die "no freeze in the source's log (longest pause $pause s)"
  local counted; counted=$(kubectl logs stateful-counter | tail -n 1)
  ((counted > after + 20)) || km_die "the source did not carry on after its thaw ($after -> $counted)"
  echo "PASS: the transfer failed after the checkpoint; the frozen source was thawed and carried on ($after -> $counted), the drain was held"

  # (The 20 s deadline stays: plenty for this pod once the target is reachable.)
  kubectl delete podmigration "$pm" --wait=true > /dev/null
  migrate_by_drain "$counted"
}

case $1 in
  install) install "${2:-}" ;;
  drain-test) drain_test ;;
  rollback-test) rollback_test ;;
esac
