#!/usr/bin/env bash
# release.sh — the kubectl plugin's release (README "kubectl migrate"): kubectl-migrate for linux
# amd64 and arm64, static, built by Debian's rustc and its arm64 standard library in the root of
# scripts/make-build-root.sh (no rustup target download), then checked:
#   1. out/release/kubectl-migrate_v<version>_linux_<arch>.tar.gz (binary + LICENSE; sorted,
#      owner 0, mtime SOURCE_DATE_EPOCH, gzip -n: the same binaries give the same bytes) and
#      out/release/SHA256SUMS
#   2. file(1): static executables of the right architecture; both answer --version with the
#      crate's version (arm64 under qemu-user)
#   3. out/release/migrate.yaml rendered from .krew.yaml (URL and sha256 of each archive),
#      checked by krew's validate-krew-manifest (built from the Go module proxy)
#   4. `kubectl krew install --manifest --archive` of the amd64 archive into a temporary
#      KREW_ROOT, then `kubectl migrate --version` found by kubectl's plugin lookup; a tampered
#      archive is refused by krew (the sha256 check can fail)
# Env: SOURCE_DATE_EPOCH (default 0), KUBE_MIGRATE_CACHE (roots, target dir, tools).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
CACHE=${KUBE_MIGRATE_CACHE:-$HOME/.cache/kube-migrate}
KREW_VERSION=v0.4.3
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]["version"])')
TAG=v$VERSION
OUT=$ROOT/out/release
declare -A TRIPLE=([amd64]=x86_64-unknown-linux-gnu [arm64]=aarch64-unknown-linux-gnu)
declare -A FILE_ARCH=([amd64]=x86-64 [arm64]=aarch64)

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'release: error: %s\n' "$*" >&2; exit 1; }

step "build root (Debian's rustc, arm64 std, cross gcc, qemu-user)"
BUILD_ROOT=$(scripts/make-build-root.sh)
cat "$BUILD_ROOT/.kube-migrate-versions"

step "cargo build --release -p kubectl-migrate for ${TRIPLE[*]}"
# The crates come from this machine's cargo (its proxies and CAs), into its registry cache, which
# the root's cargo then reads offline. The target dir is outside the work tree, per build root:
# a fresh clone reuses it.
cargo fetch --locked
REGISTRY=${CARGO_HOME:-$HOME/.cargo}/registry
TARGET_DIR=$CACHE/release-target-$(basename "$BUILD_ROOT")
CARGO_CACHE=$CACHE/release-cargo-home
mkdir -p "$TARGET_DIR" "$CARGO_CACHE/registry"
mkdir -p "$BUILD_ROOT/cache/target" "$BUILD_ROOT/cache/cargo"
# A private mount namespace: the binds and proc vanish with it. The sources are read-only.
# shellcheck disable=SC2016 # for the inner shell
unshare -m --propagation private /bin/sh -euc '
  r=$1 src=$2 target=$3 cargo=$4 registry=$5; shift 5
  mount --bind "$src" "$r/src"; mount -o remount,bind,ro "$r/src"
  mount --bind "$target" "$r/cache/target"
  mount --bind "$cargo" "$r/cache/cargo"
  mount --bind "$registry" "$r/cache/cargo/registry"
  mount -t proc proc "$r/proc"
  exec chroot "$r" env -i PATH=/usr/bin:/bin HOME=/root CARGO_HOME=/cache/cargo \
    CARGO_TARGET_DIR=/cache/target SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=/src=. --remap-path-prefix=/cache/cargo=/cargo" \
    /bin/sh -euc "cd /src && for t in \"\$@\"; do cargo build --release --frozen --target \$t -p kubectl-migrate; done" \
    build "$@"' \
  release "$BUILD_ROOT" "$ROOT" "$TARGET_DIR" "$CARGO_CACHE" "$REGISTRY" "${TRIPLE[amd64]}" "${TRIPLE[arm64]}"
echo "built in $((SECONDS - START)) s"

step "archives and SHA256SUMS in out/release"
rm -rf "$OUT"
mkdir -p "$OUT"
archive() { # arch -> prints the archive path
  local arch=$1 stage name
  name=kubectl-migrate_${TAG}_linux_$arch.tar.gz
  stage=$(mktemp -d)
  install -m 755 "$TARGET_DIR/${TRIPLE[$arch]}/release/kubectl-migrate" "$stage/kubectl-migrate"
  install -m 644 LICENSE "$stage/LICENSE"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" --format=gnu \
    -C "$stage" -cf - kubectl-migrate LICENSE | gzip -n -9 >"$OUT/$name"
  rm -rf "$stage"
  echo "$OUT/$name"
}
for arch in amd64 arm64; do
  a=$(archive "$arch")
  # Reproducible: the same binary archived again gives the same bytes.
  again=$(sha256sum <"$a")
  mv "$a" "$a.first"
  archive "$arch" >/dev/null
  [[ $(sha256sum <"$a") == "$again" ]] || die "$a differs when written again"
  rm "$a.first"
done
(cd "$OUT" && sha256sum ./*.tar.gz | sed 's| \./| |' >SHA256SUMS && sha256sum -c SHA256SUMS)
ls -l "$OUT"

step "static binaries of the right architecture, answering --version"
check_dir=$(mktemp -d)
trap 'rm -rf "$check_dir"' EXIT
for arch in amd64 arm64; do
  mkdir -p "$check_dir/$arch"
  tar -C "$check_dir/$arch" -xzf "$OUT/kubectl-migrate_${TAG}_linux_$arch.tar.gz"
  desc=$(file -b "$check_dir/$arch/kubectl-migrate")
  echo "$arch: $desc"
  [[ $desc == *"${FILE_ARCH[$arch]}"* && $desc =~ static(-pie|ally)\ linked ]] ||
    die "$arch: not a static ${FILE_ARCH[$arch]} executable"
done
got=$("$check_dir/amd64/kubectl-migrate" --version)
echo "amd64: $got"
[[ $got == "kubectl-migrate $VERSION" ]] || die "amd64 --version: $got"
# Static glibc resolves names without loading NSS modules: with an "API server" named localhost
# (a plain HTTP server answering 404), the plugin gets that server's answer; with a name that
# does not resolve, a connect error (the check can tell the two apart).
port=${KM_RELEASE_CHECK_PORT:-29401}
python3 -m http.server --bind 127.0.0.1 "$port" --directory "$check_dir/amd64" >/dev/null 2>&1 &
http_pid=$!
trap 'kill "$http_pid" 2>/dev/null || true; rm -rf "$check_dir"' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
plugin_against() { # server URL -> the plugin's answer to `list`
  cat >"$check_dir/kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters: [{ name: c, cluster: { server: "$1" } }]
users: [{ name: u, user: { token: t } }]
contexts: [{ name: c, context: { cluster: c, user: u, namespace: default } }]
current-context: c
YAML
  KUBECONFIG=$check_dir/kubeconfig "$check_dir/amd64/kubectl-migrate" list 2>&1 || true
}
got=$(plugin_against "http://localhost:$port")
echo "amd64, API server http://localhost:$port: $got"
[[ $got == *404* ]] || die "amd64: no answer from the server named localhost"
got=$(plugin_against "http://no-such-host.invalid:$port")
echo "amd64, API server http://no-such-host.invalid:$port: $got"
[[ $got != *404* ]] || die "amd64: an unresolvable name reached a server"
kill "$http_pid"
cp "$check_dir/arm64/kubectl-migrate" "$BUILD_ROOT/tmp/kubectl-migrate-arm64"
got=$(chroot "$BUILD_ROOT" qemu-aarch64 /tmp/kubectl-migrate-arm64 --version)
rm -f "$BUILD_ROOT/tmp/kubectl-migrate-arm64"
echo "arm64 (qemu-aarch64): $got"
[[ $got == "kubectl-migrate $VERSION" ]] || die "arm64 --version: $got"

step "krew manifest out/release/migrate.yaml from .krew.yaml"
python3 - "$TAG" "$OUT" <<'PY'
import hashlib, os, re, sys
tag, out = sys.argv[1], sys.argv[2]
text = open(".krew.yaml").read()
def uri_and_sha(m):
    url = m.group(2).replace("{{ .TagName }}", tag)
    path = os.path.join(out, url.rsplit("/", 1)[1])
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return f"{m.group(1)}uri: {url}\n{m.group(1)}sha256: {sha}"
text = re.sub(r'^( *)\{\{ *addURIAndSha "([^"]+)" \.TagName *\}\}$', uri_and_sha, text, flags=re.M)
text = text.replace("{{ .TagName }}", tag)
if "{{" in text:
    sys.exit("release: a template expression is left in the manifest")
body = "\n".join(l for l in text.splitlines() if not l.startswith("#")).lstrip() + "\n"
open(os.path.join(out, "migrate.yaml"), "w").write(body)
PY
grep -E '^ *(version|uri|sha256):' "$OUT/migrate.yaml"
VALIDATE=$(scripts/go-tool.sh sigs.k8s.io/krew/cmd/validate-krew-manifest "$KREW_VERSION")
"$VALIDATE" -manifest "$OUT/migrate.yaml" -skip-install

step "kubectl krew install --manifest --archive, then kubectl migrate --version"
KREW=$(scripts/go-tool.sh sigs.k8s.io/krew/cmd/krew "$KREW_VERSION")
KUBECTL=$(cluster/build-control-plane.sh --print-bindir | cut -d: -f1)/kubectl
[[ -x $KUBECTL ]] || KUBECTL=$(command -v kubectl) || die "kubectl is needed"
krew_root=$check_dir/krew
mkdir -p "$check_dir/path"
ln -s "$KREW" "$check_dir/path/kubectl-krew"
ln -s "$KUBECTL" "$check_dir/path/kubectl"
kpath=$krew_root/bin:$check_dir/path:/usr/bin:/bin
# --no-update-index: no git clone of the index (offline); the manifest and archive are local.
KREW_ROOT=$krew_root PATH=$kpath kubectl krew install --no-update-index \
  --manifest="$OUT/migrate.yaml" --archive="$OUT/kubectl-migrate_${TAG}_linux_amd64.tar.gz"
got=$(KREW_ROOT=$krew_root PATH=$kpath kubectl migrate --version)
echo "kubectl migrate --version: $got"
[[ $got == "kubectl-migrate $VERSION" ]] || die "the krew-installed plugin says: $got"
# The check can fail: one byte more in the archive and krew refuses it.
cp "$OUT/kubectl-migrate_${TAG}_linux_amd64.tar.gz" "$check_dir/tampered.tar.gz"
printf 'x' >>"$check_dir/tampered.tar.gz"
if KREW_ROOT=$check_dir/krew2 PATH=$kpath kubectl krew install --no-update-index \
  --manifest="$OUT/migrate.yaml" --archive="$check_dir/tampered.tar.gz" >"$check_dir/tampered.log" 2>&1; then
  die "krew installed a tampered archive"
fi
grep -m1 -o 'checksum does not match.*' "$check_dir/tampered.log" ||
  { cat "$check_dir/tampered.log" >&2; die "krew refused the tampered archive for another reason"; }
echo "ok: krew refuses an archive whose sha256 is not the manifest's"
echo "release: $OUT in $((SECONDS - START)) s"
