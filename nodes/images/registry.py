#!/usr/bin/env python3
"""A read-only OCI distribution endpoint over TLS for one OCI archive, for the smoke test's pull
path (the kube-migrate agent's registry does this in the product): CRI-O in a node pulls
https://ADDR/v2/NAME/manifests/TAG, then the blobs.

  registry.py --listen 127.0.0.1:5444 --cert C --key K --archive FILE.oci.tar --name N --tag T
"""
import argparse, hashlib, http.server, json, os, ssl, tarfile, tempfile

p = argparse.ArgumentParser()
p.add_argument("--listen", required=True)
p.add_argument("--cert", required=True)
p.add_argument("--key", required=True)
p.add_argument("--archive", required=True)
p.add_argument("--name", required=True)
p.add_argument("--tag", required=True)
a = p.parse_args()

layout = tempfile.mkdtemp(prefix="registry.")
with tarfile.open(a.archive) as t:
    t.extractall(layout)
index = json.load(open(os.path.join(layout, "index.json")))
manifest_desc = index["manifests"][0]

def blob_path(digest):
    algo, hexd = digest.split(":", 1)
    return os.path.join(layout, "blobs", algo, hexd)

class H(http.server.BaseHTTPRequestHandler):
    def send(self, code, body=b"", ctype="application/json", digest=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        if digest:
            self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path in ("/v2/", "/v2"):
            return self.send(200, b"{}")
        prefix = "/v2/%s/" % a.name
        if not path.startswith(prefix):
            return self.send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')
        kind, _, ref = path[len(prefix):].partition("/")
        if kind == "manifests" and ref in (a.tag, manifest_desc["digest"]):
            body = open(blob_path(manifest_desc["digest"]), "rb").read()
            return self.send(200, body, manifest_desc["mediaType"], manifest_desc["digest"])
        if kind == "blobs" and os.path.exists(blob_path(ref)) and ref.startswith("sha256:"):
            body = open(blob_path(ref), "rb").read()
            assert "sha256:" + hashlib.sha256(body).hexdigest() == ref
            return self.send(200, body, "application/octet-stream", ref)
        return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')

    do_HEAD = do_GET

    def log_message(self, fmt, *args):
        print("registry: " + fmt % args, flush=True)

host, port = a.listen.rsplit(":", 1)
srv = http.server.ThreadingHTTPServer((host, int(port)), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(a.cert, a.key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("serving %s:%s on https://%s" % (a.name, a.tag, a.listen), flush=True)
srv.serve_forever()
