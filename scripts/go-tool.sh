#!/usr/bin/env bash
# go-tool.sh — build (once) a Go command from the Go module proxy and print its path.
#
#   scripts/go-tool.sh sigs.k8s.io/krew/cmd/krew v0.4.3 ['-X some/pkg.var=value ...']
#
# Cached by version as ${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}/bin/<cmd>-<version>/<cmd>,
# built in a temporary directory and renamed into place, under a lock. Static (CGO off),
# trimmed paths, the local Go toolchain only (GOTOOLCHAIN=local: nothing else is downloaded).
# GO=/path/to/go picks the toolchain.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 MODULE/PATH/CMD VERSION [LDFLAGS]" >&2; exit 2; }
pkg=$1 version=$2 ldflags=${3:-}
name=${pkg##*/}
cache=${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}
dir=$cache/bin/$name-$version
log() { printf '[go-tool] %s\n' "$*" >&2; }

if [[ -x $dir/$name ]]; then echo "$dir/$name"; exit 0; fi
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $go ]] || { log "no go toolchain found (set GO=/path/to/go)"; exit 1; }
mkdir -p "$cache/bin"
exec 9>"$cache/bin/.$name.lock"
flock 9
if [[ -x $dir/$name ]]; then echo "$dir/$name"; exit 0; fi
log "building $pkg@$version from the Go module proxy -> $dir (once)"
tmp=$(mktemp -d "$dir.tmp.XXXXXX")
chmod 755 "$tmp"
# shellcheck disable=SC2064 # expand $tmp now
trap "rm -rf '$tmp'" EXIT
GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-buildvcs=false "$go" install -trimpath \
  -ldflags "-s -w $ldflags" "$pkg@$version" >&2
[[ -x $tmp/$name ]] || { log "go install made no $name"; exit 1; }
mv "$tmp" "$dir"
trap - EXIT
echo "$dir/$name"
