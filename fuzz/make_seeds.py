#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/ (docs/fuzzing.md).

Run from anywhere: python3 fuzz/make_seeds.py. Deterministic: the same files every time
(fixed mtimes), so a re-run shows no diff unless this script changed.

* admission_review: the AdmissionReviews of tests/data/admission, plus evictions whose
  oldObject carries the pod (the target takes the cluster's side from the body) and pod
  CREATEs of opted-in pods, restored pods and a stale drain retry.
* tar_validator: one flag byte (docs in fuzz_targets/tar_validator.rs) + a small checkpoint
  archive in the CRI-O layout (as tests/common/mod.rs writes it), with a nested
  rootfs-diff.tar, PAX and GNU long names; rootfs-mode trees; and a few refused ones.
* registry_path: `<method byte><request target>\\n<Authorization>` for the fixture's
  migration m1 (password "secret").
"""

import base64
import copy
import hashlib
import io
import json
import pathlib
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent
DATA = ROOT.parent / "tests" / "data"
SEEDS = ROOT / "seeds"


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def admission():
    for path in sorted((DATA / "admission").iterdir()):
        write("admission_review", path.stem, path.read_bytes())
    eviction = json.loads((DATA / "admission" / "eviction-stateful.json").read_text())
    pods = {p.stem: json.loads(p.read_text()) for p in sorted((DATA / "objects").iterdir())}
    for name, pod in pods.items():
        for uid_suffix in ["1", "22", "333"]:
            review = copy.deepcopy(eviction)
            req = review["request"]
            req["uid"] += uid_suffix
            req["name"] = pod["metadata"]["name"]
            req["oldObject"] = pod
            write("admission_review", f"eviction-with-{name}-{uid_suffix}", json.dumps(review).encode())
    create = json.loads((DATA / "admission" / "pod-create-statefulset.json").read_text())
    for name, pod in pods.items():
        review = copy.deepcopy(create)
        review["request"]["object"] = pod
        review["request"]["name"] = pod["metadata"]["name"]
        write("admission_review", f"create-{name}", json.dumps(review).encode())
        restored = copy.deepcopy(pod)
        annotations = restored["metadata"].setdefault("annotations", {})
        annotations["migrate.io/restore-of"] = "db-0-0c9a8d74"
        annotations["migrate.io/on-failure"] = "block"
        restored["metadata"]["uid"] = "11111111-2222-4333-8444-555555555555"
        review["request"]["object"] = restored
        write("admission_review", f"create-restored-{name}", json.dumps(review).encode())


def tar_bytes(members, fmt=tarfile.GNU_FORMAT):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for name, kind, body, link in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_800_000_000
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o600
            info.type = kind
            info.linkname = link
            info.size = len(body)
            t.addfile(info, io.BytesIO(body) if body else None)
    return out.getvalue()


def f(name, body=b""):
    return (name, tarfile.REGTYPE, body, "")


def checkpoint(rootfs=b"", extra=(), fmt=tarfile.GNU_FORMAT):
    config = json.dumps({"id": "3f2a", "name": "app", "rootfsImageName": "registry.local/app:1",
                         "rootfsImageRef": "sha256:0000", "runtime": "crun"}).encode()
    return tar_bytes([
        f("config.dump", config),
        f("spec.dump", b'{"ociVersion":"1.0.2","mounts":[]}'),
        ("checkpoint", tarfile.DIRTYPE, b"", ""),
        f("checkpoint/inventory.img", b"criu-inventory"),
        f("checkpoint/pages-1.img", bytes((i * 7) % 251 for i in range(1500))),
        f("rootfs-diff.tar", rootfs or b"\0" * 1024),
        f("dump.log", b"dump finished\n"),
        *extra,
    ], fmt)


def tar():
    tree = tar_bytes([
        ("etc", tarfile.DIRTYPE, b"", ""),
        f("etc/hosts", b"127.0.0.1 localhost\n"),
        ("etc/localtime", tarfile.SYMTYPE, b"", "/usr/share/zoneinfo/UTC"),
        ("etc/link", tarfile.LNKTYPE, b"", "etc/hosts"),
        ("etc/rel", tarfile.SYMTYPE, b"", "hosts"),
        f("data/" + "d" * 120 + "/file", b"long name"),
    ])
    pax_tree = tar_bytes([f("p/" + "q" * 150, b"pax"), ("p/l", tarfile.SYMTYPE, b"", "q" * 150)],
                         tarfile.PAX_FORMAT)
    # Flag byte: bit 0 rootfs mode, bit 1 unpack, bits 3.. chunking seed.
    write("tar_validator", "checkpoint", b"\x00" + checkpoint())
    write("tar_validator", "checkpoint-unpack", b"\x0a" + checkpoint())
    write("tar_validator", "checkpoint-rootfs-diff", b"\x12" + checkpoint(tree))
    write("tar_validator", "checkpoint-pax", b"\x20" + checkpoint(pax_tree, fmt=tarfile.PAX_FORMAT))
    write("tar_validator", "rootfs-tree", b"\x03" + tree)
    write("tar_validator", "rootfs-pax", b"\x0b" + pax_tree)
    write("tar_validator", "refused-dotdot", b"\x00" + checkpoint(extra=[f("../escape", b"x")]))
    write("tar_validator", "refused-link-out", b"\x01" + tar_bytes([("l", tarfile.SYMTYPE, b"", "../..")]))
    write("tar_validator", "refused-through-link", b"\x03" + tar_bytes(
        [("a", tarfile.SYMTYPE, b"", "b"), ("b", tarfile.DIRTYPE, b"", ""), f("a/x", b"x")]))
    # The escape fixed with these targets: `l -> x/..`, then `x -> .` (docs/fuzzing.md).
    write("tar_validator", "refused-link-walk", b"\x03" + tar_bytes(
        [("l", tarfile.SYMTYPE, b"", "x/.."), ("x", tarfile.SYMTYPE, b"", ".")]))
    write("tar_validator", "truncated", b"\x00" + checkpoint()[:3000])
    # Structured mode (bit 2): the rest is decoded by `arbitrary`, any bytes will do.
    write("tar_validator", "structured", b"\x04" + bytes(range(256)))
    write("tar_validator", "structured-unpack", b"\x06" + bytes(range(255, -1, -1)) * 2)


def registry():
    good = "Basic " + base64.b64encode(b"kube-migrate:secret").decode()
    wrong = "Basic " + base64.b64encode(b"kube-migrate:guess").decode()
    seeds = {
        "ping": (0, "/v2/", good),
        "manifest-tag": (0, "/v2/kube-migrate/m1/manifests/app", good),
        "manifest-head": (1, "/v2/kube-migrate/m1/manifests/app", good),
        "blob": (0, "/v2/kube-migrate/m1/blobs/sha256:" + hashlib.sha256(b"layer bytes").hexdigest(), good),
        "blob-unknown": (1, "/v2/kube-migrate/m1/blobs/sha256:" + "0" * 64, good),
        "wrong-password": (0, "/v2/kube-migrate/m1/manifests/app", wrong),
        "anonymous": (0, "/v2/kube-migrate/m1/manifests/app", None),
        "other-id": (0, "/v2/kube-migrate/m2/manifests/app", good),
        "traversal": (0, "/v2/kube-migrate/m1/blobs/..%2F..%2Frecord.json", good),
        "encoded-id": (0, "/v2/kube-migrate/%6d1/manifests/app?x=1", good),
        "not-ours": (0, "/v2/library/busybox/manifests/latest", good),
    }
    for name, (method, target, auth) in seeds.items():
        data = bytes([method]) + target.encode()
        if auth is not None:
            data += b"\n" + auth.encode()
        write("registry_path", name, data)


if __name__ == "__main__":
    admission()
    tar()
    registry()
