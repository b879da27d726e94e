"""Unit tests of scripts/rbac_audit.py (its reading of RBAC and audit events, and its verdict).

Run by scripts/test.sh: python3 -m unittest discover -s scripts -p 'test_*.py'
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import rbac_audit as r  # noqa: E402

RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: agent }
rules:
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "delete"]
  - apiGroups: [""]
    resources: ["nodes/checkpoint"]
    verbs: ["create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: agent }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agent }
subjects: [{ kind: ServiceAccount, name: kube-migrate-agent, namespace: kube-migrate }]
"""


def event(user, verb, resource, code, group=None, sub=None, message=None):
    ref = {"resource": resource}
    if group:
        ref["apiGroup"] = group
    if sub:
        ref["subresource"] = sub
    if code == 403 and message is None:
        message = f'{resource} is forbidden: User "{user}" cannot {verb} resource "{resource}"'
    status = {"code": code, "message": message} if message else {"code": code}
    return json.dumps({"user": {"username": user}, "verb": verb, "objectRef": ref, "responseStatus": status})


class RbacAuditTest(unittest.TestCase):
    def run_audit(self, events):
        with tempfile.TemporaryDirectory() as d:
            rbac, log = os.path.join(d, "rbac.yaml"), os.path.join(d, "audit.log")
            with open(rbac, "w") as f:
                f.write(RBAC)
            with open(log, "w") as f:
                f.write("\n".join(events) + "\n")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = r.main(["rbac_audit.py", log, rbac])
            return code, out.getvalue()

    def test_used_unused_indirect_and_refused(self):
        agent = "system:serviceaccount:kube-migrate:kube-migrate-agent"
        code, out = self.run_audit([
            event(agent, "get", "pods", 200),
            event(agent, "get", "pods", 404),
            event("system:serviceaccount:other:x", "list", "secrets", 403),
            event(agent, "create", "certificatesigningrequests", 403, group="certificates.k8s.io"),
        ])
        self.assertIn("used     get     core/pods (2 requests)", out)
        self.assertIn("UNUSED   delete  core/pods", out)
        self.assertIn("indirect create  core/nodes/checkpoint: checked by the kubelet", out)
        self.assertIn("kube-migrate-agent: create certificates.k8s.io/certificatesigningrequests (1x)", out)
        self.assertNotIn("secrets", out, "other namespaces' accounts are not ours")
        self.assertEqual(code, 1)

    def test_nothing_refused_by_rbac_passes(self):
        agent = "system:serviceaccount:kube-migrate:kube-migrate-agent"
        terminating = "unable to create new content in namespace x because it is being terminated"
        code, out = self.run_audit([
            event(agent, "get", "pods", 200),
            event(agent, "get", "pods", 403, message=terminating),
        ])
        self.assertIn("refused by RBAC (403): none", out)
        self.assertIn(f"kube-migrate-agent: get core/pods (1x): {terminating}", out)
        self.assertEqual(code, 0)


if __name__ == "__main__":
    unittest.main()
