#!/usr/bin/env python3
"""Write a one-binary container image as an OCI image layout and an oci-archive of it.

  oci-image.py --binary out/bin/NAME --name NAME --version V --repo ghcr.io/ORG \
               --source URL --user UID:GID --out out/images
writes out/images/NAME/ (layout, tagged V) and out/images/NAME.oci.tar, and prints the manifest
digest and the compressed size (manifest + config + layer bytes, what a registry stores).

Why a script and not buildah/umoci/docker: the build machines have no container engine and none
of those tools, and an image of one static binary is one tar layer plus three JSON documents.
Writing them here (standard library only) keeps the build to cargo + python3, and makes the
output depend only on the binary and the arguments: sorted entries, root-owned, mtimes
SOURCE_DATE_EPOCH, gzip without name or time, canonical JSON. The same binary gives the same
digests (same zlib: gzip output may differ with another zlib build). skopeo (from Debian) checks
the result and copies it to registries or a node's containers-storage.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import time

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# The users the images may run as: 65532 "nonroot" (the webhook, manifests/webhook.yaml
# runAsUser 65532) and root (the agent, runAsUser 0: kubelet checkpoint archives are root 0600).
# Only for tools that map ids to names; the binaries need no other file (no CA bundle: the API
# server's and, by default, the kubelet's CA come from the service account, the agents' CA from
# the mounted Secret).
PASSWD = b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n"
GROUP = b"root:x:0:\nnonroot:x:65532:\n"


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(entries, mtime):
    """A tar of (path, mode, bytes or None for a directory), in path order, owned by root."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, mode, data in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(path)
            info.mode, info.mtime = mode, mtime
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_bytes(data):
    buf = io.BytesIO()
    # filename="" and mtime=0: the gzip header would otherwise carry the file name and the time.
    with gzip.GzipFile(filename="", fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def image_files(binary, name, version, repo, source, user, epoch):
    """The files of the OCI layout (path -> bytes) and the manifest digest."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    entry = f"/usr/local/bin/{name}"
    layer_tar = tar_bytes(
        [
            ("etc", 0o755, None),
            ("etc/group", 0o644, GROUP),
            ("etc/passwd", 0o644, PASSWD),
            ("usr", 0o755, None),
            ("usr/local", 0o755, None),
            ("usr/local/bin", 0o755, None),
            (entry.lstrip("/"), 0o755, binary),
        ],
        epoch,
    )
    layer = gzip_bytes(layer_tar)
    labels = {
        "org.opencontainers.image.source": source,
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.version": version,
    }
    config = canonical(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {
                "User": user,
                "Entrypoint": [entry],
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
            "history": [{"created": created, "created_by": "scripts/oci-image.py"}],
        }
    )
    manifest = canonical(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": LAYER, "digest": sha256(layer), "size": len(layer)}],
            "annotations": {**labels, "org.opencontainers.image.created": created},
        }
    )
    index = canonical(
        {
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": [
                {
                    "mediaType": MANIFEST,
                    "digest": sha256(manifest),
                    "size": len(manifest),
                    # ref.name is what `oci:DIR:TAG` selects; `ctr images import` names the
                    # image from io.containerd.image.name.
                    "annotations": {
                        "io.containerd.image.name": f"{repo}/{name}:{version}",
                        "org.opencontainers.image.ref.name": version,
                    },
                }
            ],
        }
    )
    files = {
        "oci-layout": canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": index,
    }
    for blob in (layer, config, manifest):
        files["blobs/sha256/" + sha256(blob).split(":", 1)[1]] = blob
    return files, sha256(manifest)


def archive_bytes(files, epoch):
    """The oci-archive: the layout as a tar, directories included."""
    dirs = [("blobs", 0o755, None), ("blobs/sha256", 0o755, None)]
    return tar_bytes(dirs + [(path, 0o644, data) for path, data in files.items()], epoch)


def write(files, epoch, out, name):
    # Start from an empty directory: blobs of an earlier build must not linger in the layout.
    layout = os.path.join(out, name)
    shutil.rmtree(layout, ignore_errors=True)
    for path, data in files.items():
        full = os.path.join(layout, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
    with open(os.path.join(out, f"{name}.oci.tar"), "wb") as f:
        f.write(archive_bytes(files, epoch))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--user", required=True, help="image config User, UID:GID")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    with open(args.binary, "rb") as f:
        binary = f.read()
    files, digest = image_files(
        binary, args.name, args.version, args.repo, args.source, args.user, epoch
    )
    os.makedirs(args.out, exist_ok=True)
    write(files, epoch, args.out, args.name)
    size = sum(len(d) for p, d in files.items() if p.startswith("blobs/"))
    print(digest, size)


if __name__ == "__main__":
    main()
