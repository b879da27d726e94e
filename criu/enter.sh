#!/usr/bin/env bash
# enter.sh — run a command inside the Debian trixie CRIU root (criu/make-root.sh), set up so that
# crun and criu work on this host (kernel 6.x, cgroup v1 hybrid layout).
#
#   criu/enter.sh [-b HOST_DIR[:ROOT_PATH]]... [-C DIR] [--] COMMAND [ARG...]
#
#   -b HOST_DIR[:ROOT_PATH]  bind-mount (recursively) HOST_DIR at ROOT_PATH inside the root;
#                            ROOT_PATH defaults to HOST_DIR (same path inside and outside, which
#                            is what you want for crun bundles, state and image directories).
#   -C DIR                   working directory inside the root (default /).
#   -r ROOT                  the root (default: $KUBE_MIGRATE_CRIU_ROOT, else `make-root.sh`).
#
# A bind target under /tmp, /run or /var/tmp is created on the fresh tmpfs; any other missing
# target directory is created (empty) in the cached root before it is made read-only.
#
# Examples:
#   criu/enter.sh criu --version
#   criu/enter.sh -b /tmp/km-state -- crun --root /tmp/km-state/crun list
#
# What it does, in a private mount namespace of its own (unshare -m; nothing leaks to the host,
# everything vanishes when the last process in the namespace exits):
#   1. bind the root onto itself (pivot_root needs a mount point; made read-only after step 4, so
#      concurrent users of the cached root cannot change it); fresh tmpfs on /run, /tmp, /var/tmp;
#   2. rbind the host's /dev and /sys, mount a new devpts on /dev/pts, a new proc on /proc;
#   3. unmount /sys/fs/cgroup/unified (only that one): with it crun sees the "hybrid" layout and
#      refuses; without it, plain cgroup v1. Keep /sys/fs/cgroup/systemd (name=systemd): without
#      it `crun restore` puts the restored container into the root cgroups, crun then reports it
#      "stopped" and it cannot be checkpointed again (criu/README.md, Failures 2).
#      KM_CGROUP_UNMOUNT="unified systemd" restores the old behaviour, for experiments only;
#   4. the -b binds; pivot_root into the root; lazily unmount the old root; exec COMMAND with a
#      clean environment (PATH, HOME=/root, TERM, LANG=C.UTF-8, plus any KM_* variables).
#
# State that must survive between two calls (crun's state, bundles, CRIU images, logs) must live
# in a -b directory: /run and /tmp are fresh tmpfs in every call. Use `crun --root <bound dir>`.
#
# Stdio: COMMAND gets this script's fds 0, 1, 2 and nothing else (fds >= 3 are closed), so a
# container started with `crun run --detach` inherits exactly the caller's stdin/stdout/stderr.
# For a container that will be checkpointed those must be pipes (see criu/README.md, km-shim).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=${KUBE_MIGRATE_CRIU_ROOT:-}
BINDS=()
CWD=/

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case $1 in
        -b) [[ $# -ge 2 ]] || usage; BINDS+=("$2"); shift 2 ;;
        -C) [[ $# -ge 2 ]] || usage; CWD=$2; shift 2 ;;
        -r) [[ $# -ge 2 ]] || usage; ROOT=$2; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "enter.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || usage
if [[ -z $ROOT ]]; then
    ROOT=$("$HERE/make-root.sh")
fi
ROOT=$(realpath "$ROOT")
[[ -f $ROOT/.kube-migrate-root-ok ]] || { echo "enter.sh: $ROOT is not a finished CRIU root" >&2; exit 1; }

# Validate and normalise binds here (host side), pass them to the inner script as "src\0dst\0...".
BIND_SPEC=()
for b in "${BINDS[@]}"; do
    src=${b%%:*}
    if [[ $b == *:* ]]; then dst=${b#*:}; else dst=$src; fi
    src=$(realpath "$src")
    [[ -d $src ]] || { echo "enter.sh: bind source $src is not a directory" >&2; exit 1; }
    [[ $dst == /* ]] || { echo "enter.sh: bind target $dst must be absolute" >&2; exit 1; }
    BIND_SPEC+=("$src" "$dst")
done

# The environment the command sees: clean, plus KM_* variables the caller wants to pass.
ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "TERM=${TERM:-dumb}")
while IFS= read -r -d '' kv; do
    [[ $kv == KM_* ]] && ENV+=("$kv")
done < <(env -0)

# Close every fd >= 3 of ours before unshare, so that nothing the caller had open (pipes of a
# tool harness, sockets, locks) leaks into long-lived container processes.
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    # 255 is bash's own script fd (close-on-exec already).
    [[ $fd =~ ^[0-9]+$ && $fd -gt 2 && $fd -ne 255 ]] && eval "exec $fd>&-" 2>/dev/null || true
done

exec unshare --mount --propagation private -- /bin/bash -euo pipefail -c '
R=$1; CWD=$2; UNMOUNT_CG=$3; NB=$4; shift 4
binds=("${@:1:NB}"); shift "$NB"
# 1. the root as a mount point of its own (made read-only below, after the binds)
mount --bind "$R" "$R"
for d in run tmp var/tmp; do mount -t tmpfs -o mode=1777,nosuid,nodev "km-$d" "$R/$d"; done
mkdir -p "$R/run/lock"
# 2. /dev, /sys, /proc
mount --rbind /dev "$R/dev"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
mount --bind "$R/dev/pts/ptmx" "$R/dev/ptmx"
mount --rbind /sys "$R/sys"
mount -t proc proc "$R/proc"
# 3. plain cgroup v1 for crun
for m in $UNMOUNT_CG; do
    if mountpoint -q "$R/sys/fs/cgroup/$m"; then umount -l "$R/sys/fs/cgroup/$m"; fi
done
# 4. binds, then switch root
i=0
while [[ $i -lt ${#binds[@]} ]]; do
    src=${binds[$i]}; dst=${binds[$((i+1))]}; i=$((i+2))
    # Under /tmp, /run, /var/tmp the mount point is made on the fresh tmpfs; elsewhere an empty
    # directory is left in the cached root (harmless).
    [[ -d $R$dst ]] || mkdir -p "$R$dst"
    mount --rbind "$src" "$R$dst"
    mount --make-rprivate "$R$dst"
done
# Nobody writes into the shared cached root from here on.
mount -o remount,bind,ro "$R"
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
cd "$CWD"
exec /usr/bin/env -i "$@"
'  enter "$ROOT" "$CWD" "${KM_CGROUP_UNMOUNT-unified}" "${#BIND_SPEC[@]}" "${BIND_SPEC[@]}" "${ENV[@]}" "$@"
