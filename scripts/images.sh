#!/usr/bin/env bash
# Builds the product images (README "Images") without a container engine:
#   1. static release binaries of kube-migrate-webhook and kube-migrate-agent (glibc, crt-static),
#      stripped, checked with file/ldd and --help
#   2. each as an OCI image layout out/images/NAME/ (tag = crate version) and an oci-archive
#      out/images/NAME.oci.tar (scripts/oci-image.py)
#   3. reproducibility: both images written a second time from the same binaries, into
#      out/images-again/; digests and archive bytes must be equal
#   4. skopeo inspect of both (skopeo installed from Debian's archive if missing)
#   5. overlays/images/kustomization.yaml rewritten to pin both digests (outside manifests/:
#      kustomize refuses an overlay inside its base's directory), rendered with kubectl
#      kustomize (cluster/build-control-plane.sh's cached kubectl if there, else PATH's) and
#      checked: exactly the two images, digest-pinned
# Image users follow the manifests: webhook 65532:65532 (webhook.yaml runAsNonRoot, runAsUser
# 65532), agent 0:0 (agent.yaml runAsUser 0: kubelet checkpoint archives are root 0600).
# Env: IMAGE_REPO (default ghcr.io/kube-migrate), IMAGE_SOURCE (source label),
#      SOURCE_DATE_EPOCH (image timestamps, default 0), CARGO_TARGET_DIR (default target/).
set -euo pipefail
# Absolute before the cd: a relative CARGO_TARGET_DIR names a directory under the caller's cwd.
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$(dirname "$0")/../target}")
cd "$(dirname "$0")/.."
ROOT=$PWD

step() { printf '\n==> %s\n' "$*"; }

REPO=${IMAGE_REPO:-ghcr.io/kube-migrate}
SOURCE=${IMAGE_SOURCE:-https://github.com/kube-migrate/kube-migrate}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
TARGET=x86_64-unknown-linux-gnu
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
NAMES=(kube-migrate-webhook kube-migrate-agent)
declare -A USER_OF=([kube-migrate-webhook]=65532:65532 [kube-migrate-agent]=0:0)
START=$SECONDS
OUT=$ROOT/out
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]["version"])')

KUBECTL=$(cluster/build-control-plane.sh --print-bindir | cut -d: -f1)/kubectl
[ -x "$KUBECTL" ] || KUBECTL=$(command -v kubectl) ||
  { echo "kubectl is needed" >&2 && exit 1; }

for tool in file strip skopeo; do
  if ! command -v "$tool" >/dev/null; then
    pkg=$tool && [ "$tool" = strip ] && pkg=binutils
    step "installing $pkg (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" ||
      { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg"; }
  fi
done

step "cargo build --release (static, $TARGET) ${NAMES[*]} $VERSION"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros (they stay dynamic).
# The path remaps keep the checkout, the target dir (generated sources) and cargo home out of
# panic messages, so the binary (and the image digest) does not depend on where the repository
# was cloned or built (rustc applies the last matching remap: the target dir may be inside).
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$ROOT=. --remap-path-prefix=$TARGET_DIR=/target --remap-path-prefix=$CARGO_HOME=/cargo" \
  CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --target "$TARGET" --locked \
  -p kube-migrate-webhook -p kube-migrate-agent
echo "cargo build: $((SECONDS - START)) s"

step "strip, check static, --help"
mkdir -p "$OUT/bin" "$OUT/images"
for name in "${NAMES[@]}"; do
  bin=$OUT/bin/$name
  strip --strip-all -o "$bin" "$TARGET_DIR/$TARGET/release/$name"
  kind=$(file -b "$bin")
  echo "$name: $kind"
  case $kind in
    *static-pie\ linked* | *statically\ linked*) ;;
    *) echo "$name is not static" >&2 && exit 1 ;;
  esac
  # ldd exits non-zero on a non-dynamic executable; any listed library would be a failure.
  libs=$(ldd "$bin" 2>&1 || true)
  echo "  ldd: $libs"
  if grep -q '=>' <<<"$libs"; then echo "$name links shared libraries" >&2 && exit 1; fi
  "$bin" --help >/dev/null
  echo "  --help: ok, $(stat -c %s "$bin") bytes"
done

write_image() { # NAME OUTDIR -> "DIGEST SIZE"
  python3 scripts/oci-image.py --binary "$OUT/bin/$1" --name "$1" --version "$VERSION" \
    --repo "$REPO" --source "$SOURCE" --user "${USER_OF[$1]}" --out "$2"
}

step "OCI layouts and oci-archives in out/images/"
declare -A DIGEST
for name in "${NAMES[@]}"; do
  out=$(write_image "$name" "$OUT/images")
  read -r digest size <<<"$out"
  DIGEST[$name]=$digest
  echo "$REPO/$name:$VERSION  $digest  user ${USER_OF[$name]}"
  echo "  compressed (manifest+config+layer): $size bytes ($((size / 1024)) KiB)"
  # The target: under 30 MiB.
  if [ "$size" -ge $((30 * 1024 * 1024)) ]; then echo "$name: image over 30 MiB" >&2 && exit 1; fi
done

step "reproducible: written again into out/images-again/, compared"
mkdir -p "$OUT/images-again"
for name in "${NAMES[@]}"; do
  read -r again _ <<<"$(write_image "$name" "$OUT/images-again")"
  a=$(sha256sum <"$OUT/images/$name.oci.tar" | cut -d' ' -f1)
  b=$(sha256sum <"$OUT/images-again/$name.oci.tar" | cut -d' ' -f1)
  echo "$name: manifest ${DIGEST[$name]} / $again; archive sha256 $a / $b"
  [ "$again" = "${DIGEST[$name]}" ] && [ "$a" = "$b" ] ||
    { echo "$name: second build differs" >&2 && exit 1; }
done

step "skopeo inspect"
for name in "${NAMES[@]}"; do
  skopeo inspect "oci:out/images/$name:$VERSION"
  # The archive must resolve to the same manifest as the layout it was made from.
  got=$(skopeo inspect --format '{{.Digest}}' "oci-archive:out/images/$name.oci.tar:$VERSION")
  [ "$got" = "${DIGEST[$name]}" ] || { echo "oci-archive of $name: $got != ${DIGEST[$name]}" >&2 && exit 1; }
  echo "oci-archive:out/images/$name.oci.tar:$VERSION -> $got"
done

step "overlays/images (digests pinned)"
overlay=overlays/images
mkdir -p "$overlay"
{
  echo "# Written by scripts/images.sh: the base manifests with the images it built, pinned by"
  echo "# digest (push them under these names first, README \"Images\")."
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources:"
  echo "  - ../../manifests"
  echo "images:"
  for name in "${NAMES[@]}"; do
    # name: the image as the base manifests write it (manifests/webhook.yaml, agent.yaml).
    echo "  - name: $name"
    echo "    newName: $REPO/$name"
    echo "    digest: ${DIGEST[$name]}"
  done
} >"$overlay/kustomization.yaml"
cat "$overlay/kustomization.yaml"
echo "rendered with $KUBECTL kustomize $overlay:"
rendered=$("$KUBECTL" kustomize "$overlay")
images=$(grep -E '^\s+image: ' <<<"$rendered" | sed 's/^ *//' | sort -u)
echo "$images"
expected=$(for name in "${NAMES[@]}"; do echo "image: $REPO/$name@${DIGEST[$name]}"; done | sort)
[ "$images" = "$expected" ] ||
  { echo "kubectl kustomize $overlay: images are not exactly the two pinned ones" >&2 && exit 1; }

step "done in $((SECONDS - START)) s"
for name in "${NAMES[@]}"; do
  echo "$name: binary $(stat -c %s "$OUT/bin/$name") bytes, out/images/$name.oci.tar" \
    "$(stat -c %s "$OUT/images/$name.oci.tar") bytes, ${DIGEST[$name]}"
done
echo "publish: skopeo copy oci-archive:out/images/NAME.oci.tar docker://$REPO/NAME:$VERSION" \
  "(another registry: IMAGE_REPO=REGISTRY scripts/images.sh first, README \"Images\")"
