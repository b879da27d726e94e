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

step "transfer into an agent against a raw TLS copy; image build"
cargo bench --profile "$profile" --locked --bench transfer

printf '\nall benches passed in %ds\n' "$SECONDS"
