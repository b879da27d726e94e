#!/usr/bin/env bash
# kube-migrate itself on the real nodes (nodes/up.sh): install it, and drain a node with a stateful
# pod on it.
#
# Usage:
#   nodes/product.sh install BIN_DIR   for quick iterations: images from BIN_DIR/kube-migrate-{agent,
#                                      webhook} (+ the shared libraries ldd names, so a debug build
#                                      works too) loaded into every node, manifests/ applied with
#                                      those images, then as install-release: certs/install.sh with
#                                      the 127.0.0.1 SAN, the nodes' trust for the agent's registry
#   nodes/product.sh install-release   exactly as the README's "Install on a real cluster" says, with
#                                      the images of scripts/images.sh (out/images/*.oci.tar, run it
#                                      first) loaded into every node under the names the overlay
#                                      pins (README "Images"), `kubectl apply -k overlays/images`,
#                                      `KM_EXTRA_SANS=127.0.0.1 certs/install.sh`, and the node
#                                      setup of docs/install-cri-o.md (CA trust for 127.0.0.1:5443;
#                                      the CRI-O drop-in and runtime hold are nodes/up.sh's)
#   nodes/product.sh drain-test        a counter pod (20 numbers a second) annotated
#                                      migrate.io/stateful=true on km-node-1, `kubectl drain
#                                      km-node-1`, then: PodMigration Succeeded with the source held
#                                      frozen through its checkpoint (sourceFrozenAt, no freezeNote,
#                                      window 0), the pod Running on another node, and the source's
#                                      last number + 1 = the replacement's first, its count
#                                      continuous (no number twice, none skipped); uncordons
#   nodes/product.sh workloads-test    an opted-in Deployment, StatefulSet and two-container pod and
#                                      an unannotated Deployment on km-node-1, drained together: the
#                                      opted-in ones restored on km-node-2 (new pods, every
#                                      container's count going on), the plain one evicted as usual
#   nodes/product.sh plugin-test       `kubectl migrate pod --to` (drain-test's checks), then a
#                                      checkpoint-only backup restored later as a copy on the other
#                                      node (the original keeps running, the copy goes on from the
#                                      checkpoint); KUBECTL_MIGRATE [target/debug/kubectl-migrate]
#   nodes/product.sh leader-test       the controller's leader force-deleted mid-migration: the
#                                      other replica takes the Lease and finishes (drain-test's checks)
#   nodes/product.sh base-image-test   the counter with on-failure: block, from an image only km-node-1
#                                      has (and no registry), then from one with neither Entrypoint
#                                      nor Cmd: each drain must fail before any freeze (PodMigration
#                                      Failed NoTarget with the reason, Event TargetUnfit), the same
#                                      pod (UID, no restart) counting on, never frozen; a backup of
#                                      the first restored onto km-node-2 fails the same way, the
#                                      backup kept; then, the first image loaded on km-node-2, a
#                                      drain moves the pod
#                                      (drain-test's checks)
#   nodes/product.sh rollback-test     the same pod with on-failure: block, and km-node-2 rejecting
#                                      km-node-1's agent: the drain must fail, the migration end
#                                      Failed, the same pod (UID, no restart) count on after its
#                                      freeze; then, fault removed, a second drain must move it
# Env: KUBE_MIGRATE_NODES_DIR [/tmp/kube-migrate-nodes]; KM_MANIFESTS [the repository's manifests/]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Sourced (nodes/tcp-test.sh), it only defines its helpers.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  case "${1:-}" in install|install-release|drain-test|rollback-test|base-image-test|workloads-test|plugin-test|leader-test) ;; *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 2 ;; esac
fi
# shellcheck source=nodes/lib.sh
source "$here/lib.sh"
[[ $(id -u) == 0 ]] || { echo "SKIPPED: needs root"; exit 77; }
helper_pid 1 > /dev/null || { echo "SKIPPED: no real nodes running (nodes/up.sh)"; exit 77; }
P=$KM_NODES_DIR/product
mkdir -p "$P"
ms() { echo $(($(date +%s%N) / 1000000)); }

install() {
  local bin=${1:?usage: product.sh install BIN_DIR} n lib root
  for n in agent webhook; do [[ -x $bin/kube-migrate-$n ]] || km_die "no $bin/kube-migrate-$n"; done
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
  finish_install
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
    image: ${COUNTER_IMAGE:-localhost/kube-migrate/busybox:latest}
    imagePullPolicy: IfNotPresent
    command: ["/bin/sh", "-c", "i=0; while true; do echo \$i; i=\$((i+1)); sleep 0.05; done"]
EOF2
  # shellcheck disable=SC2016 # for the inner bash
  wait_until 60 "stateful-counter Running" bash -c '[[ $(kubectl get pod stateful-counter -o jsonpath={.status.phase}) == Running ]]'
  sleep 3
}

# migration_ends PHASE SECONDS [POD]: the name of POD's (stateful-counter's) latest PodMigration,
# once it is in PHASE (waited for; dies with its message otherwise).
migration_ends() {
  local pm; pm=$(latest_migration "${3:-stateful-counter}")
  [[ -n $pm ]] || km_die "no PodMigration for ${3:-stateful-counter}"
  wait_until "$2" "PodMigration $pm $1" \
    bash -c "[[ \$(kubectl get podmigration $pm -o jsonpath={.status.phase}) == $1 ]]" ||
    km_die "PodMigration $pm: $(kubectl get podmigration "$pm" -o jsonpath='{.status.phase}: {.status.message}')"
  echo "$pm"
}

latest_migration() { # [POD]
  kubectl get podmigrations --sort-by=.metadata.creationTimestamp \
    -o jsonpath="{range .items[?(@.spec.podName==\"${1:-stateful-counter}\")]}{.metadata.name}{\"\\n\"}{end}" | tail -n 1
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
  follow_source
  local t0; t0=$(ms)
  # --force: a bare pod (no controller); kube-migrate answers its eviction with 429 until the
  # state is safe on the target, and kubectl drain retries.
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=180s >&2
  echo "kubectl drain km-node-1: $(($(ms) - t0)) ms"
  check_moved "$(migration_ends Succeeded 120)" "$from"
}

# follow_source: everything stateful-counter prints from now until its container ends (the
# stream closes then), into $P/source.log; its pid in $follow.
follow_source() {
  kubectl logs -f stateful-counter > "$P/source.log" 2> "$P/source.err" &
  follow=$!
}

# check_moved PM FROM: the checks of drain-test on PodMigration PM, counting from at least FROM.
check_moved() {
  local pm=$1 from=$2
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
  echo "PASS: stateful-counter migrated off km-node-1; the source ended at $last, the replacement went on from $first, no number twice or skipped"
}

# README step 3 (certs/install.sh, with the SAN docs/install-cri-o.md section 2 asks for) and the
# node trust of that section, then wait for kube-migrate to be up.
finish_install() {
  local root i; root=$(cd "$here/.." && pwd)
  (cd "$root" && KM_EXTRA_SANS=127.0.0.1 certs/install.sh "$P/certs") > /dev/null
  # docs/install-cri-o.md, section 2: every node's CRI-O trusts the CA for the agent's registry
  # (read by containers/image at every pull).
  for i in $(existing_nodes); do
    mkdir -p "$(node_dir "$i")/etc/containers/certs.d/127.0.0.1:5443"
    cp "$P/certs/ca.crt" "$(node_dir "$i")/etc/containers/certs.d/127.0.0.1:5443/ca.crt"
  done
  # The pods wait for their Secrets (made after the apply, as the README orders it); the
  # kubelet retries the mount with a backoff of up to 2 min.
  kubectl -n kube-migrate rollout status daemonset/kube-migrate-agent --timeout=300s > /dev/null
  kubectl -n kube-migrate rollout status deployment/kube-migrate-webhook --timeout=300s > /dev/null
  kubectl -n kube-migrate get pods -o wide
  kubectl -n kube-migrate get pods -o jsonpath='{range .items[*]}{.metadata.name}: {.spec.containers[0].image} (running {.status.containerStatuses[0].imageID}){"\n"}{end}'
}

install_release() {
  local root; root=$(cd "$here/.." && pwd)
  local repo=${IMAGE_REPO:-ghcr.io/kube-migrate} version n f
  version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["workspace"]["package"]["version"])' "$root/Cargo.toml")
  # Step 1 of the README without a registry: each node's runtime gets the archive under the name
  # the overlay pins (README "Images": load them into each node's runtime).
  for n in webhook agent; do
    f=$root/out/images/kube-migrate-$n.oci.tar
    [[ -s $f ]] || km_die "no $f: run scripts/images.sh first"
    "$here/load-image.sh" "$f" "$repo/kube-migrate-$n:$version"
  done
  # Step 2.
  kubectl apply -k "$root/overlays/images" > /dev/null
  finish_install
}

drain_test() {
  counter_pod
  migrate_by_drain 0
}

# A counter container spec: 20 numbers a second, each also written to its emptyDir at /scratch
# (last-NAME), where it wrote a random token once at its start (born-NAME).
counter_container() { # NAME
  cat << EOF2
      - name: $1
        image: localhost/kube-migrate/busybox:latest
        imagePullPolicy: IfNotPresent
        command: ["/bin/sh", "-c", "[ -e /scratch/born-$1 ] || echo \$RANDOM\$RANDOM > /scratch/born-$1; i=0; while true; do echo \$i; echo \$i > /scratch/last-$1; i=\$((i+1)); sleep 0.05; done"]
        volumeMounts: [{name: scratch, mountPath: /scratch}]
EOF2
}

# restored_log_ok POD CONTAINER: the container's log goes on by one with no jump, and was restored
# from a checkpoint: it begins before the pod existed (CRI-O keeps the log in the archive) and
# has the downtime's pause in it. Prints "first..last (pause s)".
restored_log_ok() {
  local pod=$1 c=$2 logs created first gaps pause
  logs=$(kubectl logs --timestamps "$pod" -c "$c")
  gaps=$(awk 'NR > 1 && $2 != prev + 1 { print prev " -> " $2 } { prev = $2 }' <<< "$logs")
  [[ -z $gaps ]] || km_die "$pod/$c: count jumps: $gaps"
  created=$(date -d "$(kubectl get pod "$pod" -o jsonpath='{.metadata.creationTimestamp}')" +%s)
  first=$(date -d "$(head -n 1 <<< "$logs" | cut -d' ' -f1)" +%s)
  ((first < created)) || km_die "$pod/$c: its log begins after the pod was created: started fresh, not restored"
  pause=$(awk '{ split(substr($1, 12), t, ":"); s = t[1] * 3600 + t[2] * 60 + t[3]
    if (NR > 1 && s - p > m) m = s - p; p = s } END { printf "%.2f", m }' <<< "$logs")
  echo "$(head -n 1 <<< "$logs" | cut -d' ' -f2)..$(tail -n 1 <<< "$logs" | cut -d' ' -f2) (pause $pause s)"
}

# Workloads as users run them, drained together: an opted-in Deployment, StatefulSet and
# two-container bare pod (each with its ServiceAccount token and an emptyDir), and a Deployment
# that did not opt in. Each opted-in pod must come back on km-node-2 as a new pod (new UID) whose
# every container was restored (its log goes on by one from before the pod existed); the plain
# one must be evicted as usual and start from 0 on km-node-2, with no PodMigration.
workloads_test() {
  kubectl delete deployment,statefulset,pod -l km-test=workloads --ignore-not-found --wait=true > /dev/null
  kubectl delete pod stateful-counter --ignore-not-found --wait=false > /dev/null
  # Everything starts on km-node-1.
  kubectl uncordon km-node-1 > /dev/null
  kubectl cordon km-node-2 > /dev/null
  trap 'kubectl uncordon km-node-1 km-node-2 > /dev/null 2>&1 || true' EXIT
  {
    local kind name opt
    for spec in Deployment:km-deploy:true StatefulSet:km-sts:true Deployment:km-plain:false; do
      IFS=: read -r kind name opt <<< "$spec"
      cat << EOF2
apiVersion: apps/v1
kind: $kind
metadata: {name: $name, namespace: default, labels: {km-test: workloads}}
spec:
  replicas: 1
  selector: {matchLabels: {app: $name}}
$([[ $kind == StatefulSet ]] && echo "  serviceName: $name")
  template:
    metadata:
      labels: {app: $name, km-test: workloads}
      $([[ $opt == true ]] && echo 'annotations: {migrate.io/stateful: "true"}')
    spec:
      terminationGracePeriodSeconds: 1
      volumes: [{name: scratch, emptyDir: {}}]
      containers:
$(counter_container counter)
---
EOF2
    done
    cat << EOF2
apiVersion: v1
kind: Pod
metadata:
  name: km-two
  namespace: default
  labels: {app: km-two, km-test: workloads}
  annotations: {migrate.io/stateful: "true"}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: scratch, emptyDir: {medium: Memory}}]
  containers:
$(counter_container first | sed 's/^    //')
$(counter_container second | sed 's/^    //')
EOF2
  } | kubectl apply -f - > /dev/null
  local app
  for app in km-deploy km-sts km-plain km-two; do
    wait_until 90 "$app Running on km-node-1" bash -c \
      "[[ \$(kubectl get pods -l app=$app -o jsonpath='{.items[*].status.phase} {.items[*].spec.nodeName}') == 'Running km-node-1' ]]" ||
      km_die "$app: $(kubectl get pods -l app=$app -o wide)"
  done
  kubectl uncordon km-node-2 > /dev/null
  declare -A uid born
  local p c
  for app in km-deploy km-sts km-plain km-two; do
    uid[$app]=$(kubectl get pods -l "app=$app" -o jsonpath='{.items[0].metadata.uid}')
    p=$(kubectl get pods -l "app=$app" -o jsonpath='{.items[0].metadata.name}')
    for c in $(kubectl get pod "$p" -o jsonpath='{.spec.containers[*].name}'); do
      born[$app/$c]=$(kubectl exec "$p" -c "$c" -- cat "/scratch/born-$c")
      [[ -n ${born[$app/$c]} ]] || km_die "$app/$c wrote no token to its emptyDir"
    done
  done
  sleep 3
  local t0; t0=$(ms)
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=300s >&2
  echo "kubectl drain km-node-1 (4 workloads): $(($(ms) - t0)) ms"
  for app in km-deploy km-sts km-two km-plain; do
    wait_until 120 "$app Running on km-node-2" bash -c \
      "[[ \$(kubectl get pods -l app=$app -o jsonpath='{.items[*].status.phase} {.items[*].spec.nodeName}') == 'Running km-node-2' ]]" ||
      km_die "$app: $(kubectl get pods -l app=$app -o wide)"
  done
  kubectl get podmigrations -o wide
  kubectl get pods -l km-test=workloads -o wide
  sleep 2
  local pod c
  for app in km-deploy km-sts km-two; do
    pod=$(kubectl get pods -l "app=$app" -o jsonpath='{.items[0].metadata.name}')
    [[ $(kubectl get pod "$pod" -o jsonpath='{.metadata.uid}') != "${uid[$app]}" ]] || km_die "$app: still the same pod"
    for c in $(kubectl get pod "$pod" -o jsonpath='{.spec.containers[*].name}'); do
      echo "$app $pod/$c restored: $(restored_log_ok "$pod" "$c")"
      # The emptyDir moved with it (km-two's is medium: Memory), token from before the drain.
      [[ $(kubectl exec "$pod" -c "$c" -- cat "/scratch/born-$c") == "${born[$app/$c]}" ]] ||
        km_die "$app $pod/$c: emptyDir token lost (was ${born[$app/$c]}): $(kubectl exec "$pod" -c "$c" -- ls -la /scratch 2>&1)"
    done
    echo "$app emptyDir moved: $(kubectl get podmigrations -o json | jq -r --arg pod "$pod" \
      '.items[] | select(.status.replacement.name == $pod) | [.status.volumes[]? | "\(.name) \(.sizeBytes) B"] | join(", ")')"
  done
  pod=$(kubectl get pods -l app=km-plain -o jsonpath='{.items[0].metadata.name}')
  [[ $(kubectl get pod "$pod" -o jsonpath='{.metadata.uid}') != "${uid[km-plain]}" ]] || km_die "km-plain: not evicted"
  [[ $(kubectl logs "$pod" | head -n 1) == 0 ]] || km_die "km-plain: its new pod did not start from 0"
  ! kubectl get podmigrations -o jsonpath='{range .items[*]}{.spec.podName}{"\n"}{end}' | grep -q '^km-plain' ||
    km_die "a PodMigration for the unannotated km-plain"
  kubectl delete deployment,statefulset,pod -l km-test=workloads --wait=false > /dev/null
  echo "PASS: Deployment, StatefulSet and two-container pod restored on km-node-2 (new pods, every container's count going on, emptyDir tokens from before the drain read back, disk and Memory); the unannotated Deployment evicted as usual"
}

# The kubectl plugin, on real nodes: `kubectl migrate pod --to` with the checks of drain-test; then
# a checkpoint-only backup of the moved pod (which keeps running, the same pod) restored later as
# a copy on the other node, whose log goes on from the checkpoint.
plugin_test() {
  local plugin=${KUBECTL_MIGRATE:-${CARGO_TARGET_DIR:-$here/../target}/debug/kubectl-migrate}
  [[ -x $plugin ]] || km_die "no kubectl-migrate at $plugin (cargo build -p kube-migrate --bin kubectl-migrate)"
  counter_pod
  follow_source
  "$plugin" pod stateful-counter --to km-node-2 >&2 || km_die "kubectl migrate pod exited $?"
  check_moved "$(migration_ends Succeeded 60)" 0

  kubectl delete pod counter-copy --ignore-not-found --wait=true > /dev/null
  local uid out ck
  uid=$(kubectl get pod stateful-counter -o jsonpath='{.metadata.uid}')
  out=$("$plugin" checkpoint pod stateful-counter) || km_die "kubectl migrate checkpoint exited $?: $out"
  echo "$out" | tail -n 2
  ck=$(sed -n 's/^stored: checkpoint \([^ ]*\) on .*/\1/p' <<< "$out")
  [[ -n $ck ]] || km_die "no checkpoint name in: $out"
  "$plugin" restore "$ck" --name counter-copy --to km-node-1 >&2 || km_die "kubectl migrate restore exited $?"
  wait_until 60 "counter-copy Running on km-node-1" bash -c \
    "[[ \$(kubectl get pod counter-copy -o jsonpath='{.status.phase} {.spec.nodeName}') == 'Running km-node-1' ]]" ||
    km_die "counter-copy: $(kubectl get pod counter-copy -o wide)"
  sleep 2
  echo "counter-copy restored from $ck: $(restored_log_ok counter-copy counter)"
  local now
  now=$(kubectl get pod stateful-counter -o jsonpath='{.metadata.uid} {.status.phase} {.status.containerStatuses[0].restartCount}')
  [[ $now == "$uid Running 0" ]] || km_die "the checkpointed pod is not the same pod running on: $now (was $uid)"
  [[ -z $(gaps_in_log) ]] || km_die "the checkpointed pod's count jumped: $(gaps_in_log)"
  kubectl delete pod counter-copy --wait=false > /dev/null
  echo "PASS: kubectl migrate pod --to moved it (no number twice or skipped); a backup of it, restored later as counter-copy on km-node-1, went on from the checkpoint while the original kept running"
}

# The leader is killed (its pod force-deleted) while it drives a drain's migration: the other
# replica takes the Lease and finishes it, with the checks of drain-test (the source stays
# frozen meanwhile: nothing runs twice).
leader_test() {
  counter_pod
  follow_source
  local holder before
  holder=$(kubectl -n kube-migrate get lease kube-migrate-controller -o jsonpath='{.spec.holderIdentity}')
  before=$(latest_migration)
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=300s >&2 &
  local drain=$!
  # shellcheck disable=SC2317 # called by wait_until
  new_migration() { local m; m=$(latest_migration); [[ -n $m && $m != "$before" ]]; }
  wait_until 30 "a new PodMigration for stateful-counter" new_migration ||
    km_die "no new PodMigration"
  kubectl -n kube-migrate delete pod "$holder" --grace-period=0 --force > /dev/null 2>&1 ||
    km_die "could not delete the leader $holder"
  echo "leader $holder force-deleted during $(kubectl get podmigration "$(latest_migration)" -o jsonpath='{.status.phase}')"
  wait "$drain" || km_die "kubectl drain failed after the leader was killed"
  check_moved "$(migration_ends Succeeded 120)" 0
  local after
  after=$(kubectl -n kube-migrate get lease kube-migrate-controller -o jsonpath='{.spec.holderIdentity}')
  [[ -n $after && $after != "$holder" ]] || km_die "the Lease is still held by $after"
  echo "PASS: the leader $holder was killed mid-migration; $after took over and finished it"
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

# busybox_variant OUT REF [oci-archive.py options]: busybox's layer with a configuration of its own
# (an env only this call has): an image ID no node has yet, under a name no registry serves.
busybox_variant() {
  local out=$1 ref=$2; shift 2
  python3 - "$KM_NODES_DIR/images/busybox.oci.tar" "$out.layer" << 'PY'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
blob = lambda d: t.extractfile("blobs/sha256/" + d.split(":")[1]).read()
index = json.loads(t.extractfile("index.json").read())
manifest = json.loads(blob(index["manifests"][0]["digest"]))
open(sys.argv[2], "wb").write(blob(manifest["layers"][0]["digest"]))
PY
  "$here/images/oci-archive.py" --out "$out" --ref "$ref" --layer-tar "$out.layer" \
    --env "VARIANT=$(date +%s%N)" "$@" > /dev/null
  rm -f "$out.layer"
}

# refused_drain EXPECT: with stateful-counter (on-failure: block) on km-node-1, `kubectl drain`
# must fail before any freeze: PodMigration Failed NoTarget, an Event TargetUnfit containing
# EXPECT, the same pod (UID, no restart) counting on without a jump. Prints the last number.
refused_drain() {
  local expect=$1 uid drained=0 pm reason message frozen event now restarts gaps
  uid=$(kubectl get pod stateful-counter -o jsonpath='{.metadata.uid}')
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=20s > "$P/drain-refused.log" 2>&1 || drained=$?
  ((drained != 0)) || { cat "$P/drain-refused.log" >&2; km_die "kubectl drain completed although no node can restore the pod"; }
  pm=$(migration_ends Failed 30)
  reason=$(kubectl get podmigration "$pm" -o jsonpath='{.status.reason}')
  message=$(kubectl get podmigration "$pm" -o jsonpath='{.status.message}')
  frozen=$(kubectl get podmigration "$pm" -o jsonpath='{.status.sourceFrozenAt}{.status.checkpointedAt}')
  event=$(kubectl get events --field-selector "involvedObject.name=$pm,reason=TargetUnfit" -o jsonpath='{.items[0].message}')
  echo "drain refused; Event TargetUnfit: $event" >&2
  [[ $reason == NoTarget ]] || km_die "PodMigration $pm failed with $reason, expected NoTarget: $message"
  [[ $event == *"km-node-2 cannot restore the pod"*"$expect"* ]] || km_die "no TargetUnfit event naming km-node-2 and '$expect': '$event'"
  [[ $message == *"$expect"* ]] || km_die "the PodMigration's message does not say '$expect': $message"
  [[ -z $frozen ]] || km_die "the source was frozen or checkpointed ($frozen) although no node could restore it"
  sleep 1
  now=$(kubectl get pod stateful-counter -o jsonpath='{.metadata.uid} {.spec.nodeName} {.status.phase}')
  restarts=$(kubectl get pod stateful-counter -o jsonpath='{.status.containerStatuses[0].restartCount}')
  gaps=$(gaps_in_log)
  [[ $now == "$uid km-node-1 Running" && $restarts == 0 ]] || km_die "the pod is not the same one running on km-node-1: $now, restarts $restarts (was $uid)"
  [[ -z $gaps ]] || km_die "the pod's count jumped: $gaps"
  kubectl delete podmigration "$pm" --wait=true > /dev/null
  kubectl logs stateful-counter | tail -n 1
}

base_image_test() {
  trap 'kubectl uncordon km-node-1 > /dev/null || true' EXIT
  local ref=localhost/kube-migrate/only-on-node-1:1 bare=localhost/kube-migrate/no-command:1 image_id counted
  # 1. The image only on km-node-1.
  busybox_variant "$P/only-here.oci.tar" "$ref" --cmd /bin/sh
  "$here/load-image.sh" "$P/only-here.oci.tar" "$ref" 1
  COUNTER_IMAGE=$ref counter_pod "migrate.io/on-failure: block"
  image_id=$(kubectl get pod stateful-counter -o jsonpath='{.status.containerStatuses[0].imageID}')
  echo "stateful-counter on km-node-1 runs $ref (imageID $image_id), which km-node-2 lacks"
  counted=$(refused_drain "$image_id")
  echo "PASS: refused before any freeze, the same pod counts on, on km-node-1 ($counted), no restart, no gap"
  # 1b. A backup of it, restored as a copy on km-node-2: refused by the same check before its
  # archive moves; the backup stays stored, nothing is created.
  local plugin=${KUBECTL_MIGRATE:-${CARGO_TARGET_DIR:-$here/../target}/debug/kubectl-migrate} out ck rpm event
  [[ -x $plugin ]] || km_die "no kubectl-migrate at $plugin (cargo build -p kubectl-migrate)"
  out=$("$plugin" checkpoint pod stateful-counter) || km_die "kubectl migrate checkpoint exited $?: $out"
  ck=$(sed -n 's/^stored: checkpoint \([^ ]*\) on .*/\1/p' <<< "$out")
  [[ -n $ck ]] || km_die "no checkpoint name in: $out"
  if "$plugin" restore "$ck" --name counter-copy --to km-node-2 > "$P/restore-refused.log" 2>&1; then
    cat "$P/restore-refused.log" >&2
    km_die "kubectl migrate restore of $ck onto km-node-2 succeeded although km-node-2 lacks $ref"
  fi
  rpm=$(kubectl get podmigrations -o jsonpath="{range .items[?(@.spec.restoreFrom==\"$ck\")]}{.metadata.name}{end}")
  event=$(kubectl get events --field-selector "involvedObject.name=$rpm,reason=TargetUnfit" -o jsonpath='{.items[0].message}')
  echo "restore refused: $(kubectl get podmigration "$rpm" -o jsonpath='{.status.phase} {.status.reason}: {.status.message}')"
  [[ $(kubectl get podmigration "$rpm" -o jsonpath='{.status.phase} {.status.reason}') == "Failed NoTarget" ]] ||
    km_die "restore $rpm did not fail NoTarget"
  [[ $event == *"km-node-2 cannot restore the pod"*"$ref"* ]] || km_die "no TargetUnfit event naming km-node-2 and $ref: '$event'"
  [[ -z $(kubectl get pod counter-copy --ignore-not-found -o name) ]] || km_die "counter-copy was created"
  [[ $(kubectl get podmigration "$ck" -o jsonpath='{.status.phase}') == Succeeded ]] || km_die "the backup $ck is no longer stored"
  kubectl delete podmigration "$rpm" "$ck" --wait=true > /dev/null
  echo "PASS: the restore of a backup onto a node without its image refused before anything moved; the backup stayed stored"
  # 2. An image on both nodes, with neither Entrypoint nor Cmd (the pod gives the command):
  # CRI-O's restore would start it without one.
  busybox_variant "$P/no-command.oci.tar" "$bare"
  "$here/load-image.sh" "$P/no-command.oci.tar" "$bare"
  COUNTER_IMAGE=$bare counter_pod "migrate.io/on-failure: block"
  counted=$(refused_drain "neither Entrypoint nor Cmd")
  echo "PASS: an image without a command of its own refused before any freeze ($counted)"
  # 3. The first image on km-node-2 too: now the drain moves the pod.
  "$here/load-image.sh" "$P/only-here.oci.tar" "$ref" 2
  COUNTER_IMAGE=$ref counter_pod "migrate.io/on-failure: block"
  migrate_by_drain 0
}

[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0
case $1 in
  install) install "${2:-}" ;;
  install-release) install_release ;;
  drain-test) drain_test ;;
  rollback-test) rollback_test ;;
  base-image-test) base_image_test ;;
  workloads-test) workloads_test ;;
  plugin-test) plugin_test ;;
  leader-test) leader_test ;;
esac
