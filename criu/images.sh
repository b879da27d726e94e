#!/usr/bin/env bash
# images.sh — make a small container root filesystem for the CRIU tests, with no registry.
#
#   criu/images.sh counter DEST     # busybox + /counter.sh
#   criu/images.sh memory  DEST     # busybox + /bin/memhog (static C program, criu/memhog.c)
#
# DEST must not exist or be empty; it becomes the rootfs (give each bundle its own copy: crun
# creates mount points in it). Prints DEST. Takes well under a second.
#
# busybox: the static busybox of the CRIU root (trixie's busybox-static, criu/make-root.sh), or
#          $KM_BUSYBOX.
# counter: the init is `/bin/sh /counter.sh`: a shell loop that prints `count N` to stdout and
#          writes N to /tmp/count (if /tmp is writable) every 100 ms. START (env) sets the first
#          value. The counter is a shell variable: after a restore it can only continue from the
#          checkpointed value if the process memory came back.
# memory:  the init is `/bin/memhog`: fills MIB (env, default 64) MiB of anonymous memory with a
#          pattern derived from a per-run SEED, prints its checksum at start, every REPORT_EVERY
#          ticks and on SIGUSR1, with a `count N` line every 100 ms (see criu/memhog.c for why a
#          program: busybox can only put data in files — a tmpfs file is page cache, not the
#          process's memory — or in a shell variable, which cannot hold binary data and costs
#          several times its size).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
KIND=$1 DEST=$2
case $KIND in counter|memory) ;; *) usage ;; esac
if [[ -e $DEST && -n $(ls -A "$DEST") ]]; then echo "images.sh: $DEST is not empty" >&2; exit 1; fi

BUSYBOX=${KM_BUSYBOX:-}
if [[ -z $BUSYBOX ]]; then
    BUSYBOX=$("$HERE/make-root.sh")/bin/busybox
fi
[[ -x $BUSYBOX ]] || { echo "images.sh: no busybox at $BUSYBOX" >&2; exit 1; }

mkdir -p "$DEST"/{bin,etc,dev,proc,sys,tmp,root}
chmod 1777 "$DEST/tmp"
cp "$BUSYBOX" "$DEST/bin/busybox"
for applet in $("$DEST/bin/busybox" --list); do
    [[ -e $DEST/bin/$applet ]] || ln -s busybox "$DEST/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$DEST/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$DEST/etc/group"
echo "$KIND" >"$DEST/etc/hostname"

case $KIND in
counter)
    cat >"$DEST/counter.sh" <<'EOF'
#!/bin/sh
# kube-migrate CRIU test: a counter that lives in this shell's memory.
i=${START:-0}
echo "counter start pid=$$"
while :; do
    echo "count $i"
    echo "$i" 2>/dev/null >/tmp/count
    i=$((i + 1))
    usleep 100000
done
EOF
    chmod 755 "$DEST/counter.sh"
    ;;
memory)
    command -v gcc >/dev/null || { echo "images.sh: gcc is needed to build memhog" >&2; exit 1; }
    gcc -static -O2 -Wall -o "$DEST/bin/memhog" "$HERE/memhog.c"
    strip "$DEST/bin/memhog" 2>/dev/null || true
    ;;
esac
printf '%s\n' "$DEST"
