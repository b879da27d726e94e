#!/usr/bin/env bash
# kube-migrate on a local cluster made of real upstream parts, as local processes:
#   control plane (cluster/up.sh: etcd, kube-apiserver, controller-manager, scheduler),
#   one test kubelet per node (testkit), one kube-migrate agent per node, and the
#   kube-migrate webhook/controller, all on 127.0.0.1 with the repository's certificates.
#
#   scripts/local-cluster.sh up     start everything from a clean state; prints `export KUBECONFIG=...`
#   scripts/local-cluster.sh down   stop everything and delete the state
#   scripts/local-cluster.sh kill-webhook [i|all] | start-webhook [i] [shutdown delay s] | term-webhook [i]
#                                                            (tests: controller restarts)
#
# The product runs with its own ServiceAccounts' tokens (RBAC from manifests/rbac.yaml),
# the webhook configurations come from manifests/webhooks.yaml with the local URL and
# caBundle, and the agents are found through EndpointSlices of the agent Service, as in a
# cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/kube-migrate-cluster}
KM=$STATE/km
NODES=(node-a node-b node-c)
PROFILE=${KUBE_MIGRATE_PROFILE:-debug}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE
WEBHOOK_PORT=${KUBE_MIGRATE_WEBHOOK_PORT:-18443}
WEBHOOK_ADMIN_PORT=${KUBE_MIGRATE_WEBHOOK_ADMIN_PORT:-18080}
export KUBE_MIGRATE_CLUSTER_DIR=$STATE

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Ports per node index i: kubelet 11250+i, agent API 19443+i, registry 15443+i, agent admin 19090+i.
kubelet_port() { echo $((11250 + $1)); }
agent_port() { echo $((19443 + $1)); }
registry_port() { echo $((15443 + $1)); }
agent_admin_port() { echo $((19090 + $1)); }

start() { # name, command...
  local name=$1; shift
  mkdir -p "$KM/logs" "$KM/run"
  setsid "$@" >"$KM/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$KM/run/$name.pid"
}

wait_for() { # description, seconds, command...
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      log "timed out waiting for $what"
      tail -n 30 "$KM"/logs/*.log >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

# The Restoring deadline is 45 s here (default 300 s) so that scenario 14 ends in time; every
# other scenario restores in well under that.
start_webhook() { # [replica index, default 0: the one the webhook configurations call] [shutdown delay s]
  local i=${1:-0} name=webhook delay=${2:-5}
  ((i == 0)) || name=webhook-$i
  if [[ -s $KM/run/$name.pid ]] && kill -0 "$(cat "$KM/run/$name.pid")" 2>/dev/null; then
    return 0 # already running
  fi
  # Appends to its log, so a restart keeps the previous run's lines.
  mkdir -p "$KM/logs" "$KM/run"
  setsid env KUBECONFIG="$KM/webhook.kubeconfig" POD_NAME="webhook-$i" "$BIN/kube-migrate-webhook" \
    --listen "127.0.0.1:$((WEBHOOK_PORT + i))" --admin-listen "127.0.0.1:$((WEBHOOK_ADMIN_PORT + i))" \
    --tls-cert "$KM/certs/webhook.crt" --tls-key "$KM/certs/webhook.key" --ca "$KM/certs/ca.crt" \
    --namespace kube-migrate --agent-address-override 127.0.0.1 --log-format plain \
    --agent-issuer-cert "$KM/certs/agent-issuer.crt" --agent-issuer-key "$KM/certs/agent-issuer.key" \
    --client-ca "$STATE/webhook-client/ca.crt" --client-name kube-apiserver-webhook-client \
    --restoring-deadline-seconds "${KUBE_MIGRATE_RESTORING_DEADLINE_SECONDS:-45}" --shutdown-delay-seconds "$delay" \
    ${KUBE_MIGRATE_MAX_PER_NODE:+--max-per-node "$KUBE_MIGRATE_MAX_PER_NODE"} \
    >>"$KM/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$KM/run/$name.pid"
  wait_for "$name ready" 60 curl -sf "http://127.0.0.1:$((WEBHOOK_ADMIN_PORT + i))/readyz"
}

# SIGSTOP / SIGCONT a replica: a leader that stalls (GC pause, CPU starvation, a frozen VM)
# past its Lease while its in-flight steps are still pending.
signal_webhook() { # signal, [replica index]
  local i=${2:-0} name=webhook
  ((i == 0)) || name=webhook-$i
  local pid; pid=$(cat "$KM/run/$name.pid")
  kill "-$1" -- "-$pid" 2>/dev/null || kill "-$1" "$pid"
}

# A kubeconfig for the current cluster that authenticates as `user` with the token in a file.
token_kubeconfig() { # file, user, token file
  kubectl config view --raw --minify --flatten > "$1"
  KUBECONFIG=$1 kubectl config set-credentials "$2" --token="$(cat "$3")" >/dev/null
  KUBECONFIG=$1 kubectl config set-context --current --user="$2" >/dev/null
}

# The test kubelet and the agent of node index $1.
start_node() {
  local i=$1 n=${NODES[$1]}
  mkdir -p "$KM/$n/checkpoints" "$KM/$n/agent" "$KM/$n/crun"
  local -a crun=()
  mapfile -t crun < <(crun_flags "$n")
  start "kubelet-$n" "$BIN/test-kubelet" --node-name "$n" \
    --kubeconfig "$STATE/nodes/$n.kubeconfig" \
    --listen "127.0.0.1:$(kubelet_port "$i")" \
    --tls-cert "$STATE/nodes/$n-serving.crt" --tls-key "$STATE/nodes/$n-serving.key" \
    --registry-ca "$KM/certs/ca.crt" \
    --checkpoint-dir "$KM/$n/checkpoints" --cgroup-root "$KM/$n/cgroup" "${crun[@]}"
  # The agent's own identity, as in a cluster: a ServiceAccount token bound to its Node (a
  # DaemonSet pod's token names its node the same way), with which it asks the controller
  # for its per-node certificate (CertificateSigningRequest) and reads PodMigrations.
  wait_for "node $n registered" 60 kubectl get node "$n"
  kubectl -n kube-migrate create token kube-migrate-agent --bound-object-kind Node --bound-object-name "$n" \
    --duration=24h > "$KM/$n/agent.token"
  token_kubeconfig "$KM/$n/agent.kubeconfig" kube-migrate-agent "$KM/$n/agent.token"
  start "agent-$n" env KUBECONFIG="$KM/$n/agent.kubeconfig" "$BIN/kube-migrate-agent" --node-name "$n" \
    --listen "127.0.0.1:$(agent_port "$i")" \
    --registry-listen "127.0.0.1:$(registry_port "$i")" \
    --admin-listen "127.0.0.1:$(agent_admin_port "$i")" \
    --kubelet-url "https://127.0.0.1:$(kubelet_port "$i")" --kubelet-ca "$STATE/nodes/ca.crt" \
    --token-file "$KM/$n/agent.token" --state-dir "$KM/$n/agent" --ca "$KM/certs/ca.crt" \
    --cgroup-root "$KM/$n/cgroup" --hold-dir "$KM/$n/holds" \
    --retention-seconds 3600 --log-format plain
}

node_index() { # name
  local i
  for i in "${!NODES[@]}"; do [[ ${NODES[$i]} == "$1" ]] && { echo "$i"; return; }; done
  die "unknown node $1"
}

# A node "powered off" right after a drain: its kubelet and agent die (SIGKILL) and its disk
# is gone (checkpoints and the agent's state). What was only there is lost.
power_off() { # node
  local n=$1 name pid
  node_index "$n" >/dev/null
  for name in "kubelet-$n" "agent-$n"; do
    [[ -e $KM/run/$name.pid ]] || continue
    pid=$(cat "$KM/run/$name.pid")
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$KM/run/$name.pid"
  done
  rm -rf "${KM:?}/$n/checkpoints" "${KM:?}/$n/agent"
  log "$n powered off (kubelet and agent killed, checkpoints and agent state removed)"
}

power_on() { # node
  local n=$1 i; i=$(node_index "$n")
  start_node "$i"
  wait_for "node $n Ready" 60 kubectl wait --for=condition=Ready "node/$n" --timeout=2s
  wait_for "agent $n ready" 120 curl -sf "http://127.0.0.1:$(agent_admin_port "$i")/readyz"
}

# SIGKILL: no graceful shutdown, no lease release, as when a node dies under the controller.
kill_webhook() { # [replica index, default 0; "all": every replica]
  local i=${1:-0} name=webhook f
  if [[ $i == all ]]; then
    for f in "$KM"/run/webhook*.pid; do
      [[ -e $f ]] || continue
      f=${f##*/webhook}; f=${f%.pid}; kill_webhook "${f#-}"
    done
    return 0
  fi
  ((i == 0)) || name=webhook-$i
  local pid; pid=$(cat "$KM/run/$name.pid" 2>/dev/null) || return 0
  # Gone already (a replica that ended its shutdown delay) is fine.
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  rm -f "$KM/run/$name.pid"
}

# Real containers (issue #4): kube-migrate.test/* images run with crun + CRIU inside the Debian
# trixie root of criu/. Writes $KM/crun-status: "enabled", or "disabled: <why>" when this
# machine cannot (no Debian archive for the root, CRIU's kernel checks fail, no gcc): the
# simulated containers still run, and the CRIU scenarios say they are skipped and why.
crun_setup() {
  mkdir -p "$KM/bin" "$KM/images"
  local status="$KM/crun-status"
  if [[ ${KUBE_MIGRATE_CRUN:-1} != 1 ]]; then
    echo "disabled: KUBE_MIGRATE_CRUN=${KUBE_MIGRATE_CRUN}" > "$status"; return 0
  fi
  local root out
  if ! root=$(criu/make-root.sh 2> "$KM/make-root.log"); then
    echo "disabled: criu/make-root.sh failed: $(tail -n 3 "$KM/make-root.log" | tr '\n' ' ')" > "$status"; return 0
  fi
  export KUBE_MIGRATE_CRIU_ROOT=$root
  if ! out=$(timeout 60 criu/enter.sh criu check 2>&1 < /dev/null) || [[ $out != *"Looks good"* ]]; then
    echo "disabled: 'criu check' in $root: $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')" > "$status"; return 0
  fi
  if ! gcc -O2 -Wall -o "$KM/bin/km-shim" criu/km-shim.c 2> "$KM/km-shim.log"; then
    echo "disabled: building criu/km-shim.c failed: $(tail -n 3 "$KM/km-shim.log" | tr '\n' ' ')" > "$status"; return 0
  fi
  rm -rf "$KM/images/counter" "$KM/images/memory"
  criu/images.sh counter "$KM/images/counter/rootfs" >/dev/null
  echo '{"entrypoint": ["/bin/sh", "/counter.sh"]}' > "$KM/images/counter/image.json"
  criu/images.sh memory "$KM/images/memory/rootfs" >/dev/null
  echo '{"entrypoint": ["/bin/memhog"]}' > "$KM/images/memory/image.json"
  echo enabled > "$status"
  log "real containers: kube-migrate.test/{counter,memory} run with $(grep -E '^(crun|criu) ' "$root/.kube-migrate-versions" | tr '\n' ' ')"
}

# The kubelet flags for crun, when enabled.
crun_flags() { # node
  [[ $(cat "$KM/crun-status" 2>/dev/null) == enabled ]] || return 0
  printf '%s\n' --crun-images "$KM/images" --crun-enter "$ROOT/criu/enter.sh" \
    --crun-shim "$KM/bin/km-shim" --crun-state "$KM/$1/crun"
}

# Real containers outlive their kubelet (each runs under its own shim): kill and delete them,
# then remove their cgroups.
crun_cleanup() {
  local d id
  for d in "$KM"/node-*/crun; do
    [[ -d $d/crun ]] || continue
    for id in "$d"/crun/*/; do
      [[ -d $id ]] || continue
      id=$(basename "$id")
      timeout 30 criu/enter.sh -b "$d" -- crun --root "$d/crun" kill "$id" KILL < /dev/null > /dev/null 2>&1 || true
      timeout 30 criu/enter.sh -b "$d" -- crun --root "$d/crun" delete -f "$id" < /dev/null > /dev/null 2>&1 || true
    done
  done
  local c
  for c in /sys/fs/cgroup/*/kube-migrate-node-*; do
    [[ -d $c ]] || continue
    find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

stop_all() {
  if [[ -d $KM/run ]]; then
    for pidfile in "$KM"/run/*.pid; do
      [[ -e $pidfile ]] || continue
      local pid; pid=$(cat "$pidfile")
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 1
    for pidfile in "$KM"/run/*.pid; do
      [[ -e $pidfile ]] || continue
      local pid; pid=$(cat "$pidfile")
      kill -KILL -- "-$pid" 2>/dev/null || true
      rm -f "$pidfile"
    done
  fi
  crun_cleanup
  # Leftovers of an interrupted run (anything started from this state dir, shims included).
  pkill -f "$KM/" 2>/dev/null || true
}

# The API server authenticates to the webhooks with a client certificate (README "Webhook
# trust"): its own small CA, a certificate named kube-apiserver-webhook-client, and the
# AdmissionConfiguration whose kubeconfig presents it to every webhook ("*"); the webhook runs
# with --client-ca and --client-name, so every scenario goes through it.
webhook_client_auth() {
  local d=$STATE/webhook-client
  mkdir -p "$d"
  if [[ ! -s $d/client.crt ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=webhook client CA" \
      -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=kube-apiserver-webhook-client \
      -keyout "$d/client.key" -out "$d/client.csr" 2>/dev/null
    openssl x509 -req -in "$d/client.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
      -extfile <(printf 'extendedKeyUsage=clientAuth\n') -out "$d/client.crt" 2>/dev/null
  fi
  cat > "$d/kubeconfig" <<YAML
apiVersion: v1
kind: Config
users:
  - name: "*"
    user: { client-certificate: $d/client.crt, client-key: $d/client.key }
YAML
  cat > "$d/admission.yaml" <<YAML
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
  - name: ValidatingAdmissionWebhook
    configuration:
      apiVersion: apiserver.config.k8s.io/v1
      kind: WebhookAdmissionConfiguration
      kubeConfigFile: $d/kubeconfig
  - name: MutatingAdmissionWebhook
    configuration:
      apiVersion: apiserver.config.k8s.io/v1
      kind: WebhookAdmissionConfiguration
      kubeConfigFile: $d/kubeconfig
YAML
}

up() {
  command -v kubectl >/dev/null || die "kubectl is needed"
  log "building the control plane (cached after the first time)"
  cluster/build-control-plane.sh >&2
  log "building kube-migrate ($PROFILE)"
  if [[ $PROFILE == release ]]; then cargo build --release --workspace --bins --locked >&2; else cargo build --workspace --bins --locked >&2; fi
  stop_all
  # Always a clean slate: a state directory left by a run that was killed (a machine restart,
  # a killed CI job) would otherwise bring back its etcd, pods and PodMigrations.
  [[ ! -e $STATE/.kube-migrate-cluster ]] || cluster/down.sh --purge "$STATE" >&2
  # Every API request of kube-migrate's ServiceAccounts is audited (metadata only), so that
  # scripts/rbac_audit.py can hold what they did against what manifests/rbac.yaml grants.
  mkdir -p "$STATE/audit"
  cat > "$STATE/audit/policy.yaml" <<'YAML'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts:kube-migrate"]
  - level: None
YAML
  local audit="--audit-policy-file=$STATE/audit/policy.yaml --audit-log-path=$STATE/audit/audit.log"
  webhook_client_auth
  local admission="--admission-control-config-file=$STATE/webhook-client/admission.yaml"
  eval "$(KUBE_MIGRATE_APISERVER_ARGS="${KUBE_MIGRATE_APISERVER_ARGS:-} $audit --audit-log-maxsize=500 $admission" \
    cluster/up.sh "$STATE" | tail -n 1)"
  export KUBECONFIG
  mkdir -p "$KM"
  log "certificates"
  "$BIN/kube-migrate-certs" --out "$KM/certs" --san 127.0.0.1 --san localhost >&2

  log "installing the CRD, namespace and RBAC from manifests/"
  kubectl apply -f manifests/namespace.yaml -f manifests/crd.yaml -f manifests/rbac.yaml >&2
  kubectl wait --for condition=Established crd/podmigrations.migrate.io --timeout=60s >&2
  # The agents run as local processes: a selector-less agent Service whose EndpointSlices
  # we write, one per node (each node's agent has its own loopback port here).
  kubectl apply -f - >&2 <<YAML
apiVersion: v1
kind: Service
metadata: { name: kube-migrate-agent, namespace: kube-migrate }
spec:
  clusterIP: None
  ports: [{ name: api, port: 9443 }]
YAML
  for i in "${!NODES[@]}"; do
    kubectl apply -f - >&2 <<YAML
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-migrate-agent-${NODES[$i]}
  namespace: kube-migrate
  labels:
    kubernetes.io/service-name: kube-migrate-agent
    endpointslice.kubernetes.io/managed-by: local-cluster.kube-migrate.io
# Endpoints may not hold loopback addresses: a documentation address (TEST-NET-1, never
# dialled) stands here and the webhook runs with --agent-address-override 127.0.0.1.
addressType: IPv4
ports: [{ name: api, port: $(agent_port "$i"), protocol: TCP }]
endpoints:
  - addresses: ["192.0.2.$((i + 1))"]
    nodeName: ${NODES[$i]}
    conditions: { ready: true }
YAML
  done

  log "ServiceAccount tokens for the product's own identities"
  local server; server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
  kubectl -n kube-migrate create token kube-migrate-webhook --duration=24h > "$KM/webhook.token"
  token_kubeconfig "$KM/webhook.kubeconfig" kube-migrate-webhook "$KM/webhook.token"
  : "$server"

  log "real containers (crun + CRIU)"
  crun_setup
  log "crun: $(cat "$KM/crun-status")"

  log "test kubelets and agents"
  for i in "${!NODES[@]}"; do
    start_node "$i"
  done
  for n in "${NODES[@]}"; do
    wait_for "node $n Ready" 60 kubectl wait --for=condition=Ready "node/$n" --timeout=2s
  done

  log "webhook + controller"
  start_webhook
  # Agents are Ready once the controller signed their per-node certificates.
  for i in "${!NODES[@]}"; do
    wait_for "agent ${NODES[$i]} ready" 120 curl -sf "http://127.0.0.1:$(agent_admin_port "$i")/readyz"
  done

  log "webhook configurations from manifests/webhooks.yaml (local URL and caBundle)"
  local bundle; bundle=$(base64 -w0 < "$KM/certs/ca.crt")
  # Replaced, not applied: a three-way merge onto a configuration already patched to a URL
  # would ask for both url and service.
  kubectl delete -f manifests/webhooks.yaml --ignore-not-found >&2
  kubectl apply -f manifests/webhooks.yaml >&2
  kubectl patch validatingwebhookconfiguration kube-migrate-eviction --type=json -p \
    "[{\"op\":\"replace\",\"path\":\"/webhooks/0/clientConfig\",\"value\":{\"url\":\"https://127.0.0.1:$WEBHOOK_PORT/validate/eviction\",\"caBundle\":\"$bundle\"}}]" >&2
  kubectl patch mutatingwebhookconfiguration kube-migrate-restore --type=json -p \
    "[{\"op\":\"replace\",\"path\":\"/webhooks/0/clientConfig\",\"value\":{\"url\":\"https://127.0.0.1:$WEBHOOK_PORT/mutate/pod\",\"caBundle\":\"$bundle\"}}]" >&2

  cat > "$KM/env" <<ENV
export KUBECONFIG=$KUBECONFIG
export KUBE_MIGRATE_CLUSTER_DIR=$STATE
export KUBE_MIGRATE_METRICS_URL=http://127.0.0.1:$WEBHOOK_ADMIN_PORT/metrics
export KUBE_MIGRATE_CRUN_STATUS_FILE=$KM/crun-status
ENV
  log "ready: nodes ${NODES[*]}; logs in $KM/logs"
  echo "export KUBECONFIG=$KUBECONFIG"
}

down() {
  stop_all
  cluster/down.sh --purge "$STATE" >&2 || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  kill-webhook) kill_webhook "${2:-0}" ;;
  start-webhook) start_webhook "${2:-0}" "${3:-5}" ;;
  term-webhook) signal_webhook TERM "${2:-0}" ;;
  pause-webhook) signal_webhook STOP "${2:-0}" ;;
  resume-webhook) signal_webhook CONT "${2:-0}" ;;
  power-off) power_off "${2:?node}" ;;
  power-on) power_on "${2:?node}" ;;
  *) echo "usage: $0 up|down|kill-webhook [i|all]|start-webhook [i] [delay]|term-webhook [i]|pause-webhook [i]|resume-webhook [i]|power-off NODE|power-on NODE" >&2; exit 2 ;;
esac
