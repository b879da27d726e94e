#!/usr/bin/env bash
# make-root.sh — build (once) a Debian trixie root holding criu 4.x and crun, and print its path.
#
#   criu/make-root.sh            # prints e.g. /root/.cache/kube-migrate/criu-root-trixie-3f2a9c1d7e55
#
# Why: Debian bookworm's criu 3.17 fails its vDSO check on the 6.x kernels of these machines;
# trixie's criu 4.1 and crun 1.21 work. The root is used through criu/enter.sh.
#
# Cached by a key over the recipe (suite, packages, recipe version) in
#   ${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}/criu-root-trixie-<key>
# A second call is a fast no-op. The root is built in a temporary directory next to it and renamed
# into place only when complete, under a lock, so concurrent callers never see a half-built root.
#
# Environment:
#   KUBE_MIGRATE_CACHE          cache directory (default $HOME/.cache/kube-migrate)
#   KUBE_MIGRATE_ROOT_EXTRA_PACKAGES
#                               comma-separated packages added to the list (nodes/make-root.sh: CRI-O's
#                               conmon, CNI plugins, skopeo, ...); part of the cache key, so the plain
#                               CRIU root and a root with extras are separate cached directories
#   KUBE_MIGRATE_ROOT_NEWER     SUITE:PACKAGE,... taken from a newer Debian suite after the
#                               bootstrap (with their dependencies where trixie's are too old), e.g.
#                               nodes/make-root.sh's forky:criu,libcriu2 (CRIU 4.2: 4.1 cannot dump
#                               an inet socket on Linux 6.16+); part of the cache key
#   KUBE_MIGRATE_DEBIAN_MIRROR  Debian mirror (default: the one in this machine's apt sources,
#                               else http://deb.debian.org/debian)
set -euo pipefail

SUITE=trixie
# criu, crun: the point. iptables + iproute2: CRIU's network lock (iptables-restore) and its
# address/route dump (ip) inside the container's network namespace. busybox-static: the
# container images (criu/images.sh copies it). libcriu2: crun loads libcriu.so.2 to checkpoint.
PACKAGES=criu,crun,libcriu2,iptables,iproute2,busybox-static,procps
EXTRA=${KUBE_MIGRATE_ROOT_EXTRA_PACKAGES:-}
[[ $EXTRA =~ ^[a-z0-9.+,-]*$ ]] || { echo "make-root: bad KUBE_MIGRATE_ROOT_EXTRA_PACKAGES: $EXTRA" >&2; exit 2; }
# Without extras the key (and so the cached root) is exactly what it was before extras existed.
PACKAGES+=${EXTRA:+,$EXTRA}
NEWER=${KUBE_MIGRATE_ROOT_NEWER:-}
[[ -z $NEWER || $NEWER =~ ^[a-z]+:[a-z0-9.+-]+(,[a-z0-9.+-]+)*$ ]] || { echo "make-root: bad KUBE_MIGRATE_ROOT_NEWER: $NEWER" >&2; exit 2; }
RECIPE_VERSION=1
# (Without newer packages the key stays what it was before they existed.)
KEY=$(printf '%s\n' "$SUITE" "$PACKAGES" "$RECIPE_VERSION" "$(uname -m)" ${NEWER:+"$NEWER"} | sha256sum | cut -c1-12)

CACHE=${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}
ROOT=$CACHE/criu-root-$SUITE-$KEY

log() { printf 'make-root: %s\n' "$*" >&2; }

# Fast path: already built.
if [[ -f $ROOT/.kube-migrate-root-ok ]]; then
    printf '%s\n' "$ROOT"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    log "must run as root (debootstrap, mounts)"
    exit 1
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.criu-root-$SUITE.lock"
flock 9
# Someone else may have built it while we waited.
if [[ -f $ROOT/.kube-migrate-root-ok ]]; then
    printf '%s\n' "$ROOT"
    exit 0
fi

if ! command -v debootstrap >/dev/null || [[ ! -e /usr/share/debootstrap/scripts/$SUITE ]]; then
    log "installing debootstrap from Debian's archive"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2; }
fi

MIRROR=$("$(dirname "$0")/../scripts/debian-mirror.sh")
TMP=$(mktemp -d "$CACHE/.criu-root-$SUITE-$KEY.tmp.XXXXXX")
# An if, not `[[ ]] &&`: an EXIT trap's last status becomes the script's, and a successful
# build (TMP already moved) must still exit 0.
cleanup() { if [[ -n ${TMP:-} && -d $TMP ]]; then rm -rf --one-file-system "$TMP"; fi; }
trap cleanup EXIT
log "building $ROOT from $MIRROR (suite $SUITE, packages $PACKAGES); this takes a few minutes"
start=$(date +%s)

# A private mount namespace: whatever debootstrap mounts (proc, sys in the target) disappears
# with it and never shows up on the host.
unshare -m --propagation private \
    debootstrap --variant=minbase --include="$PACKAGES" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$TMP" "$MIRROR" >"$TMP.log" 2>&1 || {
    log "debootstrap failed; last lines of $TMP.log:"
    tail -n 30 "$TMP.log" >&2
    exit 1
}

# Packages from a newer suite: apt in the new root, that suite pinned low (nothing else comes from
# it unless a named package needs it), then its lists removed (the root keeps the pin only).
# Check-Valid-Until=false: the mirror's Release file may be older than its validity window says
# for this machine's clock (seen: forky's "is expired (invalid since 22d)"); debootstrap does not
# check it either, and the signatures are still checked.
if [[ -n $NEWER ]]; then
    newer_suite=${NEWER%%:*}
    log "taking ${NEWER#*:} from $newer_suite"
    echo "deb $MIRROR $newer_suite main" >"$TMP/etc/apt/sources.list.d/km-$newer_suite.list"
    printf 'Package: *\nPin: release n=%s\nPin-Priority: 100\n' "$newer_suite" >"$TMP/etc/apt/preferences.d/km-$newer_suite"
    mapfile -t newer_pkgs < <(tr ',' '\n' <<<"${NEWER#*:}" | sed "s|\$|/$newer_suite|")
    # shellcheck disable=SC2016 # for the inner shell
    unshare -m --propagation private /bin/sh -euc 'mount -t proc proc "$1/proc"; r=$1 s=$2; shift 2
        chroot "$r" apt-get -o Acquire::Check-Valid-Until=false update
        chroot "$r" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"' \
        newer "$TMP" "$newer_suite" "${newer_pkgs[@]}" >"$TMP.log" 2>&1 || {
        log "installing ${NEWER#*:} from $newer_suite failed; last lines of $TMP.log:"
        tail -n 30 "$TMP.log" >&2
        exit 1
    }
    rm -f "$TMP/etc/apt/sources.list.d/km-$newer_suite.list"
    rm -rf "$TMP"/var/lib/apt/lists/*
fi

# Trim: downloaded .debs are not needed.
rm -f "$TMP"/var/cache/apt/archives/*.deb
# Mount points enter.sh relies on.
mkdir -p "$TMP"/proc "$TMP"/sys "$TMP"/dev/pts "$TMP"/run "$TMP"/tmp "$TMP"/mnt "$TMP"/.oldroot

# Record what is inside.
# shellcheck disable=SC2016,SC2086 # $@ is the inner shell's; EXTRA is split into package names
chroot "$TMP" /bin/sh -c 'dpkg-query -W -f "\${Package} \${Version}\n" "$@"' versions \
    criu crun libcriu2 iptables iproute2 busybox-static ${EXTRA//,/ } >"$TMP"/.kube-migrate-versions
printf 'suite=%s\nkey=%s\nmirror=%s\nbuilt=%s\n' "$SUITE" "$KEY" "$MIRROR" "$(date -u +%FT%TZ)" \
    >>"$TMP"/.kube-migrate-versions
touch "$TMP"/.kube-migrate-root-ok
rm -f "$TMP.log"

mv -T "$TMP" "$ROOT"
TMP=
log "built in $(( $(date +%s) - start ))s: $(tr '\n' ' ' <"$ROOT"/.kube-migrate-versions)"
printf '%s\n' "$ROOT"
