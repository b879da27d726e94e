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
#   nodes/product.sh drain-test        a counter pod annotated migrate.io/stateful=true on km-node-1,
#                                      `kubectl drain km-node-1`, then: PodMigration Succeeded, the
#                                      pod Running on another node, its count continuous; uncordons
# Env: KUBE_MIGRATE_NODES_DIR [/tmp/kube-migrate-nodes]; KM_MANIFESTS [the repository's manifests/]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case "${1:-}" in install|drain-test) ;; *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 2 ;; esac
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

drain_test() {
  kubectl uncordon km-node-1 > /dev/null
  kubectl delete pod stateful-counter --ignore-not-found --wait=true > /dev/null
  cat << 'EOF2' | kubectl apply -f - > /dev/null
apiVersion: v1
kind: Pod
metadata:
  name: stateful-counter
  namespace: default
  annotations: {migrate.io/stateful: "true"}
spec:
  nodeName: km-node-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: counter
    image: localhost/kube-migrate/busybox:latest
    imagePullPolicy: IfNotPresent
    command: ["/bin/sh", "-c", "i=0; while true; do echo $i; i=$((i+1)); sleep 1; done"]
EOF2
  # shellcheck disable=SC2016 # for the inner bash
  wait_until 60 "stateful-counter Running" bash -c '[[ $(kubectl get pod stateful-counter -o jsonpath={.status.phase}) == Running ]]'
  sleep 5
  local t0; t0=$(ms)
  # --force: a bare pod (no controller); kube-migrate answers its eviction with 429 until the
  # state is safe on the target, and kubectl drain retries.
  kubectl drain km-node-1 --ignore-daemonsets --delete-emptydir-data --force --timeout=180s >&2
  echo "kubectl drain km-node-1: $(($(ms) - t0)) ms"
  local pm
  pm=$(kubectl get podmigrations --sort-by=.metadata.creationTimestamp \
    -o jsonpath='{range .items[?(@.spec.podName=="stateful-counter")]}{.metadata.name}{"\n"}{end}' | tail -n 1)
  [[ -n $pm ]] || km_die "no PodMigration for stateful-counter"
  wait_until 120 "PodMigration $pm Succeeded" \
    bash -c "[[ \$(kubectl get podmigration $pm -o jsonpath={.status.phase}) == Succeeded ]]" ||
    km_die "PodMigration $pm: $(kubectl get podmigration "$pm" -o jsonpath='{.status.phase}: {.status.message}')"
  kubectl get podmigrations -o wide
  kubectl get pod stateful-counter -o wide
  sleep 2
  local logs gaps
  logs=$(kubectl logs stateful-counter)
  gaps=$(awk 'NR > 1 && $1 != prev + 1 { print prev " -> " $1 } { prev = $1 }' <<< "$logs")
  kubectl uncordon km-node-1 > /dev/null
  [[ $(kubectl get pod stateful-counter -o jsonpath='{.spec.nodeName}') != km-node-1 ]] || km_die "the pod is still on km-node-1"
  [[ -z $gaps ]] || km_die "count not continuous after the migration: $gaps"
  echo "PASS: stateful-counter migrated off km-node-1 by kubectl drain, count continuous ($(head -n 1 <<< "$logs")..$(tail -n 1 <<< "$logs"))"
}

case $1 in
  install) install "${2:-}" ;;
  drain-test) drain_test ;;
esac
