#!/usr/bin/env bash
# The Helm chart installed for real on a local control plane (cluster/up.sh: etcd,
# kube-apiserver, controller-manager, scheduler; its own state dir and ports, so it runs beside
# scripts/local-cluster.sh and the real-node harness). A step of scripts/test.sh, next to the
# end-to-end scenarios; also `scripts/check-helm.sh --live`.
#
#   scripts/helm-live.sh [HELM]     (HELM: a helm binary; default: scripts/check-helm.sh's)
#
# What it shows: the API server accepts and stores every object of the chart (helm install,
# not a dry run); the pod webhook's failurePolicy Ignore lets pods be created while no replica
# answers and the eviction webhook's Fail refuses evictions in an opted-in namespace;
# certs/install.sh works on a Helm release and `helm upgrade` keeps the caBundle it wrote;
# values reach the Deployment; switching to cert-manager drops the caBundle for the injector's
# annotation; helm uninstall keeps the CRD. What it does not: there are no nodes, so no
# kube-migrate pod runs (they stay Pending; the end-to-end scenarios run the same binaries as
# host processes), and cert-manager and the Prometheus Operator are not installed: their
# kinds are stand-in CRDs that accept any spec (the objects' own fields are not validated).
# Ends with `helm-live: N passed, N failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=${1:-${HELM:-$(scripts/check-helm.sh --print-helm)}}
STATE=${KUBE_MIGRATE_HELM_CLUSTER_DIR:-/tmp/kube-migrate-helm-cluster}
# Ports apart from scripts/local-cluster.sh's (6443, 12379, ...) and nodes/'s (36443, ...).
export KUBE_MIGRATE_APISERVER_PORT=${KUBE_MIGRATE_HELM_APISERVER_PORT:-26443}
export KUBE_MIGRATE_ETCD_PORT=22379 KUBE_MIGRATE_ETCD_PEER_PORT=22380
export KUBE_MIGRATE_CONTROLLER_MANAGER_PORT=20257 KUBE_MIGRATE_SCHEDULER_PORT=20259
export KUBE_MIGRATE_NODES=node-a
ns=kube-migrate
passed=0 failed=0

log() { printf '[helm-live] %s\n' "$*" >&2; }
check() { # description, command...
  local what=$1; shift
  if "$@" > "$STATE.out" 2>&1; then
    echo "ok: $what"; passed=$((passed + 1))
  else
    echo "FAIL: $what"; sed 's/^/    /' "$STATE.out"; failed=$((failed + 1))
  fi
}
equals() { [[ $1 == "$2" ]] || { echo "got '$1', want '$2'"; return 1; }; }

[[ -x $HELM ]] || { log "no helm at $HELM"; exit 1; }
cleanup() { cluster/down.sh --purge "$STATE" >/dev/null 2>&1 || true; rm -rf "$STATE.certs" "$STATE.out"; }
trap cleanup EXIT
cleanup
cluster/build-control-plane.sh >&2
eval "$(cluster/up.sh "$STATE" | tail -n 1)"
export KUBECONFIG
started=$SECONDS

release=(kube-migrate charts/kube-migrate --namespace "$ns")
check "helm install --dry-run=server (rendered with the cluster's lookups, nothing stored)" \
  "$HELM" install "${release[@]}" --create-namespace --dry-run=server
check "helm install (certs-tool mode)" "$HELM" install "${release[@]}" --create-namespace
# Every object of the render is in the cluster.
missing() {
  "$HELM" get manifest kube-migrate -n "$ns" | python3 -c '
import sys, yaml
for d in yaml.safe_load_all(sys.stdin):
    if d:
        print(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", ""))' |
    while read -r kind name namespace; do
      kubectl get "$kind" "$name" ${namespace:+-n "$namespace"} -o name >/dev/null || echo "missing: $kind/$name"
    done | grep . && return 1
  echo "all $("$HELM" get manifest kube-migrate -n "$ns" | grep -c '^kind:') objects stored"
}
check "every object of the release is stored" missing
check "the CRD from crds/ is established" kubectl wait --for condition=Established crd/podmigrations.migrate.io --timeout=60s
# The controller-manager makes the webhook's ReplicaSet and its 2 pods (Pending: no nodes).
two_pods() {
  local deadline=$((SECONDS + 60)) n
  until n=$(kubectl -n "$ns" get pods -l app.kubernetes.io/name=kube-migrate-webhook -o name | grep -c .) && ((n == 2)); do
    ((SECONDS < deadline)) || { echo "$n pods after 60 s"; return 1; }
    sleep 1
  done
  kubectl -n "$ns" get pods -l app.kubernetes.io/name=kube-migrate-webhook --no-headers
}
check "the Deployment's 2 pods are created (Pending: no nodes)" two_pods

# Fail open for pod creation, fail closed for evictions in an opted-in namespace.
kubectl create namespace helm-live >/dev/null
kubectl label namespace helm-live migrate.io/opted-in=true >/dev/null
check "failurePolicy Ignore: a pod is created in an opted-in namespace with no replica answering" \
  kubectl -n helm-live run p --image=registry.invalid/p:1 --restart=Never --annotations=migrate.io/stateful=true
evict() {
  local out
  if out=$(printf '{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"p","namespace":"helm-live"}}' |
    kubectl create --raw /api/v1/namespaces/helm-live/pods/p/eviction -f - 2>&1); then
    echo "the eviction was allowed: $out"; return 1
  fi
  grep -q 'failed calling webhook "eviction.migrate.io"' <<< "$out" || { echo "$out"; return 1; }
  echo "refused: $(grep -o 'failed calling webhook "eviction.migrate.io"' <<< "$out")"
}
check "failurePolicy Fail: evicting it is refused while no replica answers" evict

log "certs/install.sh on the release"
certs_bin=${KM_CERTS_BIN:-}
[[ -z $certs_bin && -x ${CARGO_TARGET_DIR:-target}/debug/kube-migrate-certs ]] && certs_bin=${CARGO_TARGET_DIR:-target}/debug/kube-migrate-certs
check "certs/install.sh: Secrets and caBundle" env KM_CERTS_BIN="$certs_bin" KM_NAMESPACE="$ns" certs/install.sh "$STATE.certs"
bundle=$(base64 -w0 < "$STATE.certs/ca.crt")
ca_bundles() {
  kubectl get validatingwebhookconfiguration kube-migrate-eviction -o jsonpath='{.webhooks[0].clientConfig.caBundle}'
  echo
  kubectl get mutatingwebhookconfiguration kube-migrate-restore -o jsonpath='{.webhooks[0].clientConfig.caBundle}'
}
check "both webhooks carry the certs tool's CA" equals "$(ca_bundles)" "$bundle"$'\n'"$bundle"
check "helm upgrade with values (maxPerNode=3, restoreSeconds=900)" "$HELM" upgrade "${release[@]}" \
  --set controller.limits.maxPerNode=3 --set controller.deadlines.restoreSeconds=900
check "the upgrade kept the caBundle (read from the cluster)" equals "$(ca_bundles)" "$bundle"$'\n'"$bundle"
env_of() { kubectl -n "$ns" get deployment kube-migrate-webhook -o jsonpath="{.spec.template.spec.containers[0].env[?(@.name==\"$1\")].value}"; }
check "the values reached the Deployment" equals "$(env_of KM_MAX_PER_NODE) $(env_of KM_RESTORE_DEADLINE_SECONDS)" "3 900"

log "cert-manager mode (stand-in CRDs for cert-manager's and the Prometheus Operator's kinds)"
for crd in cert-manager.io:Certificate:certificates cert-manager.io:Issuer:issuers \
  monitoring.coreos.com:ServiceMonitor:servicemonitors monitoring.coreos.com:PrometheusRule:prometheusrules; do
  IFS=: read -r group kind plural <<< "$crd"
  kubectl apply -f - >/dev/null <<YAML
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: { name: $plural.$group }
spec:
  group: $group
  scope: Namespaced
  names: { kind: $kind, plural: $plural }
  versions:
    - name: v1
      served: true
      storage: true
      schema: { openAPIV3Schema: { type: object, x-kubernetes-preserve-unknown-fields: true } }
YAML
  kubectl wait --for condition=Established "crd/$plural.$group" --timeout=60s >/dev/null
done
check "helm upgrade to cert-manager, ServiceMonitor, PrometheusRule and the NetworkPolicy" "$HELM" upgrade "${release[@]}" \
  --set tls.source=cert-manager --set monitoring.serviceMonitor.enabled=true --set monitoring.prometheusRule.enabled=true \
  --set networkPolicy.enabled=true
check "the webhooks' NetworkPolicy stored (admission port from the API server's CIDRs, metrics from monitoring)" equals \
  "$(kubectl -n "$ns" get networkpolicy kube-migrate-webhook -o jsonpath='{.spec.ingress[*].ports[0].port}')" "8443 8080"
check "4 Certificates, 2 Issuers, a ServiceMonitor, a PrometheusRule stored" equals \
  "$(kubectl -n "$ns" get certificates,issuers,servicemonitors,prometheusrules -o name | sort | tr '\n' ' ')" \
  "certificate.cert-manager.io/kube-migrate-agent-ca certificate.cert-manager.io/kube-migrate-agent-issuer certificate.cert-manager.io/kube-migrate-ca certificate.cert-manager.io/kube-migrate-webhook issuer.cert-manager.io/kube-migrate-ca issuer.cert-manager.io/kube-migrate-selfsigned prometheusrule.monitoring.coreos.com/kube-migrate servicemonitor.monitoring.coreos.com/kube-migrate "
inject() { kubectl get "$1" "$2" -o jsonpath='{.metadata.annotations.cert-manager\.io/inject-ca-from} {.webhooks[0].clientConfig.caBundle}'; }
check "the webhooks ask cert-manager's injector for the CA and carry no caBundle of their own" equals \
  "$(inject validatingwebhookconfiguration kube-migrate-eviction)|$(inject mutatingwebhookconfiguration kube-migrate-restore)" \
  "kube-migrate/kube-migrate-webhook |kube-migrate/kube-migrate-webhook "

check "helm uninstall" "$HELM" uninstall kube-migrate -n "$ns" --wait --timeout 60s
gone() {
  local left
  left=$(kubectl get validatingwebhookconfigurations,mutatingwebhookconfigurations,clusterroles,clusterrolebindings -o name | grep kube-migrate || true)
  left+=$(kubectl -n "$ns" get deployments,daemonsets,services,serviceaccounts,certificates -o name | grep -v serviceaccount/default || true)
  [[ -z $left ]] || { echo "left: $left"; return 1; }
  kubectl get crd podmigrations.migrate.io -o name
}
check "uninstall removed the release's objects and kept the CRD (PodMigrations survive)" gone

echo "helm-live: ran in $((SECONDS - started)) s against kube-apiserver $(kubectl version -o json | python3 -c 'import sys, json; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
echo "helm-live: $passed passed, $failed failed"
((failed == 0))
