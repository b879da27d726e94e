#!/usr/bin/env bash
# Builds (once) the Debian trixie root the real nodes run CRI-O, the kubelet and kube-proxy in, and
# prints its path. It is criu/make-root.sh's CRIU root (criu 4.1, crun 1.21) plus what a CRI-O node
# needs; cached under ${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}/criu-root-trixie-<key>.
#
# Usage: nodes/make-root.sh
#
# Why each extra package: conmon (CRI-O's container monitor); containernetworking-plugins (bridge,
# host-local, loopback: the pod network); skopeo (loads OCI archives into a node's containers-storage;
# brings containers-common: policy.json, registries.conf); util-linux, mount (the kubelet mounts
# volumes, nsenter); conntrack, nftables (kube-proxy: conntrack cleanup; the nftables mode);
# ca-certificates. Debian has no cri-o package: nodes/build.sh builds it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KUBE_MIGRATE_ROOT_EXTRA_PACKAGES=conmon,containernetworking-plugins,skopeo,util-linux,mount,conntrack,nftables,ca-certificates \
  exec "$here/../criu/make-root.sh" "$@"
