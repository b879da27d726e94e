#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that take bytes from outside (docs/fuzzing.md):
# AdmissionReview bodies and the webhook decisions, the checkpoint-archive validator, the
# checkpoint-image registry's requests. A step of scripts/test.sh (--quick).
#
#   scripts/fuzz.sh --quick              20 s per target from the committed seeds (CI)
#   scripts/fuzz.sh --time 600 [TARGET]  longer runs, growing a corpus kept in the cache
#
# cargo-fuzz (libFuzzer) from crates.io, built once per version into
# ${KUBE_MIGRATE_CACHE:-~/.cache/kube-migrate}/bin/cargo-fuzz-<version>/; the instrumented
# build goes to <cache>/fuzz-target (outside the work tree, reused from run to run).
# `-s none`: no sanitizer, so the default (stable) toolchain builds it; the code fuzzed is
# safe Rust, and debug assertions (-a) keep overflow checks on. A crash leaves its input in
# <cache>/fuzz-artifacts/ and fails the step (it prints the input and how to replay it).
# Prints "SKIPPED: ..." and exits 0 only when cargo-fuzz cannot be installed at all.
# Env: KUBE_MIGRATE_CACHE, FUZZ_JOBS (parallel libFuzzer jobs per target, default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
TARGETS=(admission_review tar_validator registry_path)
cache="${KUBE_MIGRATE_CACHE:-${HOME:?HOME is unset}/.cache/kube-migrate}"
bindir="$cache/bin/cargo-fuzz-$CARGO_FUZZ_VERSION"
target_dir="$cache/fuzz-target"
artifacts="$cache/fuzz-artifacts"

log() { printf '[fuzz] %s\n' "$*" >&2; }

seconds=
quick=0
selected=()
while (($#)); do
  case $1 in
    --quick) quick=1; seconds=20 ;;
    --time) seconds=${2:?--time SECONDS}; shift ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) log "unknown option $1"; exit 2 ;;
    *) selected+=("$1") ;;
  esac
  shift
done
[[ -n $seconds ]] || { log "usage: scripts/fuzz.sh --quick | --time SECONDS [TARGET...]"; exit 2; }
((${#selected[@]})) || selected=("${TARGETS[@]}")

if [[ ! -x $bindir/cargo-fuzz ]]; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io -> $bindir (about a minute, once)"
  mkdir -p "$cache/bin"
  tmp=$(mktemp -d "$cache/bin/cargo-fuzz-$CARGO_FUZZ_VERSION.tmp.XXXXXX")
  # shellcheck disable=SC2064 # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  if ! cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$tmp" >&2; then
    echo "SKIPPED: fuzz (cargo-fuzz $CARGO_FUZZ_VERSION could not be installed from crates.io)"
    exit 0
  fi
  rm -rf "$bindir"
  mv "$tmp/bin" "$bindir"
  rm -rf "$tmp"
  trap - EXIT
fi
export PATH="$bindir:$PATH"

# The product's `cargo fmt --all` does not reach this separate workspace. (Its clippy, not run
# here to keep the CI step short: cd fuzz && cargo clippy --all-targets -- -D warnings.)
cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check

# cargo-fuzz builds with one codegen unit; 16 roughly halve the rebuild of the product crate
# after a change (flags given in RUSTFLAGS come after cargo-fuzz's own and win).
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-Ccodegen-units=16"
build=(cargo fuzz build -s none -a --target-dir "$target_dir")
log "building the fuzz targets: ${build[*]}"
started=$SECONDS
build_log=$(mktemp)
if ! "${build[@]}" >"$build_log" 2>&1; then
  cat "$build_log" >&2
  rm -f "$build_log"
  exit 1
fi
rm -f "$build_log"
log "built in $((SECONDS - started)) s"
bin="$target_dir/x86_64-unknown-linux-gnu/release"

mkdir -p "$artifacts"
failed=0
for t in "${selected[@]}"; do
  [[ -x $bin/$t ]] || { log "no target $t (have: ${TARGETS[*]})"; exit 2; }
  if ((quick)); then
    corpus=$(mktemp -d)
  else
    corpus="$cache/fuzz-corpus/$t"
    mkdir -p "$corpus"
  fi
  out=$(mktemp)
  opts=(-max_total_time="$seconds" -artifact_prefix="$artifacts/$t-" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096)
  if [[ -n ${FUZZ_JOBS:-} ]]; then
    opts+=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
  fi
  log "$t: ${seconds}s from fuzz/seeds/$t ($(find "fuzz/seeds/$t" -type f | wc -l) seeds) into $corpus"
  status=0
  "$bin/$t" "${opts[@]}" "$corpus" "fuzz/seeds/$t" >"$out" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -n 1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -n 1)
  last=$(grep -E '^#[0-9]+' "$out" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9A-Za-z]+' || true)
  if ((status == 0)); then
    echo "FUZZ PASSED: $t: ${runs:-?} runs, ${speed:-?} exec/s, ${last:-no stats}"
  else
    failed=1
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$out" | head -n 12 || true
    tail -n 40 "$out" >&2
    echo "FUZZ FAILED: $t (exit $status); replay: $bin/$t <the input above>, or cargo fuzz run $t <input>"
  fi
  rm -f "$out"
  if ((quick)); then rm -rf "$corpus"; fi
done
exit "$failed"
