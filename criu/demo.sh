#!/usr/bin/env bash
# demo.sh — real CRIU end to end with crun inside the trixie root: checkpoint a running container,
# pack the images as a CRI-O checkpoint archive, stop the source, restore from the archive into a
# new bundle (as a target node would), prove the state came back, and do a second hop.
#
#   criu/demo.sh            # counter scenario + memory scenario for MIBS (default "1 64 256")
#   MIBS="1 64" criu/demo.sh
#   SCENARIOS=counter criu/demo.sh      # or: memory
#   KEEP=1 criu/demo.sh     # keep the state directory (bundles, images, archives, logs)
#
# Non-interactive; everything it starts (containers, their shims, cgroups, mounts — which live
# only in enter.sh's private mount namespaces — and the state directory) is cleaned up on exit,
# including on failure or Ctrl-C. Exit status 0 only if every check passed. Prints a summary
# table of checkpoint time, image size and restore time per memory size.
#
# Needs root. Uses: criu/make-root.sh (cached trixie root), criu/enter.sh, criu/images.sh,
# criu/km-shim.c (built here with gcc), jq, tar.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MIBS=${MIBS:-1 64 256}
SCENARIOS=${SCENARIOS:-counter memory}
TMO=${TMO:-120}                      # timeout for any single crun/criu command, seconds

say() { printf '\n=== %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }

ROOT=$("$HERE/make-root.sh")
export KUBE_MIGRATE_CRIU_ROOT=$ROOT
S=$(mktemp -d /tmp/km-criu-demo.XXXXXX)
CG=km-criu-demo-$$                   # cgroup parent of every container of this run
mkdir -p "$S"/{bin,bundles,crun,logs,run,ckpt,archives,restore}

crun_() { timeout "$TMO" "$HERE/enter.sh" -b "$S" -- crun --root "$S/crun" "$@" </dev/null; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    say "cleanup"
    # Containers: kill and delete every one this run created (crun state is in $S/crun).
    if [[ -d $S/crun ]]; then
        for d in "$S"/crun/*/; do
            [[ -d $d ]] || continue
            local id; id=$(basename "$d")
            crun_ kill "$id" KILL >/dev/null 2>&1
        done
        sleep 0.3
        for d in "$S"/crun/*/; do
            [[ -d $d ]] || continue
            local id; id=$(basename "$d")
            crun_ delete -f "$id" >/dev/null 2>&1 && info "deleted container $id"
        done
    fi
    # Shims exit by themselves once their container is gone; kill any left (only ours, by pid).
    for f in "$S"/run/*.shim; do
        [[ -f $f ]] || continue
        local p; p=$(cat "$f")
        if [[ -n $p ]] && kill -0 "$p" 2>/dev/null && grep -q km-shim "/proc/$p/cmdline" 2>/dev/null; then
            kill "$p" 2>/dev/null && info "killed shim $p"
        fi
    done
    # cgroups (crun delete removes the v1 leaves it made; CRIU restore also creates the same path
    # in the cgroup2 "unified" hierarchy, which nobody else removes).
    for c in /sys/fs/cgroup/*/"$CG"; do
        [[ -d $c ]] || continue
        find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || info "could not remove $c"
    done
    if [[ ${KEEP:-0} == 1 ]]; then
        info "kept $S"
    else
        rm -rf --one-file-system "$S"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

gcc -O2 -Wall -o "$S/bin/km-shim" "$HERE/km-shim.c"

# make_bundle DIR KIND ID [ENV=VALUE...] — an OCI bundle from `crun spec`, adjusted.
make_bundle() {
    local dir=$1 kind=$2 id=$3; shift 3
    mkdir -p "$dir"
    "$HERE/images.sh" "$kind" "$dir/rootfs" >/dev/null
    timeout "$TMO" "$HERE/enter.sh" -b "$S" -C "$dir" -- crun spec </dev/null
    local args
    case $kind in
        counter) args='["/bin/sh","/counter.sh"]' ;;
        memory) args='["/bin/memhog"]' ;;
    esac
    local envs; envs=$(printf '%s\n' "$@" | jq -R . | jq -s 'map(select(length > 0))')
    jq --argjson args "$args" --argjson envs "$envs" --arg cg "/$CG/$id" --arg host "$id" '
        .process.terminal = false
        | .process.args = $args
        | .process.env += $envs
        | .hostname = $host
        | .linux.cgroupsPath = $cg
        | .mounts += [{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777", "size=16m"]}]
    ' "$dir/config.json" >"$dir/config.json.new"
    mv "$dir/config.json.new" "$dir/config.json"
}

# start ID BUNDLE — crun run --detach under a km-shim (not a child of this shell).
start() {
    local id=$1 bundle=$2
    "$S/bin/km-shim" -l "$S/logs/$id.log" -p "$S/run/$id.pid" -e "$S/run/$id.exit" -s "$S/run/$id.shim" -- \
        timeout "$TMO" "$HERE/enter.sh" -b "$S" -- \
        crun --root "$S/crun" run --detach --bundle "$bundle" --pid-file "$S/run/$id.pid" "$id"
}

# restore ID BUNDLE IMAGES WORKDIR — crun restore --detach under a km-shim.
restore() {
    local id=$1 bundle=$2 images=$3 work=$4
    "$S/bin/km-shim" -l "$S/logs/$id.log" -p "$S/run/$id.pid" -e "$S/run/$id.exit" -s "$S/run/$id.shim" -- \
        timeout "$TMO" "$HERE/enter.sh" -b "$S" -- \
        crun --root "$S/crun" restore --detach --bundle "$bundle" --image-path "$images" --work-path "$work" \
        --pid-file "$S/run/$id.pid" "$id"
}

# checkpoint ID DIR [crun checkpoint options] — CRIU images into DIR/checkpoint, logs into DIR.
checkpoint() {
    local id=$1 dir=$2; shift 2
    mkdir -p "$dir/checkpoint"
    crun_ checkpoint --image-path "$dir/checkpoint" --work-path "$dir" "$@" "$id"
}

# wait_line LOG REGEX [SECONDS] — wait until LOG has a line matching REGEX; print the last such line.
wait_line() {
    local log=$1 re=$2 t=${3:-20} i=0
    while (( i < t * 10 )); do
        if grep -Eq "$re" "$log" 2>/dev/null; then grep -E "$re" "$log" | tail -n 1; return 0; fi
        sleep 0.1; i=$((i + 1))
    done
    fail "no line matching /$re/ in $log after ${t}s"
}
last_count() { grep -E '^count [0-9]+$' "$1" | tail -n 1 | awk '{print $2}'; }
first_count() { grep -E '^count [0-9]+$' "$1" | head -n 1 | awk '{print $2}'; }

# pack DIR BUNDLE KIND ID ARCHIVE — complete DIR to the CRI-O checkpoint layout and tar it.
pack() {
    local dir=$1 bundle=$2 kind=$3 id=$4 archive=$5
    cp "$bundle/config.json" "$dir/spec.dump"
    jq -n --arg id "$id" --arg name "$id" --arg image "km-test/$kind:latest" --arg t "$(date -u +%FT%T.%NZ)" '
        {id: $id, name: $name, rootfsImage: $image, rootfsImageRef: $image, rootfsImageName: $image,
         runtime: "crun", createdTime: $t, checkpointedTime: $t}' >"$dir/config.dump"
    # The rootfs is read-only and /tmp is a tmpfs (dumped by CRIU): no rootfs changes to carry.
    tar -C "$dir" -cf "$dir/rootfs-diff.tar" --files-from /dev/null
    tar -C "$dir" -cf "$archive" .
}

# unpack ARCHIVE DIR BUNDLE ID — what a target node does: the archive's files into DIR, a new
# bundle whose config is spec.dump with this node's cgroup, the base image's rootfs + rootfs-diff.
unpack() {
    local archive=$1 dir=$2 bundle=$3 id=$4
    mkdir -p "$dir" "$bundle"
    tar -C "$dir" -xf "$archive"
    local image kind
    image=$(jq -r .rootfsImageName "$dir/config.dump")
    kind=${image#km-test/}; kind=${kind%%:*}
    "$HERE/images.sh" "$kind" "$bundle/rootfs" >/dev/null
    tar -C "$bundle/rootfs" -xf "$dir/rootfs-diff.tar"
    jq --arg cg "/$CG/$id" '.linux.cgroupsPath = $cg' "$dir/spec.dump" >"$bundle/config.json"
}

in_cgroup() { # PID ID — is the process in this run's cgroup for ID (v1 freezer)?
    grep -q ":freezer:/$CG/$2\$" "/proc/$1/cgroup"
}

info "CRIU root: $ROOT ($(grep -E '^(criu|crun) ' "$ROOT/.kube-migrate-versions" | tr '\n' ' '))"
info "state dir: $S, cgroup parent: /$CG"
t0=$(now_ms); timeout 60 "$HERE/enter.sh" true </dev/null; info "enter.sh overhead: $(( $(now_ms) - t0 )) ms"

RESULTS=()

counter_scenario() {
    say "counter: start ctr-src (crun run --detach under km-shim)"
    make_bundle "$S/bundles/src" counter ctr-src
    start ctr-src "$S/bundles/src"
    wait_line "$S/logs/ctr-src.log" '^count 15$' 20 >/dev/null
    info "ctr-src pid $(cat "$S/run/ctr-src.pid"), $(wait_line "$S/logs/ctr-src.log" '^count ')"
    info "cgroup: $(grep freezer "/proc/$(cat "$S/run/ctr-src.pid")/cgroup")"

    say "counter: checkpoint --leave-running (what the kubelet API does)"
    local before_ck after_ck t
    before_ck=$(last_count "$S/logs/ctr-src.log")
    t=$(now_ms)
    checkpoint ctr-src "$S/ckpt/ctr-src" --leave-running
    info "checkpoint took $(( $(now_ms) - t )) ms; images $(du -sh "$S/ckpt/ctr-src/checkpoint" | cut -f1)"
    after_ck=$(last_count "$S/logs/ctr-src.log")
    info "count was $before_ck when the checkpoint started, $after_ck when it returned"
    sleep 0.5
    info "ctr-src keeps running: count $(last_count "$S/logs/ctr-src.log")"
    pack "$S/ckpt/ctr-src" "$S/bundles/src" counter ctr-src "$S/archives/checkpoint-ctr-src.tar"
    info "archive $(du -h "$S/archives/checkpoint-ctr-src.tar" | cut -f1):"
    tar -tvf "$S/archives/checkpoint-ctr-src.tar" | awk '{printf "        %10s %s\n", $3, $6}'

    say "counter: stop the source (kill + delete), as kube-migrate does right after the checkpoint"
    crun_ kill ctr-src KILL
    wait_line "$S/logs/ctr-src.log" 'container init [0-9]+ exited' 10 >/dev/null
    crun_ delete ctr-src
    local src_last; src_last=$(last_count "$S/logs/ctr-src.log")
    info "ctr-src last count $src_last; $(cat "$S/run/ctr-src.exit")"

    say "counter: restore ctr-dst from the archive into a new bundle (a target node)"
    unpack "$S/archives/checkpoint-ctr-src.tar" "$S/restore/ctr-dst" "$S/bundles/dst" ctr-dst
    t=$(now_ms)
    restore ctr-dst "$S/bundles/dst" "$S/restore/ctr-dst/checkpoint" "$S/restore/ctr-dst"
    info "restore took $(( $(now_ms) - t )) ms"
    wait_line "$S/logs/ctr-dst.log" '^count ' 10 >/dev/null
    sleep 0.5
    local first; first=$(first_count "$S/logs/ctr-dst.log")
    info "ctr-dst first count $first, now $(last_count "$S/logs/ctr-dst.log"); crun state: $(crun_ state ctr-dst | jq -r .status)"
    (( first > 0 )) || fail "restored counter started at $first (a fresh start, not a restore)"
    (( first >= before_ck && first <= after_ck + 1 )) || fail "restored counter $first is outside the checkpoint window [$before_ck, $((after_ck + 1))]"
    info "OK: resumed at $first, the value at the checkpoint (the source went on to $src_last before it was stopped: those steps are lost, as with any checkpoint-then-stop)"
    in_cgroup "$(cat "$S/run/ctr-dst.pid")" ctr-dst || fail "ctr-dst is not in its cgroup /$CG/ctr-dst"
    info "OK: ctr-dst is in its own cgroup /$CG/ctr-dst"

    say "counter: second hop — plain checkpoint of the restored container (stops it), restore ctr-hop2"
    t=$(now_ms)
    checkpoint ctr-dst "$S/ckpt/ctr-dst"
    info "checkpoint took $(( $(now_ms) - t )) ms"
    wait_line "$S/logs/ctr-dst.log" 'container init [0-9]+ exited' 10 >/dev/null
    local dst_last; dst_last=$(last_count "$S/logs/ctr-dst.log")
    pack "$S/ckpt/ctr-dst" "$S/bundles/dst" counter ctr-dst "$S/archives/checkpoint-ctr-dst.tar"
    unpack "$S/archives/checkpoint-ctr-dst.tar" "$S/restore/ctr-hop2" "$S/bundles/hop2" ctr-hop2
    restore ctr-hop2 "$S/bundles/hop2" "$S/restore/ctr-hop2/checkpoint" "$S/restore/ctr-hop2"
    wait_line "$S/logs/ctr-hop2.log" '^count ' 10 >/dev/null
    first=$(first_count "$S/logs/ctr-hop2.log")
    info "ctr-dst stopped at $dst_last; ctr-hop2 first count $first"
    # A line still in the stdout pipe at dump time is part of the image and comes out again.
    (( first == dst_last + 1 || first == dst_last )) || fail "ctr-hop2 started at $first, expected $((dst_last + 1))"
    info "OK: exact continuation after a plain checkpoint"
    crun_ kill ctr-hop2 KILL
    wait_line "$S/logs/ctr-hop2.log" 'container init [0-9]+ exited' 10 >/dev/null
    crun_ delete ctr-hop2
}

memory_scenario() {
    local mib=$1 id="mem$1"
    say "memory ${mib} MiB: start $id"
    make_bundle "$S/bundles/$id" memory "$id" "MIB=$mib" "REPORT_EVERY=0"
    start "$id" "$S/bundles/$id"
    local startline; startline=$(wait_line "$S/logs/$id.log" '^memhog start' 60)
    info "$startline"
    wait_line "$S/logs/$id.log" '^count 5$' 20 >/dev/null
    crun_ kill "$id" USR1
    local before; before=$(wait_line "$S/logs/$id.log" '^memhog report' 30)
    info "before: $before"
    local rss; rss=$(awk '/VmRSS/ {print $2}' "/proc/$(cat "$S/run/$id.pid")/status")
    info "RSS $rss KiB"

    local t; t=$(now_ms)
    checkpoint "$id" "$S/ckpt/$id" --leave-running
    local ck_ms=$(( $(now_ms) - t ))
    local criu_s; criu_s=$(grep -E 'Dumping finished successfully' "$S/ckpt/$id/dump.log" | sed -E 's/^\(([0-9.]+)\).*/\1/')
    local img; img=$(du -sb "$S/ckpt/$id/checkpoint" | cut -f1)
    local pages; pages=$(cat "$S"/ckpt/"$id"/checkpoint/pages-*.img | wc -c)
    info "checkpoint --leave-running: ${ck_ms} ms (criu ${criu_s}s), images $((img / 1024)) KiB (pages $((pages / 1024)) KiB)"
    t=$(now_ms)
    pack "$S/ckpt/$id" "$S/bundles/$id" memory "$id" "$S/archives/checkpoint-$id.tar"
    local pk_ms=$(( $(now_ms) - t ))
    local arch; arch=$(stat -c %s "$S/archives/checkpoint-$id.tar")
    info "CRI-O archive: $((arch / 1024)) KiB, tar took ${pk_ms} ms"

    crun_ kill "$id" KILL
    wait_line "$S/logs/$id.log" 'container init [0-9]+ exited' 10 >/dev/null
    crun_ delete "$id"
    rm -rf "$S/ckpt/$id"   # keep the disk use down: the archive has it all
    local src_last; src_last=$(last_count "$S/logs/$id.log")

    local rid="$id-r"
    unpack "$S/archives/checkpoint-$id.tar" "$S/restore/$rid" "$S/bundles/$rid" "$rid"
    rm -f "$S/archives/checkpoint-$id.tar"
    t=$(now_ms)
    restore "$rid" "$S/bundles/$rid" "$S/restore/$rid/checkpoint" "$S/restore/$rid"
    local rs_ms=$(( $(now_ms) - t ))
    local criu_r; criu_r=$(grep -E 'Restore finished successfully' "$S/restore/$rid/restore.log" | sed -E 's/^\(([0-9.]+)\).*/\1/' || true)
    info "restore: ${rs_ms} ms (criu ${criu_r:-?}s)"
    wait_line "$S/logs/$rid.log" '^count ' 10 >/dev/null
    crun_ kill "$rid" USR1
    local after; after=$(wait_line "$S/logs/$rid.log" '^memhog report' 30)
    info "after:  $after"
    local first; first=$(first_count "$S/logs/$rid.log")
    local c1 c2
    c1=$(sed -E 's/.*checksum=([0-9a-f]+).*/\1/' <<<"$before")
    c2=$(sed -E 's/.*checksum=([0-9a-f]+).*/\1/' <<<"$after")
    [[ $c1 == "$c2" ]] || fail "$id: checksum $c2 after restore, $c1 before"
    [[ $after == *verify=ok* ]] || fail "$id: pattern verification failed after restore: $after"
    # The source runs on after its dump (--leave-running) until it is killed, so it may have
    # printed nothing after the dumped state: the restored copy's first count is then its last + 1.
    (( first > 0 && first <= src_last + 1 )) || fail "$id: restored count $first (source last $src_last)"
    grep -q '^memhog start' "$S/logs/$rid.log" && fail "$id: the restored process started afresh"
    info "OK: checksum $c2 equal, verify=ok, count resumed at $first"
    in_cgroup "$(cat "$S/run/$rid.pid")" "$rid" || fail "$rid is not in its cgroup"
    RESULTS+=("$(printf '%6s %8s %8s %11s %10s %11s %7s %10s %8s' "$mib" "$rss" "$ck_ms" "$criu_s" "$((img / 1024))" "$((arch / 1024))" "$pk_ms" "$rs_ms" "${criu_r:-?}")")
    crun_ kill "$rid" KILL
    wait_line "$S/logs/$rid.log" 'container init [0-9]+ exited' 10 >/dev/null
    crun_ delete "$rid"
    rm -rf "$S/restore/$rid"
}

for sc in $SCENARIOS; do
    case $sc in
        counter) counter_scenario ;;
        memory) for m in $MIBS; do memory_scenario "$m"; done ;;
        *) fail "unknown scenario $sc" ;;
    esac
done

if [[ ${#RESULTS[@]} -gt 0 ]]; then
    say "summary (wall times include enter.sh; criu = CRIU's own log timestamp)"
    printf '    %6s %8s %8s %11s %10s %11s %7s %10s %8s\n' MiB RSS_KiB ckpt_ms ckpt_criu_s images_KiB archive_KiB tar_ms restore_ms rst_criu_s
    for r in "${RESULTS[@]}"; do printf '    %s\n' "$r"; done
fi
say "all checks passed"
