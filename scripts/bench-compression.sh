#!/usr/bin/env bash
# Compression of checkpoint archives on the wire (--transfer-zstd-level) on a real CRIU memory
# image: a perl process holding a session cache (ENTRIES keys "session:N" with JSON values and
# random tokens, about 300 bytes each) is dumped by CRIU inside the cached CRIU root
# (criu/enter.sh), its image directory is packed as a checkpoint archive's checkpoint/, and
# benches/compression.rs measures zstd on it, and on incompressible pages (what the e2e memory
# images hold) for comparison. Figures: docs/benchmarks.md "Slow links".
#
#   scripts/bench-compression.sh            200,000 entries (about 60 MiB of pages), release
#   scripts/bench-compression.sh --quick    20,000 entries, one run, dev profile (CI: it still works)
#
# Needs root and the CRIU root (criu/make-root.sh builds it once); without them it says SKIPPED
# for the CRIU image and measures the incompressible archive only.
set -euo pipefail
cd "$(dirname "$0")/.."
entries=200000 profile=release runs=3
if [[ ${1:-} == --quick ]]; then entries=20000 profile=dev runs=1; fi
work=$(mktemp -d /var/tmp/km-compression.XXXXXX)
trap 'rm -rf "$work"' EXIT

cat > "$work/dump.sh" <<'SH'
#!/bin/sh
# Inside the CRIU root: fill a perl heap, wait until it is filled, dump it with CRIU.
set -e
dir=$1 entries=$2
mkdir -p "$dir/checkpoint"
setsid perl -e '
  my ($ready, $n) = @ARGV; my %cache;
  for my $i (1..$n) {
    $cache{"session:$i"} = sprintf("{\"user\":\"user%06d\",\"email\":\"user%06d\@example.com\",\"cart\":[%d,%d,%d],\"ts\":%d,\"token\":\"%08x%08x\"}",
      $i, $i, $i % 97, $i % 13, $i % 7, 1764300000 + $i, int(rand(2**32)), int(rand(2**32)));
  }
  open(my $f, ">", $ready) or die; close $f;
  sleep 1 while 1;' "$dir/ready" "$entries" < /dev/null > "$dir/perl.log" 2>&1 &
pid=$!
while [ ! -e "$dir/ready" ]; do sleep 0.1; done
criu dump -t "$pid" -D "$dir/checkpoint" --shell-job -o "$dir/dump.log"
SH
chmod +x "$work/dump.sh"
archives=()
if [[ $(id -u) == 0 ]] && timeout 300 criu/enter.sh -b "$work" -- "$work/dump.sh" "$work" "$entries" > "$work/enter.log" 2>&1; then
  tar -C "$work" -cf "$work/perl-session-cache.tar" checkpoint
  echo "CRIU image of a perl session cache ($entries entries): $(du -sh "$work/checkpoint" | cut -f1)"
  archives+=("$work/perl-session-cache.tar")
else
  echo "SKIPPED: the CRIU image (needs root and criu/make-root.sh's root): $(tail -n 3 "$work/enter.log" 2> /dev/null | tr '\n' ' ')"
fi
KM_BENCH_ARCHIVES=$(IFS=,; echo "${archives[*]}") KM_BENCH_RUNS=$runs \
  cargo bench --profile "$profile" --locked --bench compression
if ((${#archives[@]})); then
  # The incompressible pages of the e2e memory images, for comparison.
  KM_BENCH_ARCHIVES="" KM_BENCH_RUNS=$runs cargo bench --profile "$profile" --locked --bench compression | tail -n 2
fi
