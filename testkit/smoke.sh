#!/usr/bin/env bash
# Proves test-kubelet against a real control plane (cluster/up.sh), then stops everything.
#
#   testkit/smoke.sh            build, start a control plane + 2 test kubelets (+ 2 kube-migrate
#                               agents for the restore check), run the checks, clean up
#   TESTKIT_KEEP=1 testkit/smoke.sh   leave everything running (stop: testkit/smoke.sh --down)
#
# Own state dir and ports (so it does not collide with another cluster on this machine):
#   KUBE_MIGRATE_CLUSTER_DIR [/tmp/km-testkit], KUBE_MIGRATE_APISERVER_PORT [17443],
#   KUBE_MIGRATE_ETCD_PORT [32379], KUBE_MIGRATE_ETCD_PEER_PORT [32380],
#   KUBE_MIGRATE_CONTROLLER_MANAGER_PORT [30257], KUBE_MIGRATE_SCHEDULER_PORT [30259],
#   TESTKIT_PORT_BASE [31250]: kubelets base+0/+1, agent APIs base+8193/+8194,
#   registries base+4193/+4194, agent admin ports base+7840/+7841.
#
# The API server gets --kubelet-preferred-address-types=InternalIP,Hostname: test kubelets
# report Hostname=<node name>, which does not resolve (see testkit/README.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export KUBE_MIGRATE_CLUSTER_DIR=${KUBE_MIGRATE_CLUSTER_DIR:-/tmp/km-testkit}
export KUBE_MIGRATE_APISERVER_PORT=${KUBE_MIGRATE_APISERVER_PORT:-17443}
export KUBE_MIGRATE_ETCD_PORT=${KUBE_MIGRATE_ETCD_PORT:-32379}
export KUBE_MIGRATE_ETCD_PEER_PORT=${KUBE_MIGRATE_ETCD_PEER_PORT:-32380}
export KUBE_MIGRATE_CONTROLLER_MANAGER_PORT=${KUBE_MIGRATE_CONTROLLER_MANAGER_PORT:-30257}
export KUBE_MIGRATE_SCHEDULER_PORT=${KUBE_MIGRATE_SCHEDULER_PORT:-30259}
export KUBE_MIGRATE_NODES="node-a node-b"
export KUBE_MIGRATE_APISERVER_ARGS="${KUBE_MIGRATE_APISERVER_ARGS:-} --kubelet-preferred-address-types=InternalIP,Hostname"
STATE=$KUBE_MIGRATE_CLUSTER_DIR
TK=$STATE/testkit
BASE=${TESTKIT_PORT_BASE:-31250}
NODES=(node-a node-b)
NS=testkit

log() { printf '\n[smoke] %s\n' "$*" >&2; }
stop_ours() {
  local f pid
  for f in "$TK"/run/*.pid; do
    [[ -e $f ]] || continue
    pid=$(cat "$f")
    kill -TERM "$pid" 2> /dev/null || true
    rm -f "$f"
  done
}
down() {
  stop_ours
  "$ROOT/cluster/down.sh" "$STATE" >&2 || true
}
if [[ ${1:-} == --down ]]; then
  down
  exit 0
fi

passed=0 failed=0
pass() { passed=$((passed + 1)); printf '[smoke] PASS %s\n' "$*" >&2; }
fail() { failed=$((failed + 1)); printf '[smoke] FAIL %s\n' "$*" >&2; }
expect() { # description, command...
  local what=$1; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
eventually() { # seconds, command...
  local deadline=$((SECONDS + $1)); shift
  until "$@" > /dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}
start() { # name, command...
  local name=$1; shift
  mkdir -p "$TK/run" "$TK/logs"
  NO_COLOR=1 setsid "$@" > "$TK/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$TK/run/$name.pid"
}

log "building test-kubelet, kube-migrate-agent, kube-migrate-certs"
(cd "$ROOT" && cargo build -p kube-migrate-testkit -p kube-migrate-agent -p kube-migrate-certs >&2)

log "control plane in $STATE (from scratch)"
stop_ours
"$ROOT/cluster/down.sh" --purge "$STATE" > /dev/null 2>&1 || true
eval "$("$ROOT/cluster/up.sh" "$STATE" | tail -n 1)"
export KUBECONFIG
[[ ${TESTKIT_KEEP:-} == 1 ]] || trap down EXIT

# Private copies: a concurrent rebuild must not swap binaries under running processes.
mkdir -p "$TK/bin"
for b in test-kubelet kube-migrate-agent kube-migrate-certs; do
  cp "$ROOT/target/debug/$b" "$TK/bin/$b.new" && mv "$TK/bin/$b.new" "$TK/bin/$b"
done
BIN=$TK/bin

"$BIN/kube-migrate-certs" --out "$TK/certs" --san 127.0.0.1 --san localhost >&2
for i in "${!NODES[@]}"; do
  n=${NODES[$i]}
  mkdir -p "$TK/$n/checkpoints" "$TK/$n/agent"
  start "kubelet-$n" "$BIN/test-kubelet" --node-name "$n" \
    --kubeconfig "$STATE/nodes/$n.kubeconfig" --listen "127.0.0.1:$((BASE + i))" \
    --tls-cert "$STATE/nodes/$n-serving.crt" --tls-key "$STATE/nodes/$n-serving.key" \
    --registry-ca "$TK/certs/ca.crt" --checkpoint-dir "$TK/$n/checkpoints" --cgroup-root "$TK/$n/cgroup"
done

log "1. nodes register and stay Ready"
for n in "${NODES[@]}"; do
  expect "node $n Ready" eventually 30 kubectl wait --for=condition=Ready "node/$n" --timeout=2s
done
kubectl get nodes -o wide
kubectl get node node-a -o jsonpath='addresses={.status.addresses} kubeletEndpoint={.status.daemonEndpoints.kubeletEndpoint.Port} capacity={.status.capacity}{"\n"}'

log "2. a Deployment runs (on node-a: node-b is cordoned meanwhile)"
kubectl cordon node-b
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - > /dev/null
kubectl apply -f - << YAML
apiVersion: apps/v1
kind: Deployment
metadata: { name: counter, namespace: $NS }
spec:
  replicas: 1
  selector: { matchLabels: { app: counter } }
  template:
    metadata: { labels: { app: counter } }
    spec:
      containers:
        - name: app
          image: registry.local/counter:1
          env: [{ name: STATE_BYTES, value: "1048576" }]
          volumeMounts: [{ name: data, mountPath: /data }]
      volumes: [{ name: data, emptyDir: {} }]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: node-logger, namespace: $NS }
spec:
  selector: { matchLabels: { app: node-logger } }
  template:
    metadata: { labels: { app: node-logger } }
    spec:
      containers: [{ name: logger, image: registry.local/logger:2 }]
YAML
expect "Deployment rolled out" kubectl -n "$NS" rollout status deploy/counter --timeout=60s
expect "DaemonSet rolled out" kubectl -n "$NS" rollout status ds/node-logger --timeout=60s
kubectl uncordon node-b
POD=$(kubectl -n "$NS" get pod -l app=counter -o jsonpath='{.items[0].metadata.name}')
kubectl -n "$NS" get pods -o wide
phase=$(kubectl -n "$NS" get pod "$POD" -o jsonpath='{.status.phase} ready={.status.containerStatuses[0].ready} podIP={.status.podIP}')
echo "$POD: $phase"
expect "pod Running and ready" test "$phase" = "Running ready=true podIP=127.0.0.1"

log "3. kubectl logs (API server -> test kubelet)"
sleep 2.2
logs=$(kubectl -n "$NS" logs "$POD" -c app)
printf '%s\n' "$logs" | head -4 || true
ORIGINAL_SHA=$(sed -n '1s/.*memory_sha256=\([0-9a-f]*\).*/\1/p' <<< "$logs")
expect "first line: started fresh" grep -q '^started fresh: counter=0 memory_bytes=1048576 memory_sha256=' <<< "$logs"
expect "counter lines" grep -q '^counter=20$' <<< "$logs"
expect "kubectl logs --tail=1" test "$(kubectl -n "$NS" logs "$POD" --tail=1 | wc -l)" = 1

log "4. checkpoint API: TokenReview + SubjectAccessReview"
kubectl apply -f - > /dev/null << YAML
apiVersion: v1
kind: ServiceAccount
metadata: { name: checkpointer, namespace: $NS }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: nobody, namespace: $NS }
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: testkit-node-checkpoint }
rules: [{ apiGroups: [""], resources: ["nodes/checkpoint"], verbs: ["create"] }]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: testkit-checkpointer }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: testkit-node-checkpoint }
subjects: [{ kind: ServiceAccount, name: checkpointer, namespace: $NS }]
YAML
URL="https://127.0.0.1:$BASE/checkpoint/$NS/$POD/app?timeout=30"
GOOD=$(kubectl -n "$NS" create token checkpointer)
BAD=$(kubectl -n "$NS" create token nobody)
ok=$(curl -sk -X POST -H "Authorization: Bearer $GOOD" "$URL" -w ' HTTP %{http_code}')
forbidden=$(curl -sk -X POST -H "Authorization: Bearer $BAD" "$URL" -w ' HTTP %{http_code}')
anonymous=$(curl -sk -X POST "$URL" -w ' HTTP %{http_code}')
missing=$(curl -sk -X POST -H "Authorization: Bearer $GOOD" "https://127.0.0.1:$BASE/checkpoint/$NS/$POD/nope" -w ' HTTP %{http_code}')
printf 'allowed:   %s\nforbidden: %s\nno token:  %s\nunknown:   %s\n' "$ok" "$forbidden" "$anonymous" "$missing"
expect "200 with create nodes/checkpoint" grep -q 'HTTP 200$' <<< "$ok"
expect "403 without it" grep -q 'HTTP 403$' <<< "$forbidden"
expect "403 names the missing permission" grep -q '^Forbidden (user=system:serviceaccount:testkit:nobody, verb=create, resource=nodes, subresource=checkpoint)$' <<< "$forbidden"
expect "401 without a token" grep -q 'HTTP 401$' <<< "$anonymous"
expect "404 for an unknown container" grep -q 'HTTP 404$' <<< "$missing"
ARCHIVE=$(sed -n 's/^{"items":\["\([^"]*\)"\]}.*/\1/p' <<< "$ok")
echo "archive: $ARCHIVE"
tar tvf "$ARCHIVE"
expect "CRI-O layout" test "$(tar tf "$ARCHIVE" | tr '\n' ' ')" = "config.dump spec.dump checkpoint/ checkpoint/inventory.img checkpoint/pages-1.img rootfs-diff.tar dump.log stats-dump "
header=$(tar xOf "$ARCHIVE" checkpoint/pages-1.img 2> /dev/null | head -1) || true
echo "state header: $header"
expect "state header holds the memory hash" grep -q "\"memory_sha256\":\"$ORIGINAL_SHA\"" <<< "$header"
expect "container still running after the checkpoint" test "$(kubectl -n "$NS" get pod "$POD" -o jsonpath='{.status.phase}')" = Running

log "5. restore on node-b from a checkpoint image served by a real kube-migrate agent"
kubectl -n "$NS" create token checkpointer --duration=1h > "$TK/agent.token"
for i in "${!NODES[@]}"; do
  n=${NODES[$i]}
  start "agent-$n" "$BIN/kube-migrate-agent" --node-name "$n" \
    --listen "127.0.0.1:$((BASE + 8193 + i))" --registry-listen "127.0.0.1:$((BASE + 4193 + i))" \
    --admin-listen "127.0.0.1:$((BASE + 7840 + i))" \
    --kubelet-url "https://127.0.0.1:$((BASE + i))" --kubelet-ca "$STATE/nodes/ca.crt" \
    --token-file "$TK/agent.token" --state-dir "$TK/$n/agent" \
    --identity files --tls-cert "$TK/certs/agent.crt" --tls-key "$TK/certs/agent.key" --ca "$TK/certs/ca.crt" \
    --log-format plain
done
AGENT_A=https://127.0.0.1:$((BASE + 8193)) AGENT_B=https://127.0.0.1:$((BASE + 8194))
MTLS=(--cacert "$TK/certs/ca.crt" --cert "$TK/certs/webhook.crt" --key "$TK/certs/webhook.key" -sf -H content-type:application/json)
for i in 0 1; do eventually 20 curl -sf "http://127.0.0.1:$((BASE + 7840 + i))/readyz"; done
# An agent checkpoints only what a PodMigration in Checkpointing asks for (it reads it with the
# admin kubeconfig here): the pod opts in and a PodMigration stands in for the controller's.
kubectl apply -f "$ROOT/manifests/crd.yaml" > /dev/null
kubectl wait --for condition=Established crd/podmigrations.migrate.io --timeout=60s > /dev/null
kubectl -n "$NS" annotate pod "$POD" migrate.io/stateful=true --overwrite > /dev/null
kubectl apply -f - > /dev/null << YAML
apiVersion: migrate.io/v1alpha1
kind: PodMigration
metadata: { name: smoke, namespace: $NS }
spec:
  podName: $POD
  podUid: $(kubectl -n "$NS" get pod "$POD" -o jsonpath='{.metadata.uid}')
  sourceNode: node-a
  trigger: Manual
YAML
kubectl -n "$NS" patch podmigration smoke --subresource=status --type=merge -p '{"status":{"phase":"Checkpointing"}}' > /dev/null
ID=$(kubectl -n "$NS" get podmigration smoke -o jsonpath='{.metadata.uid}')
cp_json=$(curl "${MTLS[@]}" -X POST "$AGENT_A/v1/migrations/$ID/checkpoint" \
  -d "{\"migration\":\"smoke\",\"namespace\":\"$NS\",\"pod\":\"$POD\",\"containers\":[\"app\"],\"timeoutSeconds\":30}")
echo "agent-a checkpoint: $cp_json"
ref=$(python3 -c 'import json,sys; a=json.loads(sys.argv[1])["archives"][0]; print(json.dumps([{"container":a["container"],"digest":a["digest"],"sizeBytes":a["sizeBytes"]}]))' "$cp_json")
curl "${MTLS[@]}" -X POST "$AGENT_B/v1/migrations/$ID/expect" -d "{\"sourceNode\":\"node-a\",\"archives\":$ref}" > /dev/null
curl "${MTLS[@]}" -X POST "$AGENT_A/v1/migrations/$ID/push" -d "{\"target\":\"$AGENT_B\",\"archives\":$ref}" > /dev/null
img_json=$(curl "${MTLS[@]}" -X POST "$AGENT_B/v1/migrations/$ID/image" -d "{\"namespace\":\"$NS\",\"pod\":\"$POD\",\"archives\":$ref}")
echo "agent-b image: $img_json"
IMAGE=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["images"][0]["image"])' "$img_json")
DIGEST=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["images"][0]["manifestDigest"])' "$img_json")
kubectl apply -f - > /dev/null << YAML
apiVersion: v1
kind: Pod
metadata: { name: restored, namespace: $NS }
spec:
  nodeName: node-b
  containers: [{ name: app, image: "$IMAGE" }]
---
apiVersion: v1
kind: Pod
metadata: { name: missing-image, namespace: $NS }
spec:
  nodeName: node-b
  containers: [{ name: app, image: "${IMAGE%:*}:nope" }]
YAML
expect "restored pod Ready" kubectl -n "$NS" wait --for=condition=Ready pod/restored --timeout=60s
first=$(kubectl -n "$NS" logs restored | sed -n 1p)
echo "$first"
counter=$(sed -n 's/.*: counter=\([0-9]*\) .*/\1/p' <<< "$first")
expect "restored line names the image and manifest digest" grep -q "^restored from checkpoint image $IMAGE@$DIGEST: counter=" <<< "$first"
expect "memory intact (sha256 $ORIGINAL_SHA)" grep -q "memory_bytes=1048576 memory_sha256=$ORIGINAL_SHA\$" <<< "$first"
expect "counter resumed ($counter > 0)" test "${counter:-0}" -gt 0
image_id=$(kubectl -n "$NS" get pod restored -o jsonpath='{.status.containerStatuses[0].imageID}')
echo "imageID: $image_id"
expect "imageID carries the manifest digest" test "$image_id" = "${IMAGE%:*}@$DIGEST"
eventually 10 sh -c "kubectl -n $NS get pod missing-image -o jsonpath='{.status.containerStatuses[0].state.waiting.reason}' | grep -qx ErrImagePull"
waiting=$(kubectl -n "$NS" get pod missing-image -o jsonpath='{.status.containerStatuses[0].state.waiting}')
echo "missing-image: $waiting"
expect "missing image: ErrImagePull" grep -q '"reason":"ErrImagePull"' <<< "$waiting"
kubectl -n "$NS" delete pod restored missing-image --wait=false > /dev/null

log "6. kubectl delete pod (node-b cordoned, so the replacement lands on node-a again)"
kubectl cordon node-b
t0=$SECONDS
kubectl -n "$NS" delete pod "$POD"
echo "deleted in $((SECONDS - t0)) s (terminationGracePeriodSeconds 30)"
expect "pod deleted within 5 s" test $((SECONDS - t0)) -le 5
expect "replacement rolled out" kubectl -n "$NS" rollout status deploy/counter --timeout=60s
kubectl -n "$NS" get pods -o wide
kubectl uncordon node-b

log "7. cordon and drain"
echo "counter pod on: $(kubectl -n "$NS" get pods -l app=counter -o jsonpath='{.items[*].spec.nodeName}')"
expect "kubectl drain node-a" kubectl drain node-a --ignore-daemonsets --delete-emptydir-data --timeout=120s
expect "counter runs on node-b" eventually 30 sh -c "kubectl -n $NS get pods -l app=counter -o jsonpath='{.items[*].spec.nodeName}:{.items[*].status.phase}' | grep -qx node-b:Running"
kubectl -n "$NS" get pods -o wide
kubectl get nodes
hb() { kubectl get node node-a -o jsonpath='{.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}'; }
before=$(hb)
echo "waiting for node-a's next Ready heartbeat (every 30 s; last $before)"
hb_changed() { [[ $(hb) != "$before" ]]; }
expect "a heartbeat came" eventually 40 hb_changed
echo "heartbeat $(hb); spec.unschedulable=$(kubectl get node node-a -o jsonpath='{.spec.unschedulable}')"
expect "spec.unschedulable kept across heartbeats" test "$(kubectl get node node-a -o jsonpath='{.spec.unschedulable}')" = true
kubectl uncordon node-a

log "8. still alive"
kubectl -n kube-node-lease get lease -o custom-columns=NAME:.metadata.name,HOLDER:.spec.holderIdentity,RENEWED:.spec.renewTime
for n in "${NODES[@]}"; do
  expect "node $n Ready at the end" test "$(kubectl get node "$n" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True
done

log "$passed passed, $failed failed"
((failed == 0))
