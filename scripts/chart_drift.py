#!/usr/bin/env python3
"""The Helm chart against the kustomize manifests (scripts/check-helm.sh, step 4).

  chart_drift.py NAME KUSTOMIZE.yaml CHART.yaml
      Every object of `kubectl kustomize NAME` must be in the chart's render (`helm template
      --include-crds`) with the same content, and the chart must render nothing else, except
      the documented differences below. Prints one `DRIFT: ...` line per difference and exits 1.

  chart_drift.py --all-on CHART.yaml PROMETHEUSRULE.yaml
      A render with cert-manager, monitoring and every optional value set (check-helm.sh
      step 3): the values reach the objects they are meant for.

Documented differences (docs/design-notes.md, "Helm chart"):
  * Helm's labels on every object's metadata (HELM_LABELS below): stripped before comparing.
    Selectors and pod templates carry none, so they are compared as they are.
  * The Namespace is not in the chart: `helm install -n kube-migrate --create-namespace` makes
    it, before the release's objects (Helm keeps the release record in it). The kustomize
    Namespace's label migrate.io/system is read by nothing.
"""
import sys

import yaml

HELM_LABELS = {
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
ONLY_IN_KUSTOMIZE = {("Namespace", "kube-migrate")}


def load(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    objects = {}
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        if key in objects:
            sys.exit(f"{path}: {key[0]}/{key[1]} twice")
        objects[key] = d
    return objects


def strip_helm(obj):
    labels = obj["metadata"].get("labels")
    if labels is not None:
        for k in HELM_LABELS & set(labels):
            del labels[k]
        if not labels:
            del obj["metadata"]["labels"]
    return obj


def differences(a, b, path=""):
    """Paths where a (kustomize) and b (chart) differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}"
            if k not in b:
                out.append(f"{p}: only in kustomize ({a[k]!r})")
            elif k not in a:
                out.append(f"{p}: only in the chart ({b[k]!r})")
            else:
                out += differences(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: kustomize {a!r}, chart {b!r}"]


def compare(name, kustomize_path, chart_path):
    kustomize = load(kustomize_path)
    chart = {k: strip_helm(v) for k, v in load(chart_path).items()}
    drift = []
    for key in sorted(set(kustomize) | set(chart)):
        label = f"{key[0]}/{key[1]}"
        if key not in chart:
            if key not in ONLY_IN_KUSTOMIZE:
                drift.append(f"{label}: in kubectl kustomize {name}, not in the chart")
        elif key not in kustomize:
            drift.append(f"{label}: in the chart's default render, not in kubectl kustomize {name}")
        else:
            drift += [f"{label} {d}" for d in differences(kustomize[key], chart[key])]
    for d in drift:
        print(f"DRIFT: {d}")
    if drift:
        print(f"chart_drift: the chart differs from kubectl kustomize {name} ({len(drift)} differences);"
              " change both (manifests/ is the source) or document the difference in scripts/chart_drift.py")
        return 1
    same = len(set(kustomize) & set(chart))
    only = ", ".join(f"{k}/{n}" for k, n in sorted(set(kustomize) - set(chart)))
    print(f"ok: kubectl kustomize {name} = the chart: {same} objects equal; not in the chart (documented): {only}")
    return 0


def env_of(obj):
    c = obj["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in c.get("env", [])}, c.get("args", [])


def all_on(chart_path, rule_path):
    objs = load(chart_path)
    problems = []

    def expect(cond, what):
        if not cond:
            problems.append(what)

    env, _ = env_of(objs[("Deployment", "kube-migrate-webhook")])
    want = {
        "KM_MAX_PER_NODE": "3", "KM_MAX_TOTAL": "20", "KM_PENDING_DEADLINE_SECONDS": "600",
        "KM_CHECKPOINT_DEADLINE_SECONDS": "120", "KM_TRANSFER_DEADLINE_SECONDS": "1800",
        "KM_IMAGE_DEADLINE_SECONDS": "200", "KM_RESTORING_DEADLINE_SECONDS": "100",
        "KM_RESTORE_DEADLINE_SECONDS": "900", "KM_CHECKPOINT_TIMEOUT_SECONDS": "200",
        "KM_SOURCE_GRACE_PERIOD_SECONDS": "2", "KM_FREEZE_SOURCE": "false", "KM_SHUTDOWN_DELAY_SECONDS": "7",
    }
    for k, v in want.items():
        expect(env.get(k) == v, f"webhook env {k}={env.get(k)!r}, want {v!r}")
    expect(objs[("Deployment", "kube-migrate-webhook")]["spec"]["replicas"] == 3, "webhook replicas")
    agent_env, agent_args = env_of(objs[("DaemonSet", "kube-migrate-agent")])
    expect(agent_env.get("KM_RETENTION_SECONDS") == "3600", "agent KM_RETENTION_SECONDS")
    expect(agent_env.get("KM_TRANSFER_TIMEOUT_SECONDS") == "600", "agent KM_TRANSFER_TIMEOUT_SECONDS")
    expect("--kubelet-insecure-tls" in agent_args, "agent --kubelet-insecure-tls")
    for kind in ("Deployment", "DaemonSet"):
        name = "kube-migrate-webhook" if kind == "Deployment" else "kube-migrate-agent"
        pull = objs[(kind, name)]["spec"]["template"]["spec"].get("imagePullSecrets")
        expect(pull == [{"name": "regcred"}], f"{kind} imagePullSecrets {pull!r}")

    for kind, name, policy in (("ValidatingWebhookConfiguration", "kube-migrate-eviction", "Ignore"),
                               ("MutatingWebhookConfiguration", "kube-migrate-restore", "Ignore")):
        o = objs[(kind, name)]
        ann = o["metadata"].get("annotations", {})
        expect(ann.get("cert-manager.io/inject-ca-from") == "kube-migrate/kube-migrate-webhook",
               f"{name}: inject-ca-from annotation {ann!r}")
        w = o["webhooks"][0]
        expect("caBundle" not in w["clientConfig"], f"{name}: a caBundle with cert-manager (upgrades would blank it)")
        expect(w["failurePolicy"] == policy, f"{name}: failurePolicy {w['failurePolicy']}")
        exprs = w["namespaceSelector"]["matchExpressions"]
        expect(exprs[0]["values"] == ["kube-system", "monitoring", "kube-migrate"], f"{name}: excluded {exprs[0]!r}")
        expect(exprs[1:] == [{"key": "team", "operator": "In", "values": ["db"]}], f"{name}: expressions {exprs!r}")

    certs = {n: o for (k, n), o in objs.items() if k == "Certificate"}
    expect(set(certs) == {"kube-migrate-ca", "kube-migrate-webhook", "kube-migrate-agent-issuer", "kube-migrate-agent-ca"},
           f"Certificates {sorted(certs)}")
    expect({n for (k, n) in objs if k == "Issuer"} == {"kube-migrate-selfsigned", "kube-migrate-ca"}, "Issuers")
    if {"kube-migrate-webhook", "kube-migrate-agent-issuer", "kube-migrate-agent-ca"} <= set(certs):
        ca_issuer = {"name": "kube-migrate-ca", "kind": "Issuer", "group": "cert-manager.io"}
        expect(certs["kube-migrate-webhook"]["spec"]["secretName"] == "kube-migrate-webhook-tls", "webhook secretName")
        expect("kube-migrate-webhook.kube-migrate.svc" in certs["kube-migrate-webhook"]["spec"]["dnsNames"], "webhook dnsNames")
        # The controller mounts the agent issuer (a CA); the agents only the CA bundle, whose
        # own key must be no identity (no client/server usage).
        issuer = certs["kube-migrate-agent-issuer"]["spec"]
        expect(issuer["secretName"] == "kube-migrate-agent-issuer" and issuer.get("isCA") is True, "agent issuer is a CA")
        expect(issuer["issuerRef"] == ca_issuer, "agent issuer issuerRef")
        bundle = certs["kube-migrate-agent-ca"]["spec"]
        expect(bundle["secretName"] == "kube-migrate-agent-tls", "agent CA bundle secretName")
        expect(not {"client auth", "server auth"} & set(bundle["usages"]), "the agent CA bundle's key is no identity")
        expect(bundle["issuerRef"] == ca_issuer, "agent CA bundle issuerRef")

    with open("deploy/network-policy/networkpolicy.yaml") as f:
        policy = yaml.safe_load(f)
    chart_policy = objs.get(("NetworkPolicy", "kube-migrate-webhook"))
    expect(chart_policy is not None and chart_policy["spec"] == policy["spec"],
           "the chart's NetworkPolicy spec is not deploy/network-policy/networkpolicy.yaml's")
    webhook_env, _ = env_of(objs[("Deployment", "kube-migrate-webhook")])
    expect(webhook_env.get("KM_CLIENT_CA") == "/etc/kube-migrate/client-ca/ca.crt"
           and webhook_env.get("KM_CLIENT_NAMES") == "kube-apiserver-webhook-client", "webhook client auth env")

    sm = objs.get(("ServiceMonitor", "kube-migrate"))
    expect(sm is not None and sm["metadata"]["labels"].get("release") == "kps", "ServiceMonitor with label release=kps")
    expect(("Service", "kube-migrate-agent-metrics") in objs, "Service kube-migrate-agent-metrics")
    with open(rule_path) as f:
        rule = yaml.safe_load(f)
    chart_rule = objs.get(("PrometheusRule", "kube-migrate"))
    expect(chart_rule is not None and chart_rule["spec"] == rule["spec"],
           f"the chart's PrometheusRule spec is not {rule_path}'s")

    for p in problems:
        print(f"DRIFT: all values set: {p}")
    if problems:
        return 1
    print(f"ok: every optional value reaches its object; cert-manager: {len(certs)} Certificates, inject-ca-from, "
          f"no caBundle; ServiceMonitor; PrometheusRule spec = {rule_path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--all-on":
        sys.exit(all_on(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 4:
        sys.exit(compare(*sys.argv[1:]))
    sys.exit(__doc__)
