#!/usr/bin/env bash
# make-build-root.sh — build (once) a Debian forky root that compiles kube-migrate for linux amd64
# and arm64 from Debian's own packages, and print its path.
#
#   scripts/make-build-root.sh     # prints e.g. /root/.cache/kube-migrate/build-root-forky-1c9e0a4b7d21
#
# Why a root: cross-compiling needs the Rust standard library of the other architecture, which
# rustup would download as a prebuilt binary. Debian ships it as a package (libstd-rust-dev:arm64,
# the same version as its rustc), next to a cross gcc, a libc for static linking and qemu-user to
# run what was built. forky (testing) because bookworm's rustc is older than the crate's
# rust-version. Used by scripts/release.sh.
#
# Cached by a key over the recipe in ${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}; built in a
# temporary directory and renamed into place when complete, under a lock, like criu/make-root.sh.
set -euo pipefail

SUITE=forky
PACKAGES=rustc,cargo,libstd-rust-dev,gcc,libc6-dev,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross,qemu-user,ca-certificates,file
FOREIGN="libstd-rust-dev:arm64"
RECIPE_VERSION=1
KEY=$(printf '%s\n' "$SUITE" "$PACKAGES" "$FOREIGN" "$RECIPE_VERSION" "$(uname -m)" | sha256sum | cut -c1-12)
CACHE=${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}
ROOT=$CACHE/build-root-$SUITE-$KEY

log() { printf 'make-build-root: %s\n' "$*" >&2; }

if [[ -f $ROOT/.kube-migrate-root-ok ]]; then
    printf '%s\n' "$ROOT"
    exit 0
fi
[[ $(uname -m) == x86_64 ]] || { log "builds on x86_64 only (found $(uname -m))"; exit 1; }
[[ $(id -u) == 0 ]] || { log "must run as root (debootstrap, chroot)"; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.build-root-$SUITE.lock"
flock 9
if [[ -f $ROOT/.kube-migrate-root-ok ]]; then
    printf '%s\n' "$ROOT"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap from Debian's archive"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2; }
fi
# Older debootstraps know no "forky": testing's script is sid's.
script=/usr/share/debootstrap/scripts/$SUITE
[[ -e $script ]] || script=/usr/share/debootstrap/scripts/sid

MIRROR=$("$(dirname "$0")/debian-mirror.sh")
TMP=$(mktemp -d "$CACHE/.build-root-$SUITE-$KEY.tmp.XXXXXX")
cleanup() { if [[ -n ${TMP:-} && -d $TMP ]]; then rm -rf --one-file-system "$TMP" "$TMP.log"; fi; }
trap cleanup EXIT
log "building $ROOT from $MIRROR (suite $SUITE: $PACKAGES + $FOREIGN); this takes a few minutes"
start=$(date +%s)
fail() {
    log "$1 failed; last lines of $TMP.log:"
    tail -n 30 "$TMP.log" >&2
    exit 1
}
unshare -m --propagation private \
    debootstrap --variant=minbase --include="$PACKAGES" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$TMP" "$MIRROR" "$script" >"$TMP.log" 2>&1 || fail debootstrap

# The arm64 standard library: a foreign-architecture package of the same version as rustc.
# Check-Valid-Until=false: a testing Release file may be older than its validity window says
# (criu/make-root.sh met it with forky); the signatures are still checked.
cp /etc/resolv.conf "$TMP/etc/resolv.conf"
# shellcheck disable=SC2016 # for the inner shell
unshare -m --propagation private /bin/sh -euc 'mount -t proc proc "$1/proc"; r=$1; shift
    chroot "$r" dpkg --add-architecture arm64
    chroot "$r" apt-get -o Acquire::Check-Valid-Until=false update
    chroot "$r" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"' \
    foreign "$TMP" $FOREIGN >"$TMP.log" 2>&1 || fail "installing $FOREIGN"
rm -f "$TMP"/var/cache/apt/archives/*.deb
rm -rf "$TMP"/var/lib/apt/lists/*
mkdir -p "$TMP"/src "$TMP"/cache

# shellcheck disable=SC2016 # dpkg-query fields, not shell
chroot "$TMP" dpkg-query -W -f '${Package}:${Architecture} ${Version}\n' \
    rustc cargo libstd-rust-dev:amd64 libstd-rust-dev:arm64 gcc-aarch64-linux-gnu qemu-user \
    >"$TMP/.kube-migrate-versions"
log "versions: $(tr '\n' ' ' <"$TMP/.kube-migrate-versions")"
touch "$TMP/.kube-migrate-root-ok"
rm -f "$TMP.log"
mv "$TMP" "$ROOT"
TMP=
log "built in $(($(date +%s) - start)) s"
printf '%s\n' "$ROOT"
