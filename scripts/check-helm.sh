#!/usr/bin/env bash
# Checks the Helm chart charts/kube-migrate against the kustomize manifests (README "Install
# with Helm", docs/design-notes.md "Helm chart"); a step of scripts/test.sh.
#   1. the chart's copies are their sources, byte for byte: crds/ is manifests/crd.yaml (itself
#      checked against crdgen), files/kube-migrate.rules.yaml is deploy/monitoring's; Chart.yaml's
#      version and appVersion are the crate version of Cargo.toml
#   2. helm lint (default values; cert-manager, ServiceMonitor and PrometheusRule on)
#   3. helm template: default values, and cert-manager + monitoring + every optional value set
#   4. drift: the default render (CRDs included) equals `kubectl kustomize manifests`, and with
#      the overlay's images it equals `kubectl kustomize overlays/images`, resource by resource,
#      modulo the documented differences (scripts/chart_drift.py); the PrometheusRule's spec
#      equals deploy/monitoring/prometheusrule.yaml's; cert-manager mode has the Certificates,
#      the inject-ca-from annotations and no caBundle
#   5. the drift check can fail: a chart whose default differs from manifests/ must be caught
#   6. with --live: scripts/helm-live.sh, the chart installed, upgraded and uninstalled on a
#      local control plane (in scripts/test.sh it runs beside the end-to-end scenarios)
#
# helm: the one on PATH if it is $HELM_VERSION; else Debian's `helm` package if apt has one;
# else built from the Go module proxy (helm.sh/helm/v3/cmd/helm@$HELM_VERSION), cached under
# ${KUBE_MIGRATE_CACHE:-~/.cache/kube-migrate}/bin/helm-<version>/. Nothing prebuilt is downloaded.
# --sync copies manifests/crd.yaml, the rules file and the crate version into the chart.
# Env: HELM (use this binary), HELM_FROM_SOURCE=1 (ignore PATH and apt), KUBE_MIGRATE_CACHE, GO.
set -euo pipefail
cd "$(dirname "$0")/.."

# 3.18 is built against Kubernetes 1.33's client libraries, the version the local cluster runs.
HELM_VERSION=v3.18.6
# Its Makefile derives Capabilities.KubeVersion (what `helm template` assumes) from client-go.
HELM_K8S_MINOR=33
chart=charts/kube-migrate
cache="${KUBE_MIGRATE_CACHE:-${HOME:?HOME is unset}/.cache/kube-migrate}"
built="$cache/bin/helm-$HELM_VERSION/helm"
live=0 print_helm=0
case ${1:-} in
  --sync) # copy the sources into the chart (after crdgen, a rules edit or a version bump)
    crate=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
    cp manifests/crd.yaml charts/kube-migrate/crds/podmigrations.migrate.io.yaml
    cp deploy/monitoring/kube-migrate.rules.yaml charts/kube-migrate/files/kube-migrate.rules.yaml
    sed -i "s/^version: .*/version: $crate/; s/^appVersion: .*/appVersion: \"$crate\"/" charts/kube-migrate/Chart.yaml
    echo "charts/kube-migrate: crds/, files/ and version $crate synced"; exit 0 ;;
  --live) live=1 ;;
  --print-helm) print_helm=1 ;; # find (or build) helm, print its path, nothing else
  "") ;;
  *) echo "usage: $0 [--live|--print-helm|--sync]" >&2; exit 2 ;;
esac

log() { printf '[check-helm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

right_version() { # helm binary
  [[ -x $1 ]] && [[ $("$1" version --template '{{.Version}}' 2>/dev/null) == "$HELM_VERSION" ]]
}

apt_helm() {
  # Debian has no helm package today (bookworm, trixie); take one if it ever appears.
  if apt-cache show helm 2>/dev/null | grep -q '^Homepage: .*helm.sh'; then
    log "installing helm from Debian's archive"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends helm >&2 || log "apt could not install helm"
  fi
}

build_helm() {
  local go=${GO:-$(command -v go || echo /usr/local/go/bin/go)} tmp
  log "building helm $HELM_VERSION from the Go module proxy -> $built (a minute or two, once)"
  [[ -x $go ]] || die "no go toolchain found (set GO=/path/to/go)"
  mkdir -p "$cache/bin"
  tmp=$(mktemp -d "$cache/bin/helm-$HELM_VERSION.tmp.XXXXXX")
  chmod 755 "$tmp"
  # shellcheck disable=SC2064 # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-buildvcs=false "$go" install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION
      -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR
      -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
  rm -rf "${built%/helm}"
  mv "$tmp" "${built%/helm}"
  trap - EXIT
}

find_helm() {
  if [[ -n ${HELM:-} ]]; then
    right_version "$HELM" || die "HELM=$HELM is not helm $HELM_VERSION"
    echo "$HELM"; return
  fi
  local from_source=${HELM_FROM_SOURCE:-0} path_tool
  path_tool=$(command -v helm || true)
  if ((!from_source)) && [[ -n $path_tool ]] && right_version "$path_tool"; then echo "$path_tool"; return; fi
  if right_version "$built"; then echo "$built"; return; fi
  if ((!from_source)) && [[ -z $path_tool ]]; then
    apt_helm
    path_tool=$(command -v helm || true)
    if [[ -n $path_tool ]] && right_version "$path_tool"; then echo "$path_tool"; return; fi
  fi
  build_helm
  right_version "$built" || die "$built does not say it is $HELM_VERSION"
  echo "$built"
}

HELM=$(find_helm)
if ((print_helm)); then echo "$HELM"; exit 0; fi
log "helm: $HELM ($("$HELM" version --short))"
if ! python3 -c 'import yaml' 2>/dev/null; then
  log "installing python3-yaml (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-yaml >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-yaml >&2; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ns=kube-migrate
render() { "$HELM" template kube-migrate "$chart" --namespace "$ns" "$@"; }

log "1. the chart's copies and version"
cmp manifests/crd.yaml "$chart/crds/podmigrations.migrate.io.yaml" ||
  die "$chart/crds/ is stale: run scripts/check-helm.sh --sync"
cmp deploy/monitoring/kube-migrate.rules.yaml "$chart/files/kube-migrate.rules.yaml" ||
  die "$chart/files/ is stale: run scripts/check-helm.sh --sync"
crate=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[[ -n $crate ]] || die "no version in Cargo.toml's [workspace.package]"
grep -qx "version: $crate" "$chart/Chart.yaml" || die "$chart/Chart.yaml: version is not the crate version $crate (--sync)"
grep -qx "appVersion: \"$crate\"" "$chart/Chart.yaml" || die "$chart/Chart.yaml: appVersion is not \"$crate\" (--sync)"
echo "ok: crds/ and files/ are their sources; chart version $crate"

log "2. helm lint"
all_on=(--set tls.source=cert-manager --set monitoring.serviceMonitor.enabled=true
  --set monitoring.prometheusRule.enabled=true --set networkPolicy.enabled=true
  --set webhook.clientAuth.caSecret=apiserver-client-ca --set 'webhook.clientAuth.names={kube-apiserver-webhook-client}')
"$HELM" lint --strict "$chart"
"$HELM" lint --strict "$chart" "${all_on[@]}"

log "3. helm template"
render --include-crds > "$work/default.yaml"
kubectl kustomize manifests > "$work/kustomize.yaml"
# Every optional value set, so each template branch renders and the drift check sees its result.
render --include-crds "${all_on[@]}" \
  --set controller.limits.maxPerNode=3 --set controller.limits.maxTotal=20 \
  --set controller.deadlines.pendingSeconds=600 --set controller.deadlines.checkpointSeconds=120 \
  --set controller.deadlines.transferSeconds=1800 --set controller.deadlines.imageSeconds=200 \
  --set controller.deadlines.restoringSeconds=100 --set controller.deadlines.restoreSeconds=900 \
  --set controller.checkpointTimeoutSeconds=200 --set controller.sourceGracePeriodSeconds=2 \
  --set controller.freezeSource=false --set webhook.shutdownDelaySeconds=7 --set webhook.replicas=3 \
  --set agent.retentionSeconds=3600 --set agent.transferTimeoutSeconds=600 --set agent.kubeletInsecureTLS=true \
  --set 'webhooks.excludedNamespaces={kube-system,monitoring}' \
  --set 'webhooks.matchExpressions[0].key=team' --set 'webhooks.matchExpressions[0].operator=In' \
  --set 'webhooks.matchExpressions[0].values={db}' \
  --set webhooks.eviction.failurePolicy=Ignore --set 'imagePullSecrets[0].name=regcred' \
  --set monitoring.serviceMonitor.labels.release=kps > "$work/all.yaml"
for f in default all; do
  echo "$f: $(grep -c '^kind: ' "$work/$f.yaml") objects ($(grep '^kind: ' "$work/$f.yaml" | sort | uniq -c | awk '{printf "%s%s %s", s, $1, $3; s=", "}'))"
done

log "4. drift: the chart's default render against kubectl kustomize"
python3 scripts/chart_drift.py manifests "$work/kustomize.yaml" "$work/default.yaml"
# The overlay's images (repository@digest) through the chart's image values.
read -r webhook_repo webhook_digest agent_repo agent_digest < <(python3 -c '
import yaml
k = yaml.safe_load(open("overlays/images/kustomization.yaml"))
i = {x["name"]: x for x in k["images"]}
print(i["kube-migrate-webhook"]["newName"], i["kube-migrate-webhook"]["digest"],
      i["kube-migrate-agent"]["newName"], i["kube-migrate-agent"]["digest"])')
kubectl kustomize overlays/images > "$work/overlay.yaml"
render --include-crds --set webhook.image.repository="$webhook_repo" --set webhook.image.digest="$webhook_digest" \
  --set agent.image.repository="$agent_repo" --set agent.image.digest="$agent_digest" > "$work/overlay-chart.yaml"
python3 scripts/chart_drift.py overlays/images "$work/overlay.yaml" "$work/overlay-chart.yaml"
python3 scripts/chart_drift.py --all-on "$work/all.yaml" deploy/monitoring/prometheusrule.yaml

log "5. the drift check can fail"
sed 's/maxUnavailable: 1 }/maxUnavailable: 2 }/' "$work/default.yaml" > "$work/broken.yaml"
cmp -s "$work/default.yaml" "$work/broken.yaml" && die "self-test: nothing to break in the render"
if python3 scripts/chart_drift.py manifests "$work/kustomize.yaml" "$work/broken.yaml" > "$work/broken.out" 2>&1; then
  die "self-test failed: the drift check accepts a chart whose rollout differs from manifests/"
fi
grep -q '^DRIFT: ' "$work/broken.out" || { cat "$work/broken.out" >&2; die "self-test: expected a DRIFT line"; }
echo "ok: the drift check fails on a changed maxUnavailable ($(grep -c '^DRIFT: ' "$work/broken.out") DRIFT lines)"

((live)) || exit 0
log "6. helm install on a local control plane"
scripts/helm-live.sh "$HELM"
