#!/usr/bin/env python3
"""Every metric and label named by the alert rules and the Grafana dashboard exists.

Compares the PromQL of every rule (`expr`) in the given Prometheus rules files and of every
query (`expr`, and `label_values(...)` variables) in the given Grafana dashboards with what
kube-migrate really serves on /metrics: a scrape of the admin router, in the OpenMetrics text
format (`cargo run --example metrics-scrape`; the example puts a sample in every family so that
each family shows its sample names and label names).

  check_metric_names.py --scrape FILE --rules RULES.yaml... --dashboard DASH.json...

Names that exist without kube-migrate serving them: metrics recorded by the rules files
(`record:`), `up` (labels job, instance) and `ALERTS`/`ALERTS_FOR_STATE`. Every scraped
series also has the target labels `job` and `instance`. Checked:
  * a metric name in a selector is served (or recorded, or built in);
  * a label in a selector's matchers exists on that metric;
  * a label in by/without/on/ignoring/group_left/group_right exists on one of the metrics of
    the same query (histogram_quantile's `le` included).
Exit status 1, with one line per problem, when anything is missing.
"""

import argparse
import json
import re
import sys

import yaml

TARGET_LABELS = {"job", "instance"}
BUILTIN = {"up": {"job", "instance"}, "ALERTS": None, "ALERTS_FOR_STATE": None}  # None: any label
KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2", "start", "end"}
# Aggregation operators may be followed by `by (...)` instead of their parenthesis.
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
SUFFIXES = {
    "counter": ["_total", "_created"],
    "histogram": ["_bucket", "_sum", "_count", "_created"],
    "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
    "summary": ["", "_sum", "_count", "_created"],
    "info": ["_info"],
    "stateset": [""],
    "gauge": [""],
    "unknown": [""],
}

IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)([smhdwy]|ms)?(\d+([smhdwy]|ms))*")
VAR = re.compile(r"\$(\{[^}]*\}|\w+)")


def parse_scrape(text):
    """{sample name: set of label names or None (family without samples)}."""
    served = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            for suffix in SUFFIXES.get(m.group(2), [""]):
                served.setdefault(m.group(1) + suffix, None)
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{([^}]*)\})?\s", line)
        if not m:
            continue
        labels = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', m.group(3) or ""))
        served[m.group(1)] = (served.get(m.group(1)) or set()) | labels
    return served


def skip_string(s, i):
    quote = s[i]
    i += 1
    while i < len(s) and s[i] != quote:
        i += 2 if s[i] == "\\" and quote != "`" else 1
    return i + 1


def matcher_names(body):
    """Label names of the matchers inside {...} (values and their quotes removed)."""
    names, i = [], 0
    while i < len(body):
        c = body[i]
        if c in "\"'`":
            i = skip_string(body, i)
            continue
        m = IDENT.match(body, i)
        if m:
            names.append(m.group(0))
            i = m.end()
            continue
        i += 1
    return names


def analyse(expr):
    """(selectors, grouping labels): selectors are (metric name or None, [matcher labels])."""
    selectors, grouping = [], []
    s, i, last_metric = expr, 0, None
    while i < len(s):
        c = s[i]
        if c.isspace():
            i += 1
            continue
        if c == "#":
            while i < len(s) and s[i] != "\n":
                i += 1
            continue
        if c in "\"'`":
            i = skip_string(s, i)
            last_metric = None
            continue
        if c == "$":
            m = VAR.match(s, i)
            i = m.end() if m else i + 1
            continue
        if c == "[":
            i = s.index("]", i) + 1
            continue
        if c == "{":
            end = i
            while s[end] != "}":
                end = skip_string(s, end) if s[end] in "\"'`" else end + 1
            names = matcher_names(s[i + 1 : end])
            if last_metric is not None:
                selectors[last_metric][1].extend(names)
            else:
                name = re.search(r'__name__\s*=\s*"([^"]*)"', s[i + 1 : end])
                selectors.append((name.group(1) if name else None, names))
            last_metric = None
            i = end + 1
            continue
        if c.isdigit() or (c == "." and i + 1 < len(s) and s[i + 1].isdigit()):
            m = NUMBER.match(s, i)
            i = m.end() if m else i + 1
            last_metric = None
            continue
        m = IDENT.match(s, i)
        if m:
            word, i = m.group(0), m.end()
            j = i
            while j < len(s) and s[j].isspace():
                j += 1
            followed_by_paren = j < len(s) and s[j] == "("
            last_metric = None
            if word.lower() in GROUPING and followed_by_paren:
                close = s.index(")", j)
                grouping.extend(IDENT.findall(s[j + 1 : close]))
                i = close + 1
            elif followed_by_paren or word.lower() in KEYWORDS | AGGREGATIONS | GROUPING:
                pass
            else:
                selectors.append((word, []))
                last_metric = len(selectors) - 1
            continue
        last_metric = None
        i += 1
    return selectors, grouping


def check_query(where, expr, served, recorded, problems):
    selectors, grouping = analyse(expr)
    known_labels, any_label = set(TARGET_LABELS), False
    for name, labels in selectors:
        if name is None:
            problems.append(f"{where}: a selector without a metric name: {expr!r}")
            continue
        if name in served:
            have = served[name]
            if have is None:
                if labels:
                    problems.append(
                        f"{where}: {name} has no sample in the scrape, its labels are unknown "
                        "(put one in examples/metrics-scrape.rs)"
                    )
                continue
            have = have | TARGET_LABELS
        elif name in recorded:
            have = recorded[name]
        elif name in BUILTIN:
            have = BUILTIN[name]
            if have is None:
                any_label = True
                continue
        else:
            problems.append(f"{where}: metric {name} is not served by kube-migrate (nor recorded by a rule)")
            continue
        known_labels |= have
        for label in labels:
            if label != "__name__" and label not in have:
                problems.append(f"{where}: metric {name} has no label {label!r} (it has: {', '.join(sorted(have))})")
    if not any_label:
        for label in grouping:
            if label not in known_labels:
                problems.append(f"{where}: label {label!r} (by/on/...) is on none of the query's metrics")
    return [name for name, _ in selectors if name]


def recorded_labels(expr):
    """Labels of a recording rule's output: those of its outermost `sum by (...)` if any."""
    m = re.match(r"\s*\w+\s+by\s*\(([^)]*)\)", expr)
    return set(IDENT.findall(m.group(1))) if m else set()


def dashboard_queries(node, path="$"):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield path, value
            elif key == "definition" and isinstance(value, str) and value.startswith("label_values("):
                yield path, value
            else:
                yield from dashboard_queries(value, f"{path}.{key}")
    elif isinstance(node, list):
        for n, value in enumerate(node):
            title = value.get("title") or value.get("name") if isinstance(value, dict) else None
            yield from dashboard_queries(value, f"{path}[{n}]" + (f"({title})" if title else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrape", required=True)
    ap.add_argument("--rules", nargs="*", default=[])
    ap.add_argument("--dashboard", nargs="*", default=[])
    args = ap.parse_args()

    with open(args.scrape) as f:
        served = parse_scrape(f.read())
    if not any(name.startswith("kube_migrate_") for name in served):
        sys.exit(f"{args.scrape}: no kube_migrate_ metric in the scrape")
    unsampled = sorted(n for n, labels in served.items() if labels is None and not n.endswith("_created"))
    for name in unsampled:
        print(f"note: {name} is served but has no sample in the scrape (labels unknown)", file=sys.stderr)

    rules, recorded = [], {}
    for path in args.rules:
        with open(path) as f:
            doc = yaml.safe_load(f)
        doc = doc.get("spec", doc)  # a PrometheusRule, or a plain rules file
        for group in doc["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                rules.append((f"{path}: {group['name']}/{name}", rule["expr"]))
                if "record" in rule:
                    recorded[rule["record"]] = recorded_labels(rule["expr"])

    queries = list(rules)
    for path in args.dashboard:
        with open(path) as f:
            queries += [(f"{path}: {where}", q) for where, q in dashboard_queries(json.load(f))]

    problems, used = [], set()
    for where, expr in queries:
        m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", expr, re.S)
        if m:  # Grafana variable: label_values(selector, label)
            expr = f"count by ({m.group(2)}) ({m.group(1)})"
        names = check_query(where, expr, served, recorded, problems)
        if not names:
            problems.append(f"{where}: no metric found in {expr!r}")
        used.update(names)

    for p in problems:
        print(f"MISSING: {p}")
    print(
        f"checked {len(queries)} queries ({len(rules)} rules, {len(queries) - len(rules)} dashboard queries), "
        f"{len(used)} distinct metrics, against {sum(n.startswith('kube_migrate_') for n in served)} "
        f"kube_migrate_ sample names served: {len(problems)} problem(s)"
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
