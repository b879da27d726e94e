#!/usr/bin/env python3
"""Write a single-layer OCI image as an oci-archive (a tar of an OCI image layout), without Docker,
buildah or a registry: what `skopeo copy oci-archive:FILE containers-storage:REF` loads into a node.

  oci-archive.py --out FILE --ref NAME:TAG (--dir DIR | --layer-tar TAR) [--entrypoint ARG]...
                 [--cmd ARG]... [--env K=V]... [--annotation K=V]...

--dir DIR        the layer is DIR's tree at / (owner root, mtimes kept: reproducible for one DIR)
--layer-tar TAR  the layer is TAR as it is (uncompressed): e.g. a kubelet checkpoint archive, whose
                 files then sit at / as CRI-O's restore expects
--annotation     manifest annotations (CRI-O reads io.kubernetes.cri-o.annotations.checkpoint.name
                 from the manifest to recognise a checkpoint image)
"""
import argparse, hashlib, io, json, os, shutil, tarfile, tempfile

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--ref", required=True)
g = p.add_mutually_exclusive_group(required=True)
g.add_argument("--dir")
g.add_argument("--layer-tar")
p.add_argument("--entrypoint", action="append", default=[])
p.add_argument("--cmd", action="append", default=[])
p.add_argument("--env", action="append", default=[])
p.add_argument("--annotation", action="append", default=[])
a = p.parse_args()

work = tempfile.mkdtemp(prefix="oci-archive.")
blobs = os.path.join(work, "blobs", "sha256")
os.makedirs(blobs)

def add_blob(path_or_bytes):
    """Store a blob; returns (digest, size)."""
    h = hashlib.sha256()
    tmp = os.path.join(work, "blob.tmp")
    if isinstance(path_or_bytes, bytes):
        h.update(path_or_bytes)
        with open(tmp, "wb") as f:
            f.write(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as src, open(tmp, "wb") as f:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk); f.write(chunk)
    d = h.hexdigest()
    os.replace(tmp, os.path.join(blobs, d))
    return "sha256:" + d, os.path.getsize(os.path.join(blobs, d))

if a.dir:
    layer = os.path.join(work, "layer.tar")
    def owner_root(ti):
        ti.uid = ti.gid = 0; ti.uname = ti.gname = "root"
        return ti
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
        for name in sorted(os.listdir(a.dir)):
            t.add(os.path.join(a.dir, name), arcname=name, filter=owner_root)
    layer_digest, layer_size = add_blob(layer)
    os.remove(layer)
else:
    layer_digest, layer_size = add_blob(a.layer_tar)

config = {
    "architecture": "amd64", "os": "linux",
    "config": {"Env": a.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
    # uncompressed layer: its diff ID is its digest
    "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
}
if a.entrypoint: config["config"]["Entrypoint"] = a.entrypoint
if a.cmd: config["config"]["Cmd"] = a.cmd
cfg_digest, cfg_size = add_blob(json.dumps(config, sort_keys=True).encode())

manifest = {
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
}
if a.annotation:
    manifest["annotations"] = dict(kv.split("=", 1) for kv in a.annotation)
man_digest, man_size = add_blob(json.dumps(manifest, sort_keys=True).encode())

index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_digest, "size": man_size,
     "annotations": {"org.opencontainers.image.ref.name": a.ref}}]}
with open(os.path.join(work, "index.json"), "w") as f:
    json.dump(index, f)
with open(os.path.join(work, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)

tmp_out = a.out + ".tmp"
with tarfile.open(tmp_out, "w") as t:
    for name in ("oci-layout", "index.json", "blobs"):
        t.add(os.path.join(work, name), arcname=name)
os.replace(tmp_out, a.out)
shutil.rmtree(work)
print(a.out)
