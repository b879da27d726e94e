#!/usr/bin/env bash
# debian-mirror.sh — print the Debian mirror to bootstrap roots from: $KUBE_MIGRATE_DEBIAN_MIRROR,
# else the first Debian mirror in this machine's apt sources, else http://deb.debian.org/debian.
# Used by criu/make-root.sh and scripts/make-build-root.sh.
set -euo pipefail
if [[ -n ${KUBE_MIGRATE_DEBIAN_MIRROR:-} ]]; then
    printf '%s\n' "$KUBE_MIGRATE_DEBIAN_MIRROR"
    exit 0
fi
# deb822 sources first (URIs: ...), then one-line sources (deb URI suite ...).
m=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i=2;i<=NF;i++) print $i}'
       grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
           sed -E 's/\[[^]]*\]//' | awk '{print $2}'
     } | grep -E '/debian/?$' | head -n1 || true)
printf '%s\n' "${m:-http://deb.debian.org/debian}"
