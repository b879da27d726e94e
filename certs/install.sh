#!/usr/bin/env bash
# Make (or renew) the kube-migrate CA and certificates, store them as Secrets and wire the
# CA into both webhook configurations. Re-running renews the leaf certificates and keeps the
# CA; the running pods pick the new certificates up without a restart.
#
#   certs/install.sh [OUT_DIR]      (needs kubectl pointed at the cluster)
#
# Env: KM_NAMESPACE (kube-migrate's namespace, default kube-migrate: the Helm release's),
#      KM_EXTRA_SANS, KM_CERTS_BIN (a built kube-migrate-certs instead of `cargo run`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-certs/out}
ns=${KM_NAMESPACE:-kube-migrate}
# The dev profile: a one-shot tool, and a release build of its dependencies would take minutes.
if [[ -n ${KM_CERTS_BIN:-} ]]; then certs=("$KM_CERTS_BIN"); else certs=(cargo run --quiet --locked -p kube-migrate-certs --); fi
sans=()
for san in ${KM_EXTRA_SANS:-}; do sans+=(--san "$san"); done
"${certs[@]}" --out "$out" --namespace "$ns" "${sans[@]}"
secret() { # name, --from-file args...
  local name=$1; shift
  kubectl -n "$ns" create secret generic "$name" "$@" --dry-run=client -o yaml | kubectl apply -f -
}
secret kube-migrate-webhook-tls \
  --from-file=tls.crt="$out/webhook.crt" --from-file=tls.key="$out/webhook.key" --from-file=ca.crt="$out/ca.crt"
# The agents get the CA only; the controller signs each node's agent certificate with the
# agent issuer. (agent.crt/key in $out: the shared certificate of `--identity files`.)
secret kube-migrate-agent-tls --from-file=ca.crt="$out/ca.crt"
secret kube-migrate-agent-issuer \
  --from-file=tls.crt="$out/agent-issuer.crt" --from-file=tls.key="$out/agent-issuer.key" --from-file=ca.crt="$out/ca.crt"
bundle=$(base64 -w0 < "$out/ca.crt")
kubectl patch validatingwebhookconfiguration kube-migrate-eviction --type=json \
  -p "[{\"op\":\"replace\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"}]"
kubectl patch mutatingwebhookconfiguration kube-migrate-restore --type=json \
  -p "[{\"op\":\"replace\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"}]"
echo "certificates in $out; Secrets and caBundle updated"
