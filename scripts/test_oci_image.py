"""Unit tests of scripts/oci-image.py (standard library only):
    python3 -m unittest discover -s scripts -p 'test_*.py'
"""

import gzip
import hashlib
import importlib.util
import io
import json
import os
import tarfile
import tempfile
import unittest

_spec = importlib.util.spec_from_file_location(
    "oci_image", os.path.join(os.path.dirname(os.path.abspath(__file__)), "oci-image.py")
)
oci = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oci)

BINARY = b"\x7fELF" + bytes(range(256)) * 64
EPOCH = 1_700_000_000


def build(binary=BINARY, epoch=EPOCH, user="65532:65532"):
    return oci.image_files(
        binary, "km-test", "1.2.3", "registry.test/org", "https://src.test", user, epoch
    )


def blob(files, digest):
    algo, hexdigest = digest.split(":")
    assert algo == "sha256"
    data = files["blobs/sha256/" + hexdigest]
    assert hashlib.sha256(data).hexdigest() == hexdigest, digest
    return data


class LayoutTest(unittest.TestCase):
    def test_index_manifest_config_layer_chain(self):
        files, digest = build()
        self.assertEqual(json.loads(files["oci-layout"]), {"imageLayoutVersion": "1.0.0"})
        index = json.loads(files["index.json"])
        self.assertEqual(index["schemaVersion"], 2)
        [desc] = index["manifests"]
        self.assertEqual(desc["digest"], digest)
        self.assertEqual(desc["annotations"]["org.opencontainers.image.ref.name"], "1.2.3")
        self.assertEqual(
            desc["annotations"]["io.containerd.image.name"], "registry.test/org/km-test:1.2.3"
        )
        manifest_bytes = blob(files, desc["digest"])
        self.assertEqual(len(manifest_bytes), desc["size"])
        manifest = json.loads(manifest_bytes)
        self.assertEqual(manifest["mediaType"], oci.MANIFEST)
        self.assertEqual(manifest["config"]["mediaType"], oci.CONFIG)
        config_bytes = blob(files, manifest["config"]["digest"])
        self.assertEqual(len(config_bytes), manifest["config"]["size"])
        [layer_desc] = manifest["layers"]
        self.assertEqual(layer_desc["mediaType"], oci.LAYER)
        layer = blob(files, layer_desc["digest"])
        self.assertEqual(len(layer), layer_desc["size"])

        config = json.loads(config_bytes)
        self.assertEqual((config["os"], config["architecture"]), ("linux", "amd64"))
        self.assertEqual(config["config"]["User"], "65532:65532")
        self.assertEqual(config["config"]["Entrypoint"], ["/usr/local/bin/km-test"])
        # diff_id: the digest of the uncompressed layer.
        uncompressed = gzip.decompress(layer)
        self.assertEqual(config["rootfs"]["diff_ids"], [oci.sha256(uncompressed)])
        # No blob the manifest does not reference.
        blobs = {p for p in files if p.startswith("blobs/")}
        self.assertEqual(len(blobs), 3)

    def test_layer_entries(self):
        files, digest = build()
        manifest = json.loads(blob(files, digest))
        layer = gzip.decompress(blob(files, manifest["layers"][0]["digest"]))
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            self.assertEqual(names, sorted(names))
            for m in members:
                self.assertEqual((m.uid, m.gid, m.mtime), (0, 0, EPOCH), m.name)
            binary = tar.getmember("usr/local/bin/km-test")
            self.assertEqual(binary.mode, 0o755)
            self.assertEqual(tar.extractfile(binary).read(), BINARY)
            passwd = tar.extractfile("etc/passwd").read().decode()
            self.assertIn("nonroot:x:65532:65532:", passwd)

    def test_reproducible(self):
        self.assertEqual(build(), build())
        self.assertNotEqual(build()[1], build(epoch=EPOCH + 1)[1])
        self.assertNotEqual(build()[1], build(binary=BINARY + b"x")[1])
        self.assertNotEqual(build()[1], build(user="0:0")[1])

    def test_written_layout_and_archive(self):
        files, _ = build()
        with tempfile.TemporaryDirectory() as out:
            stale = os.path.join(out, "km-test", "blobs", "sha256", "0" * 64)
            os.makedirs(os.path.dirname(stale))
            open(stale, "wb").close()
            oci.write(files, EPOCH, out, "km-test")
            on_disk = {}
            for root, _, names in os.walk(os.path.join(out, "km-test")):
                for n in names:
                    path = os.path.join(root, n)
                    with open(path, "rb") as f:
                        on_disk[os.path.relpath(path, os.path.join(out, "km-test"))] = f.read()
            self.assertEqual(on_disk, files)
            with open(os.path.join(out, "km-test.oci.tar"), "rb") as f:
                archive = f.read()
            self.assertEqual(archive, oci.archive_bytes(files, EPOCH))
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            self.assertEqual(got, files)


if __name__ == "__main__":
    unittest.main()
