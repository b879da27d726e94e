#!/usr/bin/env bash
# Starts a local Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) on 127.0.0.1 with real TLS
# certificates, as background processes. No kubelet, no container runtime:
# kube-migrate's tests bring their own test kubelet, which registers the nodes
# node-a/node-b/node-c with the per-node credentials generated here.
#
# Usage: up.sh [STATE_DIR]          (default ${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster})
# On success the last line on stdout is `export KUBECONFIG=<STATE_DIR>/admin.kubeconfig`,
# so `eval "$(cluster/up.sh)"` works; progress goes to stderr.
#
# An existing STATE_DIR is reused: its certificates and etcd data survive a
# down.sh (use `down.sh --purge` for a clean slate). If the cluster in it is
# already running, up.sh only waits for it to be ready.
#
# Env (defaults in brackets):
#   KUBE_MIGRATE_CLUSTER_DIR               state dir [/tmp/kube-migrate-cluster]
#   KUBE_MIGRATE_APISERVER_PORT            kube-apiserver secure port [6443]
#   KUBE_MIGRATE_ETCD_PORT                 etcd client port [12379]
#   KUBE_MIGRATE_ETCD_PEER_PORT            etcd peer port [12380]
#   KUBE_MIGRATE_CONTROLLER_MANAGER_PORT   kube-controller-manager secure port [10257]
#   KUBE_MIGRATE_SCHEDULER_PORT            kube-scheduler secure port [10259]
#   KUBE_MIGRATE_NODES                     node names to make credentials for ["node-a node-b node-c"]
#   KUBE_MIGRATE_UP_TIMEOUT                seconds to wait for readiness [120]
#   KUBE_MIGRATE_CERT_KEY_TYPE             key type of the CA and certificates: ecdsa (P-256) or rsa (2048) [ecdsa]
#   KUBE_MIGRATE_APISERVER_NODE_ADDRESS    [unset] an address of this machine that real nodes (own network
#                                          namespaces, nodes/up.sh) reach the apiserver at: it then also
#                                          serves there (binds 0.0.0.0), advertises it (the `kubernetes`
#                                          Service endpoints point at it), has it in its certificate, and
#                                          calls webhook/aggregated Services by endpoint IP
#                                          (--enable-aggregator-routing: no kube-proxy on this machine)
#   KUBE_MIGRATE_APISERVER_ARGS, KUBE_MIGRATE_CONTROLLER_MANAGER_ARGS,
#   KUBE_MIGRATE_SCHEDULER_ARGS, KUBE_MIGRATE_ETCD_ARGS
#                                          extra flags (word-split) for that component
#   KUBE_MIGRATE_CACHE                     binary cache, see build-control-plane.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac

STATE=${1:-${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster}}
APISERVER_PORT=${KUBE_MIGRATE_APISERVER_PORT:-6443}
ETCD_PORT=${KUBE_MIGRATE_ETCD_PORT:-12379}
ETCD_PEER_PORT=${KUBE_MIGRATE_ETCD_PEER_PORT:-12380}
KCM_PORT=${KUBE_MIGRATE_CONTROLLER_MANAGER_PORT:-10257}
SCHEDULER_PORT=${KUBE_MIGRATE_SCHEDULER_PORT:-10259}
read -ra NODES <<< "${KUBE_MIGRATE_NODES:-node-a node-b node-c}"
TIMEOUT=${KUBE_MIGRATE_UP_TIMEOUT:-120}
KEY_TYPE=${KUBE_MIGRATE_CERT_KEY_TYPE:-ecdsa}
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1 # first address of SERVICE_CIDR: the `kubernetes` Service
SA_ISSUER=https://kubernetes.default.svc.cluster.local
NODE_ADDRESS=${KUBE_MIGRATE_APISERVER_NODE_ADDRESS:-}
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)

start_ms=$(( $(date +%s%N) / 1000000 ))
elapsed() { local ms=$(( $(date +%s%N) / 1000000 - start_ms )); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }
log() { echo "[up +$(elapsed)s] $*" >&2; }
die() { echo "[up] ERROR: $*" >&2; exit 1; }

for tool in openssl kubectl curl base64 setsid; do
  command -v "$tool" > /dev/null || die "$tool is required on PATH"
done

# --- binaries --------------------------------------------------------------
# A no-op taking well under a second when the binaries are cached.
"$here/build-control-plane.sh" > /dev/null
eval "$("$here/build-control-plane.sh" --print-env)"
BIN_K8S=$KUBE_MIGRATE_K8S_BIN_DIR
BIN_ETCD=$KUBE_MIGRATE_ETCD_BIN_DIR

mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
PKI=$STATE/pki KCFG=$STATE/kubeconfig LOGS=$STATE/logs RUN=$STATE/run NODEDIR=$STATE/nodes
mkdir -p "$PKI" "$KCFG" "$LOGS" "$RUN" "$NODEDIR" "$STATE/etcd"
chmod 700 "$PKI" "$KCFG" "$STATE/etcd"
# down.sh --purge only deletes directories carrying this marker.
touch "$STATE/.kube-migrate-cluster"

# --- already running? -------------------------------------------------------
# A pid file counts only while its process is alive and still one of ours
# (its command line names this state dir), so a reused pid is not mistaken.
ours() { # <pid>: alive and its command line names this state dir
  local cmd
  cmd=$(tr '\0' ' ' 2> /dev/null < "/proc/$1/cmdline") && [[ $cmd == *"$STATE/"* ]]
}
alive() { # <component>
  local pid
  pid=$(cat "$RUN/$1.pid" 2> /dev/null) && [[ -n $pid ]] && ours "$pid"
}
running=()
for c in "${COMPONENTS[@]}"; do alive "$c" && running+=("$c"); done
if (( ${#running[@]} == ${#COMPONENTS[@]} )); then
  log "already running in $STATE; waiting for readiness only"
elif (( ${#running[@]} > 0 )); then
  die "partly running in $STATE (${running[*]}); run $here/down.sh \"$STATE\" first"
else
  rm -f "$RUN"/*.pid
  # Fail early and clearly on a port that something else holds.
  for port in "$APISERVER_PORT" "$ETCD_PORT" "$ETCD_PEER_PORT" "$KCM_PORT" "$SCHEDULER_PORT"; do
    if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null; then
      die "127.0.0.1:$port is already in use (see the KUBE_MIGRATE_*_PORT variables)"
    fi
  done
fi
rm -f "$STATE/admin.kubeconfig" # written again only once the cluster is ready

# --- certificates -------------------------------------------------------------
# Generated once per state dir and reused; never written into the work tree.
umask 077
CA_DAYS=3650 CERT_DAYS=365
# ECDSA P-256 by default: making the ~17 keys takes well under a second, where
# RSA 2048 takes several on this kind of machine. Both work with Go's TLS,
# rustls and OpenSSL. (The service-account key is RSA either way, see below.)
case "$KEY_TYPE" in
  ecdsa) NEWKEY=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) KEY_USAGE="digitalSignature" ;;
  rsa) NEWKEY=(-newkey rsa:2048) KEY_USAGE="digitalSignature, keyEncipherment" ;;
  *) die "KUBE_MIGRATE_CERT_KEY_TYPE must be ecdsa or rsa, not $KEY_TYPE" ;;
esac

# sign <name> <subject> <extendedKeyUsage> [subjectAltName]
#   -> $PKI/<name>.key and $PKI/<name>.crt signed by the cluster CA
sign() {
  local name=$1 subj=$2 eku=$3 san=${4:-} ext
  ext=$(mktemp)
  {
    echo "basicConstraints = critical, CA:FALSE"
    echo "keyUsage = critical, $KEY_USAGE"
    echo "extendedKeyUsage = $eku"
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid, issuer"
    [[ -z $san ]] || echo "subjectAltName = $san"
  } > "$ext"
  openssl req -new "${NEWKEY[@]}" -nodes -keyout "$PKI/$name.key" -subj "$subj" \
    -out "$PKI/$name.csr" 2> /dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$CERT_DAYS" -sha256 \
    -extfile "$ext" -out "$PKI/$name.crt" 2> /dev/null
  rm -f "$ext" "$PKI/$name.csr"
}

# The cluster-wide part: CA, component certificates, service-account keys.
core_pki_complete() {
  local f
  for f in ca apiserver apiserver-kubelet-client apiserver-etcd-client etcd admin \
           controller-manager scheduler; do
    [[ -s $PKI/$f.crt && -s $PKI/$f.key ]] || return 1
  done
  [[ -s $PKI/sa.key && -s $PKI/sa.pub ]] || return 1
  # Regenerate well before the leaf certificates expire.
  openssl x509 -checkend 86400 -noout -in "$PKI/apiserver.crt" > /dev/null
}
APISERVER_SANS="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$SERVICE_IP${NODE_ADDRESS:+,IP:$NODE_ADDRESS}"
apiserver_cert_has_node_address() {
  [[ -z $NODE_ADDRESS ]] || openssl x509 -noout -ext subjectAltName -in "$PKI/apiserver.crt" 2> /dev/null |
    grep -qE "IP Address:${NODE_ADDRESS//./\\.}(,|\$)"
}

if core_pki_complete; then
  log "reusing certificates in $PKI"
else
  # A running cluster would keep using the old ones.
  (( ${#running[@]} == 0 )) || die "certificates in $PKI are incomplete or expiring; run $here/down.sh first"
  log "generating certificates in $PKI"
  rm -f "$PKI"/*.crt "$PKI"/*.key "$PKI"/*.pub "$NODEDIR"/*.crt "$NODEDIR"/*.key
  openssl req -x509 -new "${NEWKEY[@]}" -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
    -days "$CA_DAYS" -sha256 -subj "/CN=kube-migrate-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2> /dev/null

  # kube-apiserver serving cert: every name a client inside or outside the
  # cluster may use, including the `kubernetes` Service ClusterIP.
  sign apiserver "/CN=kube-apiserver" serverAuth "$APISERVER_SANS"
  # The apiserver's client cert towards kubelets (logs/exec/port-forward proxy).
  sign apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client/O=system:masters" clientAuth
  # etcd: one cert for its client and peer listeners; the apiserver's client cert.
  sign etcd "/CN=etcd" "serverAuth, clientAuth" "DNS:localhost,IP:127.0.0.1"
  sign apiserver-etcd-client "/CN=kube-apiserver-etcd-client" clientAuth
  # Users: RBAC knows the controller-manager and scheduler by these exact names.
  sign admin "/CN=kubernetes-admin/O=system:masters" clientAuth
  sign controller-manager "/CN=system:kube-controller-manager" clientAuth
  sign scheduler "/CN=system:kube-scheduler" clientAuth
  # Service-account token signing key pair. RSA, so tokens are RS256, which
  # every JWT library accepts.
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2> /dev/null
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2> /dev/null
fi

# A state dir made without KUBE_MIGRATE_APISERVER_NODE_ADDRESS (or with another one): re-sign only
# the apiserver's serving certificate, with the same CA.
if ! apiserver_cert_has_node_address; then
  (( ${#running[@]} == 0 )) || die "the running apiserver's certificate lacks $NODE_ADDRESS; run $here/down.sh first"
  log "re-signing the apiserver certificate with IP:$NODE_ADDRESS"
  sign apiserver "/CN=kube-apiserver" serverAuth "$APISERVER_SANS"
fi

# Per node (made for any node in KUBE_MIGRATE_NODES that has none yet): the
# client identity the Node authorizer and NodeRestriction expect of a kubelet,
# plus, for the test kubelet's own HTTPS endpoint, a serving cert for the node
# name and 127.0.0.1.
for n in "${NODES[@]}"; do
  [[ ! -s $NODEDIR/$n.crt || ! -s $NODEDIR/$n-serving.crt ]] || continue
  log "generating certificates for node $n"
  sign "node-$n" "/CN=system:node:$n/O=system:nodes" clientAuth
  sign "node-$n-serving" "/CN=system:node:$n/O=system:nodes" serverAuth "DNS:$n,DNS:localhost,IP:127.0.0.1"
  mv "$PKI/node-$n.crt" "$NODEDIR/$n.crt"; mv "$PKI/node-$n.key" "$NODEDIR/$n.key"
  mv "$PKI/node-$n-serving.crt" "$NODEDIR/$n-serving.crt"; mv "$PKI/node-$n-serving.key" "$NODEDIR/$n-serving.key"
done
cp "$PKI/ca.crt" "$NODEDIR/ca.crt"

# --- kubeconfigs ----------------------------------------------------------------
# Rewritten on every start (cheap): they embed the apiserver port.
b64() { base64 -w0 < "$1"; }
kubeconfig() { # <file> <user> <cert> <key>
  cat > "$1" << EOF
apiVersion: v1
kind: Config
clusters:
- name: kube-migrate
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(b64 "$3")
    client-key-data: $(b64 "$4")
contexts:
- name: $2@kube-migrate
  context:
    cluster: kube-migrate
    user: $2
current-context: $2@kube-migrate
EOF
}
kubeconfig "$KCFG/admin.kubeconfig" kubernetes-admin "$PKI/admin.crt" "$PKI/admin.key"
kubeconfig "$KCFG/controller-manager.kubeconfig" system:kube-controller-manager \
  "$PKI/controller-manager.crt" "$PKI/controller-manager.key"
kubeconfig "$KCFG/scheduler.kubeconfig" system:kube-scheduler "$PKI/scheduler.crt" "$PKI/scheduler.key"
for n in "${NODES[@]}"; do
  kubeconfig "$NODEDIR/$n.kubeconfig" "system:node:$n" "$NODEDIR/$n.crt" "$NODEDIR/$n.key"
done
umask 022
ADMIN=$KCFG/admin.kubeconfig

# --- processes -----------------------------------------------------------------
# start <component> <command...>: runs it in its own session (so it outlives
# this script and its terminal), stdin closed, output to logs/<component>.log.
# The child writes its own pid before exec'ing the binary, so the pid file
# always names the component itself, never a wrapper.
start() {
  local name=$1; shift
  [[ ! -f $LOGS/$name.log ]] || mv "$LOGS/$name.log" "$LOGS/$name.log.prev"
  rm -f "$RUN/$name.pid"
  # All traffic is loopback; make sure no proxy from the environment is used.
  # shellcheck disable=SC2016 # $$ and $@ are for the inner bash
  env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u all_proxy -u ALL_PROXY \
    setsid bash -c 'echo $$ > "$0"; exec "$@"' "$RUN/$name.pid" "$@" \
    > "$LOGS/$name.log" 2>&1 < /dev/null &
  for _ in $(seq 50); do [[ -s $RUN/$name.pid ]] && break; sleep 0.02; done
  log "started $name (pid $(cat "$RUN/$name.pid"), log $LOGS/$name.log)"
}

deadline=$(( $(date +%s) + TIMEOUT ))
# wait_for <description> <command...>: polls until the command succeeds; fails
# (after stopping what was started) when a component died or on timeout.
wait_for() {
  local what=$1; shift
  until "$@" > /dev/null 2>&1; do
    local c
    for c in "${COMPONENTS[@]}"; do
      if [[ -f $RUN/$c.pid ]] && ! alive "$c"; then fail "$c exited while waiting for $what"; fi
    done
    (( $(date +%s) < deadline )) || fail "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.2
  done
  log "$what: ok"
}
fail() {
  echo "[up] ERROR: $*" >&2
  local c
  for c in "${COMPONENTS[@]}"; do
    [[ -f $LOGS/$c.log ]] || continue
    echo "----- last lines of $LOGS/$c.log -----" >&2
    tail -n 15 "$LOGS/$c.log" >&2
  done
  echo "[up] stopping what was started; state and logs stay in $STATE" >&2
  "$here/down.sh" "$STATE" >&2 || true
  exit 1
}

kubectl_admin() { kubectl --kubeconfig="$ADMIN" --request-timeout=5s "$@"; }
etcd_healthy() {
  curl -sf --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/apiserver-etcd-client.crt" \
    --key "$PKI/apiserver-etcd-client.key" "https://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'
}
apiserver_ready() { [[ $(kubectl_admin get --raw /readyz) == ok ]]; }
scheduler_healthy() { [[ $(curl -sk --max-time 2 "https://127.0.0.1:$SCHEDULER_PORT/healthz") == ok ]]; }

if (( ${#running[@]} == 0 )); then
  # shellcheck disable=SC2086 # the *_ARGS variables are word-split on purpose
  start etcd "$BIN_ETCD/etcd" \
    --name=kube-migrate \
    --data-dir="$STATE/etcd" \
    --listen-client-urls="https://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls="https://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="https://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="https://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="kube-migrate=https://127.0.0.1:$ETCD_PEER_PORT" \
    --cert-file="$PKI/etcd.crt" --key-file="$PKI/etcd.key" \
    --trusted-ca-file="$PKI/ca.crt" --client-cert-auth \
    --peer-cert-file="$PKI/etcd.crt" --peer-key-file="$PKI/etcd.key" \
    --peer-trusted-ca-file="$PKI/ca.crt" --peer-client-cert-auth \
    ${KUBE_MIGRATE_ETCD_ARGS:-}
  wait_for "etcd /health" etcd_healthy

  # Notes on the less obvious flags:
  # --advertise-address=127.0.0.1 + --endpoint-reconciler-type=none: the
  #   apiserver listens on loopback only; advertising the machine's other
  #   address would point the `kubernetes` Service at nothing, and Endpoints
  #   may not contain loopback addresses, so that Service gets no endpoints.
  #   (With "none" the apiserver logs one harmless "Found stale data, removed
  #   previous endpoints on kubernetes service" error at every start.)
  # --enable-admission-plugins adds to the default set (it does not replace it).
  # --service-account-*: the issuer and keys that make `kubectl create token`,
  #   projected tokens and TokenReview work; the default API audience is the issuer.
  # Webhooks given by clientConfig.url (https://127.0.0.1:<port>/...) need no
  #   flag: the apiserver calls them directly (no egress selector is configured).
  # With KUBE_MIGRATE_APISERVER_NODE_ADDRESS the apiserver is reachable from the nodes' network
  #   namespaces: it advertises that address (the default "lease" reconciler then keeps the
  #   `kubernetes` Endpoints on it), and --enable-aggregator-routing makes it call admission/conversion
  #   webhooks and aggregated APIs by a Service's endpoint IP instead of its ClusterIP, which only the
  #   nodes' kube-proxy can route (cmd/kube-apiserver/app/server.go, buildServiceResolver, gives the
  #   same resolver to the webhook admission plugins).
  if [[ -n $NODE_ADDRESS ]]; then
    apiserver_net=(--bind-address=0.0.0.0 --advertise-address="$NODE_ADDRESS" --enable-aggregator-routing=true)
  else
    apiserver_net=(--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none)
  fi
  # shellcheck disable=SC2086
  start kube-apiserver "$BIN_K8S/kube-apiserver" \
    "${apiserver_net[@]}" --secure-port="$APISERVER_PORT" \
    --cert-dir="$STATE/apiserver-certs" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --etcd-servers="https://127.0.0.1:$ETCD_PORT" \
    --etcd-cafile="$PKI/ca.crt" --etcd-certfile="$PKI/apiserver-etcd-client.crt" \
    --etcd-keyfile="$PKI/apiserver-etcd-client.key" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --service-account-issuer="$SA_ISSUER" \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --v=1 \
    ${KUBE_MIGRATE_APISERVER_ARGS:-}
  wait_for "kube-apiserver /readyz" apiserver_ready

  # Started only now: the controller-manager gives up if the apiserver is not
  # healthy soon after its start.
  # --use-service-account-credentials: each controller acts as its own
  #   ServiceAccount, so RBAC is exercised as in a real cluster.
  # --cluster-signing-*: the CSR signers (kubelet client/serving, legacy-unknown).
  # --client-ca-file + --authentication-skip-lookup (also for the scheduler):
  #   authenticate clients of its own secure port with our CA instead of
  #   reading the front-proxy (requestheader) CA from the apiserver's
  #   extension-apiserver-authentication ConfigMap; there is no front proxy, and
  #   the lookup would log an error about the missing CA every few seconds.
  # shellcheck disable=SC2086
  start kube-controller-manager "$BIN_K8S/kube-controller-manager" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
    --kubeconfig="$KCFG/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$KCFG/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$KCFG/controller-manager.kubeconfig" \
    --client-ca-file="$PKI/ca.crt" --authentication-skip-lookup \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --root-ca-file="$PKI/ca.crt" \
    --service-account-private-key-file="$PKI/sa.key" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --v=1 \
    ${KUBE_MIGRATE_CONTROLLER_MANAGER_ARGS:-}

  # shellcheck disable=SC2086
  start kube-scheduler "$BIN_K8S/kube-scheduler" \
    --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" \
    --kubeconfig="$KCFG/scheduler.kubeconfig" \
    --authentication-kubeconfig="$KCFG/scheduler.kubeconfig" \
    --authorization-kubeconfig="$KCFG/scheduler.kubeconfig" \
    --client-ca-file="$PKI/ca.crt" --authentication-skip-lookup \
    --leader-elect=false \
    --v=1 \
    ${KUBE_MIGRATE_SCHEDULER_ARGS:-}
fi

wait_for "kube-apiserver /readyz" apiserver_ready
# The `default` ServiceAccount is created by the controller-manager: its
# presence proves the controller-manager is up and authorized.
wait_for "ServiceAccount default/default" kubectl_admin -n default get serviceaccount default
wait_for "kube-scheduler /healthz" scheduler_healthy

# Sourceable summary for other scripts and tests.
cat > "$STATE/cluster.env" << EOF
KUBE_MIGRATE_CLUSTER_DIR=$STATE
KUBE_MIGRATE_APISERVER_URL=https://127.0.0.1:$APISERVER_PORT
KUBE_MIGRATE_APISERVER_PORT=$APISERVER_PORT
KUBE_MIGRATE_APISERVER_NODE_URL=${NODE_ADDRESS:+https://$NODE_ADDRESS:$APISERVER_PORT}
KUBE_MIGRATE_ETCD_PORT=$ETCD_PORT
KUBE_MIGRATE_ETCD_PEER_PORT=$ETCD_PEER_PORT
KUBE_MIGRATE_CONTROLLER_MANAGER_PORT=$KCM_PORT
KUBE_MIGRATE_SCHEDULER_PORT=$SCHEDULER_PORT
KUBE_MIGRATE_CA_FILE=$PKI/ca.crt
KUBE_MIGRATE_SERVICE_CIDR=$SERVICE_CIDR
KUBE_MIGRATE_SA_ISSUER=$SA_ISSUER
KUBE_MIGRATE_NODES="${NODES[*]}"
EOF
# Written last and atomically: its existence means "ready".
install -m 600 "$ADMIN" "$STATE/admin.kubeconfig.tmp"
mv "$STATE/admin.kubeconfig.tmp" "$STATE/admin.kubeconfig"

log "ready in $(elapsed)s: apiserver https://127.0.0.1:$APISERVER_PORT, node kubeconfigs in $NODEDIR"
echo "export KUBECONFIG=$STATE/admin.kubeconfig"
