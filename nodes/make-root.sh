#!/usr/bin/env bash
# Builds (once) the Debian trixie root the real nodes run CRI-O, the kubelet and kube-proxy in, and
# prints its path. It is criu/make-root.sh's CRIU root (crun 1.21) plus what a CRI-O node needs,
# with criu and libcriu2 from Debian forky (4.2.1); cached under
# ${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}/criu-root-trixie-<key>.
#
# Usage: nodes/make-root.sh
#
# Why each extra package: conmon (CRI-O's container monitor); containernetworking-plugins (bridge,
# host-local, loopback: the pod network); skopeo (loads OCI archives into a node's containers-storage;
# brings containers-common: policy.json, registries.conf); util-linux, mount (the kubelet mounts
# volumes, nsenter); conntrack, nftables (kube-proxy: conntrack cleanup; the nftables mode);
# ca-certificates. Debian has no cri-o package: nodes/build.sh builds it. CRIU from forky: trixie's
# 4.1.1 cannot checkpoint a process with any inet socket (even a listening one) on Linux 6.16+:
# "sockets: Can't get 1:16 opt: Operation not supported" in dump.log (SO_PASSCRED, no longer
# answered for inet sockets); 4.2 asks for it only where the family has it (CRIU commit 4b73985).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KUBE_MIGRATE_ROOT_NEWER=forky:criu,libcriu2 KUBE_MIGRATE_ROOT_EXTRA_PACKAGES=conmon,containernetworking-plugins,skopeo,util-linux,mount,conntrack,nftables,ca-certificates \
  exec "$here/../criu/make-root.sh" "$@"
