#!/usr/bin/env bash
# A pod serving clients over TCP, drained with a client connected through its Service (issue #12).
#
# The server (nodes/images/tcp-counter.c, `serve`) is a bare pod opted in with
# migrate.io/stateful=true (and on-failure: block, so a failed checkpoint fails the drain instead
# of evicting it) on km-node-1, behind the ClusterIP Service tcp-counter. Its state is in memory: a
# counter that every line sent to any client increments, and a token drawn at start. The client
# (`client`, an unannotated pod on km-node-2) reads through the Service's ClusterIP and
# reconnects on EOF, error or 3 s of silence. Then `kubectl drain km-node-1`, and:
#   * the PodMigration Succeeded, the source held frozen through its checkpoint (no freezeNote);
#   * the server pod is a new pod (new UID) Running on km-node-2, never restarted;
#   * the client saw its connection end and reconnected through the Service;
#   * the first number it got after reconnecting is the last number it got before + 1, and that
#     last number is the last one the source sent (its `kubectl logs -f`): nothing lost, nothing
#     twice; the token is the one it had before the drain (the restored process, not a new one);
#   * the checkpoint was made with tcp-close: CRIU's dump.log (in the checkpoint image on
#     km-node-2) read /etc/kube-migrate/criu.conf and says "Will drop all TCP connections on
#     restore". Without deploy/node/criu.conf on the nodes the checkpoint fails
#     with CRIU's "Connected TCP socket, consider using --tcp-established option." (measured, see
#     docs/design-notes.md).
# Prints how long the client was without service (last line before, first line after).
#
# Usage: nodes/tcp-test.sh           (after nodes/up.sh 2 and nodes/product.sh install-release;
#                                     TCP_KEEP=1 leaves the pods and the Service)
#        nodes/tcp-test.sh setup     only the image, server, Service and client (to try things)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case "${1:-}" in "" | setup) ;; *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 2 ;; esac
# shellcheck source=nodes/product.sh
source "$here/product.sh"
IMAGE=localhost/kube-migrate/tcp-counter:latest
PORT=7000

# The image: the static server/client alone (built each run: gcc takes a second).
tcp_image() {
  local root; root=$(mktemp -d "$P/tcp-counter.XXXXXX")
  gcc -static -Os -s -o "$root/tcp-counter" "$here/images/tcp-counter.c"
  "$here/images/oci-archive.py" --out "$P/tcp-counter.oci.tar" --ref "$IMAGE" --dir "$root" \
    --entrypoint /tcp-counter > /dev/null
  rm -rf "$root"
  "$here/load-image.sh" "$P/tcp-counter.oci.tar" "$IMAGE" 2> /dev/null
}

tcp_setup() {
  tcp_image
  kubectl uncordon km-node-1 km-node-2 > /dev/null
  kubectl delete pod tcp-server tcp-client --ignore-not-found --wait=true > /dev/null
  kubectl delete service tcp-counter --ignore-not-found > /dev/null
  cat << EOF2 | kubectl apply -f - > /dev/null
apiVersion: v1
kind: Service
metadata: {name: tcp-counter, namespace: default}
spec:
  selector: {app: tcp-counter}
  ports: [{port: $PORT, targetPort: $PORT}]
---
apiVersion: v1
kind: Pod
metadata:
  name: tcp-server
  namespace: default
  labels: {app: tcp-counter}
  annotations: {migrate.io/stateful: "true", migrate.io/on-failure: block}
spec:
  nodeName: km-node-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: server
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    args: [serve, "$PORT"]
    ports: [{containerPort: $PORT}]
EOF2
  # shellcheck disable=SC2016 # for the inner bash
  wait_until 60 "tcp-server Running" bash -c '[[ $(kubectl get pod tcp-server -o jsonpath={.status.phase}) == Running ]]' ||
    km_die "tcp-server: $(kubectl get pod tcp-server -o wide)"
  local ip; ip=$(kubectl get service tcp-counter -o jsonpath='{.spec.clusterIP}')
  cat << EOF2 | kubectl apply -f - > /dev/null
apiVersion: v1
kind: Pod
metadata: {name: tcp-client, namespace: default}
spec:
  nodeName: km-node-2
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    args: [client, "$ip", "$PORT"]
EOF2
  wait_until 60 "tcp-client getting numbers through $ip:$PORT" bash -c \
    "[[ \$(kubectl logs tcp-client 2> /dev/null | grep -c ' got ') -ge 20 ]]" ||
    km_die "tcp-client: $(kubectl logs tcp-client 2>&1 | tail -n 5)"
  echo "tcp-server $(kubectl get pod tcp-server -o jsonpath='{.metadata.uid} on {.spec.nodeName} ({.status.podIP})'), Service tcp-counter $ip:$PORT; tcp-client on km-node-2: $(kubectl logs tcp-client | grep ' got ' | tail -n 1)"
}

# client_gap FROM_MS: "<ms> <n> <token> <ms> <n> <token>" of the two lines tcp-client got around
# the longest pause between two lines after FROM_MS (the migration's), and how many times it
# connected after FROM_MS.
client_gap() {
  kubectl logs tcp-client | awk -v from="$1" '
    $1 >= from && $2 == "connected" { conns++ }
    $2 == "got" { if (p && $1 >= from && $1 - p > gap) { gap = $1 - p; b = pl; a = $0 } p = $1; pl = $0 }
    END { split(b, x, " "); split(a, y, " "); print x[1], x[3], x[4], y[1], y[3], y[4], conns + 0 }'
}

tcp_test() {
  tcp_setup
  local uid token0 n0
  uid=$(kubectl get pod tcp-server -o jsonpath='{.metadata.uid}')
  read -r n0 token0 < <(kubectl logs tcp-client | awk '$2 == "got" { n = $3; t = $4 } END { print n, t }')
  kubectl logs -f tcp-server > "$P/tcp-source.log" 2> "$P/tcp-source.err" &
  local follow=$! t0; t0=$(ms)
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=180s >&2 ||
    km_die "kubectl drain failed: $(kubectl get podmigration "$(latest_migration tcp-server)" -o jsonpath='{.status.phase}: {.status.message}' 2>&1)"
  echo "kubectl drain km-node-1: $(($(ms) - t0)) ms"
  local pm; pm=$(migration_ends Succeeded 120 tcp-server)
  kubectl get podmigration "$pm" -o wide
  kubectl get pod tcp-server tcp-client -o wide
  wait_until 30 "the source's log stream to end" bash -c "! kill -0 $follow 2> /dev/null" || kill "$follow" 2> /dev/null || true
  wait "$follow" 2> /dev/null || true
  # The client back in service for a while.
  wait_until 60 "tcp-client getting numbers again" bash -c \
    "kubectl logs tcp-client | awk -v from=$t0 '\$1 >= from && \$2 == \"connected\" { c = 1 } c && \$2 == \"got\" { n++ } END { exit n < 10 }'" ||
    km_die "tcp-client: $(kubectl logs tcp-client | tail -n 5)"
  kubectl uncordon km-node-1 > /dev/null
  kubectl logs tcp-client > "$P/tcp-client.log"
  kubectl logs tcp-server > "$P/tcp-server.log"

  local now restarts frozen_at note last_sent before n_before tok_before after n_after tok_after conns ends
  now=$(kubectl get pod tcp-server -o jsonpath='{.metadata.uid} {.spec.nodeName} {.status.phase}')
  restarts=$(kubectl get pod tcp-server -o jsonpath='{.status.containerStatuses[0].restartCount}')
  frozen_at=$(kubectl get podmigration "$pm" -o jsonpath='{.status.sourceFrozenAt}')
  note=$(kubectl get podmigration "$pm" -o jsonpath='{.status.freezeNote}')
  last_sent=$(awk '$1 == "sent" { n = $2 } END { print n }' "$P/tcp-source.log")
  read -r before n_before tok_before after n_after tok_after conns < <(client_gap "$t0")
  # What the client printed about its connection between the two lines.
  ends=$(kubectl logs tcp-client | awk -v b="$before" -v a="$after" '$1 > b && $1 <= a && $2 != "got"' | sed 's/^[0-9]* //' | sort | uniq -c | sed 's/^ *//' | paste -sd ';' -)
  echo "before the drain: tcp-server $uid, the client at $n0 (token $token0)"
  echo "the source sent up to ${last_sent:-nothing}; the client got $n_before, then $n_after after $((after - before)) ms without service ($conns connections made after the drain began: ${ends:-none})"
  echo "after: tcp-server $now, restarts $restarts, token $tok_after; frozen at ${frozen_at:-never}${note:+; freezeNote: $note}"
  # (The restored process finds the connection it had closed: its first send fails.)
  echo "the replacement's log: $(kubectl logs tcp-server | grep -v '^sent ' | tail -n 2 | paste -sd ';' -)"
  [[ ${now%% *} != "$uid" ]] || km_die "tcp-server is still the same pod ($uid)"
  [[ $now == *" km-node-2 Running" ]] || km_die "tcp-server is not Running on km-node-2: $now"
  [[ $restarts == 0 ]] || km_die "tcp-server restarted $restarts times"
  [[ -n $frozen_at && -z $note ]] || km_die "the source was not held frozen through its checkpoint (${note:-no sourceFrozenAt})"
  ((conns >= 1)) || km_die "the client never reconnected after the drain began"
  [[ -n $last_sent ]] || km_die "no output of the source recorded ($(head -c 300 "$P/tcp-source.err"))"
  ((n_before >= n0)) || km_die "the client's numbers went back: $n0 before the drain, $n_before at the cut"
  [[ $tok_before == "$token0" && $tok_after == "$token0" ]] ||
    km_die "the server's token changed ($token0 -> $tok_before -> $tok_after): a new process, its memory lost"
  ((n_before == last_sent)) || km_die "the source sent up to $last_sent but the client got only up to $n_before before the cut"
  ((n_after == n_before + 1)) || km_die "the client got $n_before, then $n_after after reconnecting: $(
    ((n_after <= n_before)) && echo "$((n_before - n_after + 1)) numbers twice" || echo "$((n_after - n_before - 1)) numbers lost")"

  # CRIU's own account of the checkpoint: its dump.log, which the checkpoint image on km-node-2
  # carries (CRI-O deletes the restore's log and images after a successful restore). The newest
  # one of tcp-counter must show kube-migrate's config file read and tcp-close in force.
  local log
  log=$(grep -l 'comm: tcp-counter' "$(node_dir 2)"/containers/storage/overlay/*/diff/dump.log 2> /dev/null |
    xargs -r ls -t | head -n 1)
  [[ -n $log ]] || km_die "no dump.log of tcp-counter in km-node-2's checkpoint images"
  if ! grep -q 'Parsing config file /etc/kube-migrate/criu.conf' "$log" ||
    ! grep -q 'Will drop all TCP connections on restore' "$log"; then
    km_die "the checkpoint was not made with /etc/kube-migrate/criu.conf's tcp-close ($log)"
  fi
  echo "CRIU's dump.log (checkpoint image on km-node-2): $(grep -c 'Dumping: .* state TCP_ESTABLISHED' "$log") established TCP socket(s) dumped; $(
    grep -o 'Parsing config file /etc/kube-migrate/criu.conf' "$log"); $(grep -o 'Will drop all TCP connections on restore' "$log")"
  [[ -n ${TCP_KEEP:-} ]] || kubectl delete pod tcp-server tcp-client --wait=false > /dev/null
  [[ -n ${TCP_KEEP:-} ]] || kubectl delete service tcp-counter > /dev/null
  echo "PASS: tcp-server moved to km-node-2 (new UID) with a client connected through its Service: the connection ended, the client reconnected and got $n_after after $n_before (the source's last), token unchanged, $((after - before)) ms without service"
}

case ${1:-} in
  setup) tcp_setup ;;
  *) tcp_test ;;
esac
