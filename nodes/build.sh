#!/usr/bin/env bash
# Builds the node binaries of the real-node harness from source, through the Go module proxy only:
#   kubelet, kube-proxy  from k8s.io/kubernetes, pinned by cluster/gomod/kubernetes (the same module
#                        and version as the control plane)  -> <cache>/bin/k8s-node-<version>/
#   crio, pinns          from github.com/cri-o/cri-o@$CRIO_VERSION   -> <cache>/bin/crio-<version>/
# Sibling directories of the control plane's bin/k8s-<version>/, which is left alone (its build
# script replaces that directory as a whole).
#
# Each directory is filled in a temporary sibling and renamed into place, under the same lock as
# cluster/build-control-plane.sh; when both are cached this is a no-op well under a second.
#
# Usage: nodes/build.sh [--force] [--print-env]
#   --print-env   print KUBE_MIGRATE_NODE_BIN_DIR=... / KUBE_MIGRATE_CRIO_BIN_DIR=... and build nothing
# Env: KUBE_MIGRATE_CACHE (cache root, default ~/.cache/kube-migrate), GO (go command),
#      CRIO_VERSION (default v1.34.0: the only cri-o version the module proxy serves here).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_mod="$here/../cluster/gomod/kubernetes"
K8S_VERSION=$(awk '($1 == "require" && $2 == "k8s.io/kubernetes") { print $3; exit }' "$k8s_mod/go.mod")
[[ -n $K8S_VERSION ]] || { echo "cannot read the k8s.io/kubernetes version from $k8s_mod/go.mod" >&2; exit 1; }
CRIO_VERSION=${CRIO_VERSION:-v1.34.0}
cache="${KUBE_MIGRATE_CACHE:-${HOME:?HOME is unset}/.cache/kube-migrate}"
NODE_BIN_DIR="$cache/bin/k8s-node-$K8S_VERSION"
CRIO_BIN_DIR="$cache/bin/crio-$CRIO_VERSION"

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  --print-env) printf 'KUBE_MIGRATE_NODE_BIN_DIR=%q\nKUBE_MIGRATE_CRIO_BIN_DIR=%q\n' "$NODE_BIN_DIR" "$CRIO_BIN_DIR"; exit 0 ;;
  -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
esac

log() { echo "[nodes/build] $*" >&2; }

# "<cmd> --version" must name the pinned version (kubelet: "Kubernetes v1.33.13";
# crio: "Version:        1.34.0"); pinns has no version flag, its presence is enough.
version_ok() { # <binary> <version>
  local out v=${2#v}
  [[ -x $1 ]] || return 1
  out=$("$1" --version 2>&1) || return 1
  [[ $out =~ (^|[^0-9.])v?${v//./\\.}($|[^0-9.]) ]]
}
node_ok() { version_ok "$NODE_BIN_DIR/kubelet" "$K8S_VERSION" && version_ok "$NODE_BIN_DIR/kube-proxy" "$K8S_VERSION"; }
crio_ok() { version_ok "$CRIO_BIN_DIR/crio" "$CRIO_VERSION" && [[ -x $CRIO_BIN_DIR/pinns ]]; }

need_node=1 need_crio=1
if (( ! force )); then node_ok && need_node=0; crio_ok && need_crio=0; fi
if (( ! need_node && ! need_crio )); then echo "$NODE_BIN_DIR:$CRIO_BIN_DIR"; exit 0; fi

# Same lock as the control plane build: one heavy build at a time per cache.
mkdir -p "$cache/bin"
exec 9> "$cache/bin/.build.lock"
if ! flock -n 9; then log "waiting for another build ($cache/bin/.build.lock)"; flock 9; node_ok && need_node=0; crio_ok && need_crio=0; fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $GO ]] || { log "no go toolchain found (set GO=/path/to/go)"; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0
tmp=
cleanup() { if [[ -n $tmp && -d $tmp ]]; then chmod -R u+w "$tmp"; rm -rf "$tmp"; fi; }
trap cleanup EXIT
install_dir() { # <tmp dir> <final dir>: atomic replacement
  rm -rf "$2.old"; [[ ! -e $2 ]] || mv "$2" "$2.old"
  mv "$1" "$2"; rm -rf "$2.old"; tmp=
}

if (( need_node )); then
  log "building kubelet, kube-proxy $K8S_VERSION -> $NODE_BIN_DIR"
  start=$SECONDS
  tmp="$NODE_BIN_DIR.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  # Version stamping exactly as cluster/build-control-plane.sh does it.
  build_date=$(cd "$k8s_mod" && "$GO" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.buildDate=$build_date"
  done
  (cd "$k8s_mod" && nice -n 10 "$GO" build -trimpath -o "$tmp/" -tags=selinux,notest -ldflags="$ldflags" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  printf 'built %s by nodes/build.sh\ngo: %s\nmodule: %s\n' "$(date -u +%FT%TZ)" "$("$GO" version)" "$k8s_mod" > "$tmp/BUILDINFO"
  install_dir "$tmp" "$NODE_BIN_DIR"
  node_ok || { log "built kubelet/kube-proxy do not report $K8S_VERSION"; exit 1; }
  log "kubelet, kube-proxy built in $((SECONDS - start))s"
fi

if (( need_crio )); then
  log "building crio, pinns $CRIO_VERSION -> $CRIO_BIN_DIR"
  start=$SECONDS
  tmp="$CRIO_BIN_DIR.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  src=$(cd "$tmp" && GOFLAGS=-mod=mod "$GO" mod download -json "github.com/cri-o/cri-o@$CRIO_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d $src ]] || { log "go mod download of cri-o $CRIO_VERSION gave no source dir"; exit 1; }
  # The module cache is read-only: work on a copy (pinns' make writes next to its sources).
  cp -r "$src" "$tmp/src"; chmod -R u+w "$tmp/src"
  # No cgo: no seccomp, gpgme, btrfs or devicemapper (tags as CRI-O's own static builds, minus
  # seccomp); the version string comes from internal/version, set like CRI-O's Makefile does.
  (cd "$tmp/src" && nice -n 10 "$GO" build -trimpath -o "$tmp/crio" \
    -tags "containers_image_openpgp containers_image_ostree_stub exclude_graphdriver_btrfs exclude_graphdriver_devicemapper btrfs_noversion" \
    -ldflags "-s -w -X github.com/cri-o/cri-o/internal/version.buildDate=$(date -u +%FT%TZ)" ./cmd/crio)
  # pinns (C): static, so it runs the same on the host and in the trixie root.
  make -s -C "$tmp/src/pinns" CFLAGS="-std=c99 -Os -Wall -Werror -Wextra -static" >/dev/null
  cp "$tmp/src/bin/pinns" "$tmp/pinns"
  rm -rf "$tmp/src"
  printf 'built %s by nodes/build.sh\ngo: %s\nmodule: github.com/cri-o/cri-o@%s\n' "$(date -u +%FT%TZ)" "$("$GO" version)" "$CRIO_VERSION" > "$tmp/BUILDINFO"
  install_dir "$tmp" "$CRIO_BIN_DIR"
  crio_ok || { log "built crio does not report $CRIO_VERSION"; exit 1; }
  log "crio, pinns built in $((SECONDS - start))s"
fi
echo "$NODE_BIN_DIR:$CRIO_BIN_DIR"
