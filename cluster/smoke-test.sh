#!/usr/bin/env bash
# Checks that a control plane started by up.sh does what kube-migrate's tests
# rely on, and cleans up the objects it made (so it can run again on the same
# cluster). Ends with the line "N passed, N failed"; exits non-zero on a failure.
#
# Meant for a cluster where no test kubelet runs yet (e.g. right after up.sh):
# it registers Node node-a itself, as node-a.
#
# Usage: smoke-test.sh [STATE_DIR]   (default ${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster})
# Env: KUBE_MIGRATE_SMOKE_WEBHOOK_PORT  port of the throwaway admission webhook [18443]
set -euo pipefail

STATE=${1:-${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster}}
export KUBECONFIG=$STATE/admin.kubeconfig
[[ -f $KUBECONFIG ]] || { echo "no $KUBECONFIG: is the cluster up (cluster/up.sh)?" >&2; exit 1; }
NODE_KUBECONFIG=$STATE/nodes/node-a.kubeconfig
WEBHOOK_PORT=${KUBE_MIGRATE_SMOKE_WEBHOOK_PORT:-18443}
work=$(mktemp -d)
webhook_pid='' created_node=0

passed=0 failed=0
check() { # <description> <command...>
  local desc=$1 out; shift
  if out=$("$@" 2>&1); then
    passed=$((passed + 1)); echo "ok   - $desc"
  else
    failed=$((failed + 1)); echo "FAIL - $desc"; printf '%s\n' "$out" | sed "s/^/       /"
  fi
}
as_admin() { kubectl --request-timeout=10s "$@"; }
as_node() { kubectl --kubeconfig="$NODE_KUBECONFIG" --request-timeout=10s "$@"; }
# (As a node, kubectl create needs --validate=false: client-side validation
# wants to list CRDs, which a node may not.)
# retry <seconds> <command...>
retry() {
  local end=$(( $(date +%s) + $1 )); shift
  until "$@"; do (( $(date +%s) < end )) || return 1; sleep 0.5; done
}

cleanup() {
  [[ -z $webhook_pid ]] || kill "$webhook_pid" 2> /dev/null || true
  as_admin delete deployment x --ignore-not-found --wait=false > /dev/null 2>&1 || true
  as_admin delete validatingwebhookconfiguration kube-migrate-smoke --ignore-not-found > /dev/null 2>&1 || true
  as_admin delete configmap smoke-allow smoke-deny --ignore-not-found > /dev/null 2>&1 || true
  as_admin delete csr kube-migrate-smoke --ignore-not-found > /dev/null 2>&1 || true
  # Only a Node this run registered (a test kubelet may own node-a otherwise).
  (( ! created_node )) || as_admin delete node node-a --ignore-not-found > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# Leftovers of an interrupted earlier run would make the creates below fail.
cleanup; work=$(mktemp -d)

# expect <want> <command...>: the command succeeds and prints exactly <want>.
expect() {
  local want=$1 got; shift
  got=$("$@") || return 1
  [[ $got == "$want" ]] || { echo "got '$got', want '$want'"; return 1; }
}
# fails_with <text> <command...>: the command fails and its output contains <text>.
fails_with() {
  local want=$1 out; shift
  if out=$("$@" 2>&1); then echo "unexpectedly succeeded: $out"; return 1; fi
  [[ $out == *"$want"* ]] || { echo "failed, but without '$want': $out"; return 1; }
}

# --- basics ---------------------------------------------------------------------
check "/readyz is ok" expect ok as_admin get --raw /readyz
check "namespaces default and kube-system exist" as_admin get ns default kube-system
check "admin may do everything (auth can-i --list shows *.*)" \
  bash -c 'kubectl auth can-i --list | grep -E "^\*\.\*[[:space:]]+\[\][[:space:]]+\[\][[:space:]]+\[\*\]"'

# --- controllers and scheduler --------------------------------------------------
check "create deployment x" as_admin create deployment x --image=busybox
check "ReplicaSet for x appears" \
  retry 30 expect 1 as_admin get rs -l app=x -o 'jsonpath={.items[*].status.replicas}'
check "Pod for x appears, Pending" \
  retry 30 expect Pending as_admin get pods -l app=x -o 'jsonpath={.items[*].status.phase}'
check "scheduler marks it Unschedulable (no nodes)" retry 30 expect Unschedulable \
  as_admin get pods -l app=x -o 'jsonpath={.items[*].status.conditions[?(@.type=="PodScheduled")].reason}'

# --- authentication: ServiceAccount token + TokenReview ------------------------------
token=$(as_admin create token default)
tokenreview() { printf 'apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec:\n  token: %s\n' "$1"; }
tokenreview "$token" > "$work/tokenreview.yaml"
tokenreview "${token%?????}AAAAA" > "$work/tokenreview-bad.yaml"
check "TokenReview (as admin) authenticates a 'kubectl create token default' token" \
  expect true/system:serviceaccount:default:default as_admin create -f "$work/tokenreview.yaml" \
  -o 'jsonpath={.status.authenticated}/{.status.user.username}'
check "TokenReview (as node-a) authenticates it too" \
  expect true as_node create --validate=false -f "$work/tokenreview.yaml" -o 'jsonpath={.status.authenticated}'
check "TokenReview (as node-a) rejects a tampered token" \
  expect "" as_node create --validate=false -f "$work/tokenreview-bad.yaml" -o 'jsonpath={.status.authenticated}'

# --- authorization: SubjectAccessReview as a node (the test kubelet's path) ------------
sar() { # <user> <group>
  cat << EOF
apiVersion: authorization.k8s.io/v1
kind: SubjectAccessReview
spec:
  user: $1
  groups: [$2, system:authenticated]
  resourceAttributes: {verb: create, resource: nodes, subresource: checkpoint, name: node-a}
EOF
}
sar kubernetes-admin system:masters > "$work/sar-admin.yaml"
sar system:serviceaccount:default:default system:serviceaccounts > "$work/sar-sa.yaml"
check "SubjectAccessReview (as node-a): admin may create nodes/checkpoint" \
  expect true as_node create --validate=false -f "$work/sar-admin.yaml" -o 'jsonpath={.status.allowed}'
check "SubjectAccessReview (as node-a): default ServiceAccount may not" \
  expect false as_node create --validate=false -f "$work/sar-sa.yaml" -o 'jsonpath={.status.allowed}'

# --- node identity: Node authorizer + NodeRestriction ----------------------------------
check "node-a authenticates as system:node:node-a, groups system:nodes" \
  expect 'system:node:node-a ["system:nodes","system:authenticated"]' \
  as_node auth whoami -o 'jsonpath={.status.userInfo.username} {.status.userInfo.groups}'
echo '{"apiVersion":"v1","kind":"Node","metadata":{"name":"node-a"}}' > "$work/node-a.json"
echo '{"apiVersion":"v1","kind":"Node","metadata":{"name":"node-b"}}' > "$work/node-b.json"
if as_admin get node node-a > /dev/null 2>&1; then
  echo "skip - node-a registers its Node object (node-a already exists)"
else
  created_node=1
  check "node-a registers its Node object" as_node create --validate=false -f "$work/node-a.json"
fi
check "node-a may not create Node node-b (NodeRestriction)" \
  fails_with 'node "node-a" is not allowed to modify node "node-b"' \
  as_node create --validate=false -f "$work/node-b.json"
check "node-a may not list secrets (Node authorizer)" \
  fails_with 'cannot list resource "secrets"' as_node get secrets -A

# --- CSR signing by the controller-manager ---------------------------------------------
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$work/csr.key" \
  -subj "/CN=system:node:node-a/O=system:nodes" -out "$work/csr.pem" 2> /dev/null
cat > "$work/csr.yaml" << EOF
apiVersion: certificates.k8s.io/v1
kind: CertificateSigningRequest
metadata: {name: kube-migrate-smoke}
spec:
  request: $(base64 -w0 < "$work/csr.pem")
  signerName: kubernetes.io/kube-apiserver-client-kubelet
  usages: [digital signature, client auth]
EOF
signed_cert_verifies() {
  local c
  c=$(as_admin get csr kube-migrate-smoke -o 'jsonpath={.status.certificate}')
  [[ -n $c ]] && base64 -d <<< "$c" | openssl verify -CAfile "$STATE/pki/ca.crt"
}
check "node-a submits a client CSR" as_node create --validate=false -f "$work/csr.yaml"
check "admin approves it" as_admin certificate approve kube-migrate-smoke
check "controller-manager signs it with the cluster CA" retry 20 signed_cert_verifies

# --- admission webhook by clientConfig.url on 127.0.0.1 ----------------------------------
if command -v python3 > /dev/null; then
  cat > "$work/webhook.py" << 'EOF'
# Throwaway validating webhook: denies objects named smoke-deny.
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["request"]
        ok = req["object"]["metadata"].get("name") != "smoke-deny"
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "response": {"uid": req["uid"], "allowed": ok,
                                        "status": {"message": "denied by smoke webhook"}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
EOF
  # node-a's serving cert has IP SAN 127.0.0.1 and is signed by the cluster CA.
  python3 "$work/webhook.py" "$WEBHOOK_PORT" "$STATE/nodes/node-a-serving.crt" \
    "$STATE/nodes/node-a-serving.key" 2> "$work/webhook.log" &
  webhook_pid=$!
  retry 10 bash -c "(exec 3<> /dev/tcp/127.0.0.1/$WEBHOOK_PORT) 2> /dev/null"
  check "register a webhook with clientConfig.url https://127.0.0.1:$WEBHOOK_PORT" as_admin apply -f - << EOF
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {name: kube-migrate-smoke}
webhooks:
- name: smoke.kube-migrate.test
  clientConfig:
    url: https://127.0.0.1:$WEBHOOK_PORT/validate
    caBundle: $(base64 -w0 < "$STATE/pki/ca.crt")
  rules: [{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [configmaps]}]
  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}
  sideEffects: None
  admissionReviewVersions: [v1]
  failurePolicy: Fail
  timeoutSeconds: 5
EOF
  check "webhook allows configmap smoke-allow" retry 10 as_admin create configmap smoke-allow
  check "webhook denies configmap smoke-deny" \
    fails_with 'denied by smoke webhook' as_admin create configmap smoke-deny
else
  echo "skip - admission webhook by URL (no python3)"
fi

echo "$passed passed, $failed failed"
(( failed == 0 ))
