#!/usr/bin/env bash
# Every benchmark of this script in one command; docs/benchmarks.md has the figures and what
# they mean.
#   scripts/bench.sh           admission (10 s per case), transfer of 64 MiB-1 GiB archives into
#                              a real agent against a raw TLS copy to a file, image build of 1 GiB;
#                              release build
#   scripts/bench.sh --quick   the same benches in about a second per case (16 and 64 MiB), as CI
#                              runs them to check that they still work: dev profile, so that it
#                              reuses what `cargo test` built (figures are not representative)
# KM_BENCH_* variables set by the caller win (e.g. KM_BENCH_SIZES_MIB=64,256,1024,4096 or
# KM_BENCH_RUNS=3, see benches/*.rs), and KM_BENCH_PROFILE=release|dev overrides the profile.
# Builds what it needs with cargo (CARGO_TARGET_DIR honoured); exits non-zero as soon as a build
# or a bench fails. The drain benchmark (1/10/50 pods) needs the local cluster:
# scripts/bench-drain.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
case "${1:-}" in
  "") ;;
  --quick) quick=1 ;;
  -h | --help)
    sed -n '2,15p' "$0"
    exit 0
    ;;
  *)
    echo "usage: $0 [--quick]" >&2
    exit 2
    ;;
esac
profile=release
if ((quick)); then
  profile=dev
  export KM_BENCH_SECONDS=${KM_BENCH_SECONDS:-1}
  export KM_BENCH_SIZES_MIB=${KM_BENCH_SIZES_MIB:-16,64}
fi
profile=${KM_BENCH_PROFILE:-$profile}

step() { printf '\n==> %s (%ds)\n' "$1" "$SECONDS"; }

step "build ($profile profile): agent and benches"
cargo build --profile "$profile" --locked -p kube-migrate-agent
cargo bench --profile "$profile" --locked --no-run --bench admission --bench transfer

step "admission (eviction webhook over HTTPS)"
cargo bench --profile "$profile" --locked --bench admission

# What bounds the receive path on this machine, then the agent against it (issue #14 goal 4:
# the agent's upload rate >= 0.9 of the lowest ceiling).
largest=$(tr ',' '\n' <<< "${KM_BENCH_SIZES_MIB:-64,256,1024}" | sort -n | tail -n 1)
step "receive-path ceilings at $largest MiB (scripts/bench-ceiling.sh)"
ceiling=$(scripts/bench-ceiling.sh "$largest")
echo "$ceiling"

step "transfer into an agent against a raw TLS copy; image build"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo bench --profile "$profile" --locked --bench transfer | tee "$out"
# The bench names sizes of whole GiB in GiB.
label="$largest MiB"
if ((largest >= 1024 && largest % 1024 == 0)); then label="$((largest / 1024)) GiB"; fi
agent=$(awk -F'|' -v size=" $label " '$2 == size { gsub(/[^0-9.]/, "", $4); print $4; exit }' "$out")
read -r _ lowest what <<< "$(grep '^lowest' <<< "$ceiling")"
[[ -n $agent && -n $lowest ]] || { echo "no agent rate for $largest MiB or no ceiling" >&2; exit 1; }
awk -v a="$agent" -v l="$lowest" -v w="$what" -v m="$largest" 'BEGIN {
  printf "\nagent upload of %s MiB: %s MiB/s = %.2f of the lowest ceiling (%s, %s MiB/s); goal >= 0.9\n", m, a, a / l, w, l }'

printf '\nall benches passed in %ds\n' "$SECONDS"
