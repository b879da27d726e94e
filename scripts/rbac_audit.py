#!/usr/bin/env python3
"""Hold what kube-migrate's ServiceAccounts did against what manifests/rbac.yaml grants them.

Reads the API server's audit log of a local-cluster run (scripts/local-cluster.sh audits every
request of the kube-migrate namespace's ServiceAccounts at level Metadata) and prints, per
ServiceAccount, each granted verb on each resource as used (with the number of requests) or
unused, and every request the API server refused with 403. Grants that no request of ours
exercises, because another component checks them, are listed apart with who checks them.

  scripts/rbac_audit.py AUDIT_LOG [RBAC_YAML]      (default manifests/rbac.yaml)

Exits 1 when the authorizer refused a kube-migrate request (403 "User ... cannot ...": a missing
grant), else 0; other 403s (an admission plugin's, e.g. new content in a namespace being
deleted) are listed with their message but are not RBAC's. Unused grants
are reported, not failed: a run of the scenarios is not every path (scripts/e2e.sh prints this
after the scenarios; README "What the ServiceAccounts may do" explains each grant).
"""
import collections
import json
import sys

import yaml

NAMESPACE = "kube-migrate"
# Grants checked by another component on our behalf, never a request of ours.
INDIRECT = {
    ("", "nodes/checkpoint", "create"): "the kubelet (SubjectAccessReview for POST /checkpoint)",
    ("certificates.k8s.io", "signers", "approve"): "the API server's CSR approval admission",
    ("certificates.k8s.io", "signers", "sign"): "the API server's CSR signing admission",
    ("", "secrets", "create"): "the API server on a server-side apply that creates the Secret (a PATCH)",
    ("migrate.io", "podmigrations/finalizers", "update"):
        "OwnerReferencesPermissionEnforcement (blockOwnerDeletion on the pull Secrets), when enabled",
}


def grants(path):
    """{ServiceAccount: {(apiGroup, resource, verb)}} from the Roles/ClusterRoles bound to them."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    roles = {(d["kind"], d["metadata"]["name"]): d.get("rules", []) for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = collections.defaultdict(set)
    for d in docs:
        if d["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        rules = roles.get((d["roleRef"]["kind"], d["roleRef"]["name"]), [])
        for subject in d.get("subjects", []):
            if subject["kind"] != "ServiceAccount":
                continue
            for rule in rules:
                for group in rule.get("apiGroups", []):
                    for resource in rule.get("resources", []):
                        for verb in rule.get("verbs", []):
                            out[subject["name"]].add((group, resource, verb))
    return out


def requests(path):
    """Counter of (ServiceAccount, apiGroup, resource[/subresource], verb, code, why): `why` is
    the message of a 403 ("rbac" when the authorizer refused it), else empty."""
    seen = collections.Counter()
    prefix = f"system:serviceaccount:{NAMESPACE}:"
    with open(path) as f:
        for line in f:
            event = json.loads(line)
            user = event.get("user", {}).get("username", "")
            ref = event.get("objectRef")
            if not user.startswith(prefix) or not ref:
                continue
            resource = ref.get("resource", "")
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            status = event.get("responseStatus", {})
            code = status.get("code", 0)
            why = ""
            if code == 403:
                message = status.get("message", "")
                why = "rbac" if f'User "{user}" cannot' in message else message
            seen[(user[len(prefix):], ref.get("apiGroup", ""), resource, event["verb"], code, why)] += 1
    return seen


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    granted = grants(argv[2] if len(argv) > 2 else "manifests/rbac.yaml")
    seen = requests(argv[1])
    used = collections.Counter()
    refused, admission = [], []
    for (sa, group, resource, verb, code, why), n in seen.items():
        if code == 403 and why == "rbac":
            refused.append(f"{sa}: {verb} {group or 'core'}/{resource} ({n}x)")
        elif code == 403:
            admission.append(f"{sa}: {verb} {group or 'core'}/{resource} ({n}x): {why}")
        else:
            used[(sa, group, resource, verb)] += n
    for sa in sorted(granted):
        print(f"{sa}:")
        for group, resource, verb in sorted(granted[sa], key=lambda g: (g[1], g[0], g[2])):
            name = f"{verb:7} {group or 'core'}/{resource}"
            if (group, resource, verb) in INDIRECT:
                print(f"  indirect {name}: checked by {INDIRECT[(group, resource, verb)]}")
            elif used[(sa, group, resource, verb)]:
                print(f"  used     {name} ({used[(sa, group, resource, verb)]} requests)")
            else:
                print(f"  UNUSED   {name}: granted, no request in this run")
    print("refused by RBAC (403): " + ("none" if not refused else ""))
    for r in sorted(refused):
        print(f"  {r}")
    if admission:
        print("refused by admission, not RBAC (403):")
        for r in sorted(admission):
            print(f"  {r}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
