#!/usr/bin/env python3
"""The Grafana dashboard's main panels, from a real Prometheus (scripts/dashboard-live.sh).

    dashboard_picture.py PROMETHEUS_URL START END [--picture FILE]

Runs the queries of the panels named in PANELS exactly as deploy/monitoring/grafana-dashboard.json
has them (Grafana's variables replaced: $__range by END-START, $__rate_interval by RATE, $node by
.*), over START..END (unix seconds), and fails when any of them has no data: a panel that shows
nothing on a run that drained nodes is a broken query. With --picture, draws them with matplotlib
into FILE (PNG), one plot per panel, as the dashboard lays them out (bars for bar gauges and
tables, lines for time series).
"""

import argparse
import datetime
import json
import sys
import urllib.parse
import urllib.request

DASHBOARD = "deploy/monitoring/grafana-dashboard.json"
# The panels operators look at first during a drain (README "Monitoring").
PANELS = [
    "Drain duration per node (mean over the dashboard range)",
    "Migrations in the dashboard range, by outcome and reason",
    "Migrations in flight, by phase",
    "Phase duration (p50, p95)",
    "Bytes checkpointed, sent and received",
    "Admission decisions, by webhook and result",
]
RATE = "20s"  # Grafana's $__rate_interval for a 2 s scrape interval would be 8 s; smoother here.
STEP = 2


def query(prom, path, params):
    url = f"{prom}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"dashboard: {url}: {body}")
    return body["data"]["result"]


def label_of(metric, legend):
    """Grafana's legendFormat ({{label}}) applied to a series' labels."""
    if not legend:
        return ",".join(f"{k}={v}" for k, v in sorted(metric.items())) or "value"
    out = legend
    for k, v in metric.items():
        out = out.replace("{{" + k + "}}", v).replace("{{ " + k + " }}", v)
    return out


def panels(dashboard):
    by_title = {p.get("title"): p for p in dashboard["panels"]}
    missing = [t for t in PANELS if t not in by_title]
    if missing:
        raise SystemExit(f"dashboard: panels not in {DASHBOARD}: {missing}")
    return [by_title[t] for t in PANELS]


def expr_of(target, start, end):
    return (
        target["expr"]
        .replace("$__range", f"{int(end - start)}s")
        .replace("$__rate_interval", RATE)
        .replace('=~"$node"', '=~".*"')
    )


def collect(prom, start, end):
    """Per panel: kind ("bars" or "lines") and its series [(label, xs, ys)]."""
    dashboard = json.load(open(DASHBOARD))
    result = []
    for panel in panels(dashboard):
        instant = panel["type"] in ("bargauge", "table", "stat")
        series = []
        for target in panel.get("targets", []):
            expr = expr_of(target, start, end)
            if instant:
                for s in query(prom, "query", {"query": expr, "time": end}):
                    series.append((label_of(s["metric"], target.get("legendFormat")), None, float(s["value"][1])))
            else:
                params = {"query": expr, "start": start, "end": end, "step": STEP}
                for s in query(prom, "query_range", params):
                    xs = [float(t) for t, _ in s["values"]]
                    ys = [float(v) for _, v in s["values"]]
                    series.append((label_of(s["metric"], target.get("legendFormat")), xs, ys))
        result.append((panel, "bars" if instant else "lines", series))
    return result


def draw(collected, start, end, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(15, 12))
    for ax, (panel, kind, series) in zip(axes.flat, collected):
        ax.set_title(panel["title"], fontsize=10)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if kind == "bars":
            labels = [label for label, _, _ in series]
            values = [value for _, _, value in series]
            ax.barh(labels, values, color="#3274d9")
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
            ax.tick_params(axis="y", labelsize=8)
            ax.set_xlabel(unit)
        else:
            for label, xs, ys in series:
                when = [datetime.datetime.fromtimestamp(x, datetime.timezone.utc) for x in xs]
                ax.plot(when, ys, label=label, linewidth=1.2)
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
            ax.tick_params(axis="x", labelsize=8)
            ax.set_ylabel(unit)
            ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    span = datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    fig.suptitle(
        f"kube-migrate dashboard, main panels: a run of scripts/dashboard-live.sh from {span} UTC, {int(end - start)} s",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=80)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prometheus")
    ap.add_argument("start", type=float)
    ap.add_argument("end", type=float)
    ap.add_argument("--picture")
    args = ap.parse_args()
    collected = collect(args.prometheus, args.start, args.end)
    empty = [panel["title"] for panel, _, series in collected if not series]
    for panel, kind, series in collected:
        print(f"{panel['title']}: {len(series)} series")
    if empty:
        print(f"dashboard: no data for: {empty}", file=sys.stderr)
        sys.exit(1)
    if args.picture:
        draw(collected, args.start, args.end, args.picture)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
