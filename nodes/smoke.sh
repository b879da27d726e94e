#!/usr/bin/env bash
# Smoke test of the real nodes (nodes/up.sh must have started at least 2): proves, with timings,
#   1. the nodes are Ready with distinct InternalIPs;
#   2. a busybox pod Runs on each node; kubectl logs and exec work (apiserver -> kubelet);
#   3. a pod reaches the apiserver through the `kubernetes` ClusterIP (kube-proxy in the node);
#   4. the apiserver reaches a pod IP on each node (pod proxy);
#   5. kubelet checkpoint API on node 1 (a token allowed `create nodes/checkpoint`; one without is
#      refused), a checkpoint image made from the archive, loaded into node 2, a pod with that
#      image on node 2: the counter continues where it was;
#   6. the product's pull path: the same checkpoint image served over TLS on node 2's own loopback
#      (127.0.0.1:5444, trusted through /etc/containers/certs.d/127.0.0.1:5444/ca.crt, as
#      docs/install-cri-o.md has it for the agent's 5443), pulled by CRI-O and restored;
#   7. what the agent DaemonSet relies on: a hostNetwork pod on node 1 sees the kubelet's archives
#      under the hostPath /var/lib/kubelet/checkpoints, writes to the hostPath /var/lib/kube-migrate
#      (the node's own directory), and its 127.0.0.1 is the node's (the kubelet's healthz).
#
# Usage: nodes/smoke.sh            exit 0 = PASS, 1 = FAIL, 77 = SKIPPED (no nodes running)
# Env: KUBE_MIGRATE_NODES_DIR [/tmp/kube-migrate-nodes]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=nodes/lib.sh
source "$here/lib.sh"
N1=km-node-1 N2=km-node-2
[[ $(id -u) == 0 ]] || { echo "SKIPPED: needs root"; exit 77; }
{ helper_pid 1 && helper_pid 2; } > /dev/null || { echo "SKIPPED: nodes 1 and 2 are not running (nodes/up.sh 2)"; exit 77; }
NS=km-smoke
ms() { echo $(($(date +%s%N) / 1000000)); }
T0=$(ms); LAST=$T0
timing() { local now; now=$(ms); printf '[smoke] %-52s %6d ms\n' "$1" $((now - LAST)) >&2; LAST=$now; }
fail() { echo "FAIL: $*" >&2; exit 1; }
k() { kubectl --request-timeout=20s "$@"; }
running() { [[ $(k -n "$NS" get pod "$1" -o jsonpath='{.status.phase}') == Running ]]; }

k delete namespace "$NS" --ignore-not-found --wait=true > /dev/null
k create namespace "$NS" > /dev/null
# The admission ServiceAccount controller needs the default SA before pods can be created.
wait_until 20 "ServiceAccount $NS/default" k -n "$NS" get serviceaccount default
timing "namespace"

# 1. nodes
ips=$(k get nodes "$N1" "$N2" -o jsonpath='{range .items[*]}{.status.addresses[?(@.type=="InternalIP")].address}{" "}{end}')
read -r ip1 ip2 <<< "$ips"
[[ -n $ip1 && -n $ip2 && $ip1 != "$ip2" ]] || fail "InternalIPs not distinct: '$ips'"
for n in "$N1" "$N2"; do
  [[ $(k get node "$n" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]] || fail "$n not Ready"
done
echo "nodes Ready: $N1 $ip1, $N2 $ip2"

# 2. a pod per node: "counter" counts once a second (the container that is checkpointed), "web"
#    serves HTTP on 8080 (the apiserver -> pod IP check) and does the in-pod API call.
pod() { # <name> <node>
  cat << EOF2
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $NS}
spec:
  nodeName: $2
  terminationGracePeriodSeconds: 1
  containers:
  - name: counter
    image: localhost/kube-migrate/busybox:latest
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "i=0; while true; do echo \$i; i=\$((i+1)); sleep 1; done"]
  - name: web
    image: localhost/kube-migrate/busybox:latest
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "mkdir -p /www && echo hello-from-\$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]
EOF2
}
pod smoke-1 "$N1" | k apply -f - > /dev/null
pod smoke-2 "$N2" | k apply -f - > /dev/null
wait_until 60 "smoke-1 Running" running smoke-1 || fail "smoke-1 not Running: $(k -n "$NS" describe pod smoke-1 | tail -n 5)"
wait_until 60 "smoke-2 Running" running smoke-2 || fail "smoke-2 not Running: $(k -n "$NS" describe pod smoke-2 | tail -n 5)"
timing "a pod Running on each node"
k -n "$NS" get pods -o wide
sleep 2
for p in smoke-1 smoke-2; do
  [[ -n $(k -n "$NS" logs "$p" -c counter | head -n 1) ]] || fail "kubectl logs $p gave nothing"
  [[ $(k -n "$NS" exec "$p" -c counter -- echo exec-ok) == exec-ok ]] || fail "kubectl exec $p"
done
timing "kubectl logs + exec on both nodes"

# 3. pod -> apiserver through the ClusterIP (DNAT by kube-proxy in the node's netns)
for p in smoke-1 smoke-2; do
  # shellcheck disable=SC2016 # expanded in the pod
  out=$(k -n "$NS" exec "$p" -c web -- sh -c 'wget -q -O- --no-check-certificate \
    --header "Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)" \
    https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/version' 2>&1) || fail "$p -> apiserver: $out"
  grep -q '"gitVersion"' <<< "$out" || fail "$p -> apiserver: $out"
  echo "$p -> https://\$KUBERNETES_SERVICE_HOST/version: $(grep -o '"gitVersion": *"[^"]*"' <<< "$out")"
done
timing "pods -> apiserver via ClusterIP"

# 4. apiserver -> pod IP (pod proxy: the apiserver dials the pod IP through the host route)
for p in smoke-1 smoke-2; do
  out=$(k get --raw "/api/v1/namespaces/$NS/pods/$p:8080/proxy/") || fail "apiserver -> $p"
  [[ $out == hello-from-$p ]] || fail "apiserver -> $p: $out"
  echo "apiserver -> $p ($(k -n "$NS" get pod "$p" -o jsonpath='{.status.podIP}'):8080): $out"
done
timing "apiserver -> pod IPs"

# 5. checkpoint on node 1, restore on node 2
cat << EOF2 | k apply -f - > /dev/null
apiVersion: v1
kind: ServiceAccount
metadata: {name: checkpointer, namespace: $NS}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: nobody, namespace: $NS}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: km-smoke-node-checkpointer}
rules: [{apiGroups: [""], resources: ["nodes/checkpoint"], verbs: ["create"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: km-smoke-node-checkpointer}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: km-smoke-node-checkpointer}
subjects: [{kind: ServiceAccount, name: checkpointer, namespace: $NS}]
EOF2
url="https://$ip1:10250/checkpoint/$NS/smoke-1/counter"
curl_kubelet() { curl -sS --max-time 60 --cacert "$KM_CLUSTER_DIR/pki/ca.crt" -X POST -H "Authorization: Bearer $1" "$url"; }
out=$(curl_kubelet "$(k -n "$NS" create token nobody --duration=10m)")
grep -q Forbidden <<< "$out" || fail "a token without nodes/checkpoint was not refused: $out"
echo "without nodes/checkpoint: $out"
token=$(k -n "$NS" create token checkpointer --duration=10m)
# RBAC changes reach the authorizer's cache within a moment.
wait_until 10 "checkpoint permission" bash -c "! curl -sS --cacert '$KM_CLUSTER_DIR/pki/ca.crt' -X POST -H 'Authorization: Bearer $token' -o /dev/null -w '%{http_code}' '$url?timeout=1' | grep -q 403" || true
LAST=$(ms)
out=$(curl_kubelet "$token") || fail "checkpoint call: $out"
archive=$(sed -n 's/.*"items":\["\([^"]*\)".*/\1/p' <<< "$out")
[[ $archive == /var/lib/kubelet/checkpoints/* ]] || fail "checkpoint answer: $out"
timing "kubelet checkpoint API on $N1"
host_archive=$(node_dir 1)/kubelet/${archive#/var/lib/kubelet/}
last_source=$(k -n "$NS" logs smoke-1 -c counter | tail -n 1)
echo "archive $archive ($(stat -c %s "$host_archive") bytes): $(tar tf "$host_archive" | grep -v '^checkpoint/.' | tr '\n' ' ')"

img=$KM_NODES_DIR/images/smoke-checkpoint.oci.tar
"$here/images/oci-archive.py" --out "$img" --ref localhost/kube-migrate/smoke-checkpoint:latest \
  --layer-tar "$host_archive" --annotation io.kubernetes.cri-o.annotations.checkpoint.name=counter > /dev/null
timing "checkpoint image (OCI archive)"
"$here/load-image.sh" "$img" localhost/kube-migrate/smoke-checkpoint:latest 2 2> /dev/null
timing "loaded into $N2's storage"
cat << EOF2 | k apply -f - > /dev/null
apiVersion: v1
kind: Pod
metadata: {name: smoke-restored, namespace: $NS}
spec:
  nodeName: $N2
  terminationGracePeriodSeconds: 1
  containers:
  - name: counter
    image: localhost/kube-migrate/smoke-checkpoint:latest
    imagePullPolicy: Never
EOF2
wait_until 60 "smoke-restored Running" running smoke-restored ||
  fail "restored pod not Running: $(k -n "$NS" describe pod smoke-restored | tail -n 8)"
timing "restored pod Running on $N2"
sleep 3
logs=$(k -n "$NS" logs smoke-restored)
echo "restored log (the first lines are the checkpointed log, copied by CRI-O): $(head -n 2 <<< "$logs" | tr '\n' ' ')... $(tail -n 3 <<< "$logs" | tr '\n' ' ')"
echo "source's last line when checkpointed (read just after the call): $last_source"
gaps=$(awk 'NR > 1 && $1 != prev + 1 { print prev " -> " $1 } { prev = $1 }' <<< "$logs")
[[ -z $gaps ]] || fail "restored counter is not continuous: $gaps"
(($(tail -n 1 <<< "$logs") > $(head -n 1 <<< "$logs") + 3)) || fail "restored counter does not advance"
(($(tail -n 1 <<< "$logs") >= last_source)) || fail "restored counter restarted"
restarts=$(k -n "$NS" get pod smoke-restored -o jsonpath='{.status.containerStatuses[0].restartCount}')
[[ $restarts == 0 ]] || fail "restored container restarted $restarts times"

# 6. pull through TLS on the node's loopback
reg=$KM_NODES_DIR/smoke-registry; mkdir -p "$reg"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$reg/ca.key" \
  -out "$reg/ca.crt" -days 1 -subj /CN=km-smoke-registry-ca 2> /dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$reg/tls.key" \
  -out "$reg/tls.csr" -subj /CN=127.0.0.1 2> /dev/null
openssl x509 -req -in "$reg/tls.csr" -CA "$reg/ca.crt" -CAkey "$reg/ca.key" -CAcreateserial -days 1 \
  -extfile <(echo "subjectAltName = IP:127.0.0.1") -out "$reg/tls.crt" 2> /dev/null
certs=$(node_dir 2)/etc/containers/certs.d/127.0.0.1:5444
mkdir -p "$certs"; cp "$reg/ca.crt" "$certs/ca.crt"
setsid ip netns exec "$N2" python3 "$here/images/registry.py" --listen 127.0.0.1:5444 --cert "$reg/tls.crt" \
  --key "$reg/tls.key" --archive "$img" --name kube-migrate/smoke-checkpoint --tag counter \
  > "$reg/registry.log" 2>&1 < /dev/null &
reg_pid=$!
trap 'kill "$reg_pid" 2> /dev/null || true; rm -rf "$certs"' EXIT
wait_until 10 "registry in $N2" grep -q serving "$reg/registry.log" || fail "registry: $(cat "$reg/registry.log")"
LAST=$(ms)
cat << EOF2 | k apply -f - > /dev/null
apiVersion: v1
kind: Pod
metadata: {name: smoke-pulled, namespace: $NS}
spec:
  nodeName: $N2
  terminationGracePeriodSeconds: 1
  containers:
  - name: counter
    image: 127.0.0.1:5444/kube-migrate/smoke-checkpoint:counter
    imagePullPolicy: Always
EOF2
wait_until 60 "smoke-pulled Running" running smoke-pulled ||
  fail "pulled checkpoint pod not Running: $(k -n "$NS" describe pod smoke-pulled | tail -n 8)"
timing "pulled over TLS from $N2's 127.0.0.1 + restored"
sleep 2
logs=$(k -n "$NS" logs smoke-pulled)
gaps=$(awk 'NR > 1 && $1 != prev + 1 { print prev " -> " $1 } { prev = $1 }' <<< "$logs")
[[ -z $gaps ]] || fail "pulled+restored counter is not continuous: $gaps"
echo "pulled from https://127.0.0.1:5444 in $N2 and restored: $(tail -n 2 <<< "$logs" | tr '\n' ' ')($(grep -c 'GET /v2/kube-migrate' "$reg/registry.log") registry GETs)"

# 7. the agent's view: hostNetwork, hostPaths, node loopback
cat << EOF2 | k apply -f - > /dev/null
apiVersion: v1
kind: Pod
metadata: {name: smoke-agentlike, namespace: $NS}
spec:
  nodeName: $N1
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
  - name: probe
    image: localhost/kube-migrate/busybox:latest
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "ls /var/lib/kubelet/checkpoints; echo probe > /var/lib/kube-migrate/smoke-probe; wget -q -O- http://127.0.0.1:10248/healthz; echo; sleep 3600"]
    volumeMounts:
    - {name: checkpoints, mountPath: /var/lib/kubelet/checkpoints}
    - {name: state, mountPath: /var/lib/kube-migrate}
  volumes:
  - {name: checkpoints, hostPath: {path: /var/lib/kubelet/checkpoints, type: DirectoryOrCreate}}
  - {name: state, hostPath: {path: /var/lib/kube-migrate, type: DirectoryOrCreate}}
EOF2
wait_until 60 "smoke-agentlike Running" running smoke-agentlike || fail "agent-like pod not Running"
wait_until 10 "agent-like output" bash -c "kubectl -n $NS logs smoke-agentlike | grep -q '^ok\$'" ||
  fail "agent-like pod: $(k -n "$NS" logs smoke-agentlike)"
out=$(k -n "$NS" logs smoke-agentlike)
grep -qxF "${archive##*/}" <<< "$out" || fail "the hostPath /var/lib/kubelet/checkpoints does not show ${archive##*/}: $out"
[[ $(cat "$(node_dir 1)/kube-migrate/smoke-probe" 2> /dev/null) == probe ]] || fail "hostPath /var/lib/kube-migrate is not $(node_dir 1)/kube-migrate"
rm -f "$(node_dir 1)/kube-migrate/smoke-probe"
echo "hostNetwork pod on $N1: sees ${archive##*/}, writes $(node_dir 1)/kube-migrate, 127.0.0.1:10248/healthz = ok"
timing "agent-like hostNetwork pod"

k -n "$NS" get pods -o wide
printf '[smoke] %-52s %6d ms\n' "total" $(($(ms) - T0)) >&2
k delete namespace "$NS" --wait=false > /dev/null
k delete clusterrole,clusterrolebinding km-smoke-node-checkpointer > /dev/null
echo "PASS: 2 real nodes; pods, logs/exec, ClusterIP -> apiserver, apiserver -> pods, checkpoint on $N1 restored on $N2 continuing the count (loaded, and pulled over TLS from the node's loopback); agent hostPaths and loopback"
