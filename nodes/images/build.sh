#!/usr/bin/env bash
# Builds the harness's two base images as OCI archives, without Docker or a registry:
#   busybox.oci.tar  localhost/kube-migrate/busybox:latest  (static busybox from the trixie root,
#                    every applet as a symlink, PATH=/bin, /tmp)
#   pause.oci.tar    localhost/kube-migrate/pause:latest    (images/pause.c, static; CRI-O's pause_image)
#
# Usage: nodes/images/build.sh ROOT OUT_DIR     (ROOT: nodes/make-root.sh's root, for busybox)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=${1:?usage: build.sh ROOT OUT_DIR}; out=${2:?usage: build.sh ROOT OUT_DIR}
mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

mkdir -p "$tmp/bb/bin" "$tmp/bb/etc" "$tmp/bb/tmp" "$tmp/bb/root"
chmod 1777 "$tmp/bb/tmp"
cp "$root/bin/busybox" "$tmp/bb/bin/busybox"
# busybox-static is static: its applet list can be read by running it on the host.
for a in $("$tmp/bb/bin/busybox" --list); do [[ -e $tmp/bb/bin/$a ]] || ln -s busybox "$tmp/bb/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$tmp/bb/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$tmp/bb/etc/group"
"$here/oci-archive.py" --out "$out/busybox.oci.tar" --ref localhost/kube-migrate/busybox:latest \
  --dir "$tmp/bb" --env PATH=/bin --cmd /bin/sh > /dev/null

mkdir -p "$tmp/pause"
gcc -static -Os -s -o "$tmp/pause/pause" "$here/pause.c"
"$here/oci-archive.py" --out "$out/pause.oci.tar" --ref localhost/kube-migrate/pause:latest \
  --dir "$tmp/pause" --entrypoint /pause > /dev/null
ls "$out"/busybox.oci.tar "$out"/pause.oci.tar
