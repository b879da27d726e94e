#!/usr/bin/env bash
# Builds the binaries of the local test control plane from source, through the
# Go module proxy only (no prebuilt downloads):
#   kube-apiserver, kube-controller-manager, kube-scheduler  from k8s.io/kubernetes
#   etcd                                                     from go.etcd.io/etcd/server/v3
# The versions are pinned by the build-only modules cluster/gomod/kubernetes and
# cluster/gomod/etcd (go.mod + go.sum); this script reads them from there.
#
# Binaries go to a cache outside the work tree, one directory per version:
#   ${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}/bin/k8s-<version>/
#   ${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}/bin/etcd-<version>/
# When they are already there and answer --version, nothing is built.
#
# Usage: build-control-plane.sh [--force] [--print-bindir | --print-env]
#   (no option)     build what is missing, then print the bin dirs
#   --force         rebuild even if the cached binaries look fine
#   --print-bindir  print "<k8s bin dir>:<etcd bin dir>" (a PATH prefix), build nothing
#   --print-env     print KUBE_MIGRATE_K8S_BIN_DIR=... / KUBE_MIGRATE_ETCD_BIN_DIR=...
#                   lines for eval, build nothing
# Env: KUBE_MIGRATE_CACHE (cache root), GO (go command; default: go on PATH,
#      else /usr/local/go/bin/go).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_mod="$here/gomod/kubernetes"
etcd_mod="$here/gomod/etcd"

# Version of a required module, read from a go.mod without running go (fast path).
required_version() { # <go.mod> <module path>
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) && $0 !~ /=>/ { print ($1 == m ? $2 : $3); exit }' "$1"
}
K8S_VERSION=$(required_version "$k8s_mod/go.mod" k8s.io/kubernetes)
ETCD_VERSION=$(required_version "$etcd_mod/go.mod" go.etcd.io/etcd/server/v3)
[[ -n $K8S_VERSION && -n $ETCD_VERSION ]] || { echo "cannot read pinned versions from $here/gomod/*/go.mod" >&2; exit 1; }

cache="${KUBE_MIGRATE_CACHE:-${HOME:?HOME is unset}/.cache/kube-migrate}"
K8S_BIN_DIR="$cache/bin/k8s-$K8S_VERSION"
ETCD_BIN_DIR="$cache/bin/etcd-$ETCD_VERSION"
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler)

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  --print-bindir) echo "$K8S_BIN_DIR:$ETCD_BIN_DIR"; exit 0 ;;
  --print-env)
    printf 'KUBE_MIGRATE_K8S_BIN_DIR=%q\nKUBE_MIGRATE_ETCD_BIN_DIR=%q\n' "$K8S_BIN_DIR" "$ETCD_BIN_DIR"
    exit 0 ;;
  -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
esac

log() { echo "[build-control-plane] $*" >&2; }

# True when <dir>/<cmd> exists and `<cmd> --version` shows <version> (with or
# without its "v"; "Kubernetes v1.33.13", "etcd Version: 3.5.35").
binary_ok() { # <dir> <cmd> <version>
  local out v
  [[ -x "$1/$2" ]] || return 1
  out=$("$1/$2" --version 2>&1) || return 1
  v=${3#v}; v=${v//./\\.}
  [[ $out =~ (^|[^0-9.])$v($|[^0-9.]) ]]
}

k8s_ok() {
  local c
  for c in "${K8S_CMDS[@]}"; do binary_ok "$K8S_BIN_DIR" "$c" "$K8S_VERSION" || return 1; done
}
etcd_ok() { binary_ok "$ETCD_BIN_DIR" etcd "$ETCD_VERSION"; }

need_k8s=1 need_etcd=1
if (( ! force )); then
  k8s_ok && need_k8s=0
  etcd_ok && need_etcd=0
fi

if (( need_k8s || need_etcd )); then
  # One build at a time per cache (e.g. parallel CI jobs); whoever waited
  # re-checks, as the other may just have built what is needed.
  mkdir -p "$cache/bin"
  exec 9> "$cache/bin/.build.lock"
  if ! flock -n 9; then
    log "another build holds $cache/bin/.build.lock; waiting for it"
    flock 9
    k8s_ok && need_k8s=0
    etcd_ok && need_etcd=0
  fi
fi

if (( need_k8s || need_etcd )); then
  GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
  [[ -x $GO ]] || { log "no go toolchain found (set GO=/path/to/go)"; exit 1; }
  # Never let the go command fetch another toolchain: only the module proxy is
  # reachable, and the pinned modules build with the local go (>= 1.26, which
  # etcd 3.5.35's go.mod asks for).
  export GOTOOLCHAIN=local
  # Static binaries, like the official kubernetes and etcd release builds.
  export CGO_ENABLED=0
  log "using $("$GO" version) ($(nproc) CPUs); module cache $("$GO" env GOMODCACHE)"
fi

# Builds into a temporary sibling directory and renames it into place at the
# end, so an interrupted build never leaves a half-filled cache directory
# that would later pass for a finished one. go.sum is committed and the go
# command's default -mod=readonly keeps the pins from changing silently.
build_into() { # <final dir> <module dir> <-o target inside it, "" = the dir> <go build args...>
  local final=$1 mod=$2 out=$3; shift 3
  local tmp="$final.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  # shellcheck disable=SC2064 # expand $tmp now: it is local to this function
  trap "rm -rf '$tmp'" EXIT
  (cd "$mod" && "$GO" build -trimpath -o "$tmp/$out" "$@")
  {
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) by cluster/build-control-plane.sh"
    echo "go: $("$GO" version)"
    echo "module: $mod"
    echo "args: $*"
  } > "$tmp/BUILDINFO"
  rm -rf "$final"
  mv "$tmp" "$final"
  trap - EXIT
}

if (( need_k8s )); then
  log "building kubernetes $K8S_VERSION: ${K8S_CMDS[*]} -> $K8S_BIN_DIR (takes a while on a cold cache)"
  start=$SECONDS
  # Version stamping as kubernetes' hack/lib/version.sh does it, so that
  # --version, /version and kubectl's skew check see the real version instead
  # of v0.0.0-master. buildDate is the module's publication time, keeping the
  # build reproducible. The git commit is not known from the module proxy.
  build_date=$(cd "$k8s_mod" && "$GO" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.buildDate=$build_date"
  done
  pkgs=()
  for c in "${K8S_CMDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  # Tags as in kubernetes' hack/lib/golang.sh (notest drops test-only code).
  build_into "$K8S_BIN_DIR" "$k8s_mod" "" -tags=selinux,notest -ldflags="$ldflags" "${pkgs[@]}"
  k8s_ok || { log "built kubernetes binaries do not report $K8S_VERSION"; exit 1; }
  log "kubernetes $K8S_VERSION built in $((SECONDS - start))s"
else
  log "kubernetes $K8S_VERSION already built in $K8S_BIN_DIR"
fi

if (( need_etcd )); then
  log "building etcd $ETCD_VERSION -> $ETCD_BIN_DIR"
  start=$SECONDS
  # The package go.etcd.io/etcd/server/v3 is etcd's main; it must be given an
  # explicit output name, or go would call the binary "v3".
  build_into "$ETCD_BIN_DIR" "$etcd_mod" etcd -ldflags="-s -w" go.etcd.io/etcd/server/v3
  etcd_ok || { log "built etcd does not report $ETCD_VERSION"; exit 1; }
  log "etcd $ETCD_VERSION built in $((SECONDS - start))s"
else
  log "etcd $ETCD_VERSION already built in $ETCD_BIN_DIR"
fi

log "bin dirs: $K8S_BIN_DIR:$ETCD_BIN_DIR (also printed by --print-bindir / --print-env)"
echo "$K8S_BIN_DIR:$ETCD_BIN_DIR"
