"""The Grafana dashboard the chart ships (charts/payledger/dashboards/payledger.json).

usage: check_dashboard.py ENABLED.yaml DEFAULT.yaml EXPORTED_METRICS.txt
  ENABLED.yaml  helm template with grafana.dashboard.enabled=true
  DEFAULT.yaml  helm template with the default values

Checks: the ConfigMap exists only when enabled, carries the sidecar label, and holds
the dashboard as JSON; every panel queries Prometheus through the dashboard's data
source variable; every metric its PromQL names is one the services export (the list
e2e/tests/exported_metrics.rs checks against the code and a scrape of the binaries),
with the sample suffixes of its type; the topics docs/operations.md lists each have a
panel. A planted misspelling must be caught (self-test)."""

import copy
import json
import re
import sys

import yaml

LABEL = ("grafana_dashboard", "1")
# A family of each topic: ingest, stream lag and freshness, lease owners, archive
# lag, replays and their reconciliation, query latency by source, cache tiers.
TOPICS = {
    "ingest rate and outcomes": "payledger_ingest_events",
    "stream lag per partition": "payledger_projector_lag_records",
    "freshness": "payledger_projector_freshness_seconds",
    "lease owners": "payledger_projector_partition_owned",
    "archive lag": "payledger_archive_lag_records",
    "replays": "payledger_replays",
    "reconciliation": "payledger_reconciliation_differences",
    "query latency by source": "payledger_query_seconds",
    "cache tiers": "payledger_query_part_cache_reads",
}
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
# A metric selector: a name, then its label matchers or a range.
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]")


def exported_samples(path: str) -> dict[str, str]:
    """Sample name -> its family, from `name type` lines."""
    samples = {}
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        family, kind = line.split()
        for suffix in SUFFIXES[kind]:
            samples[family + suffix] = family
    return samples


def dashboards(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o.get("kind") == "ConfigMap" and "payledger.json" in o.get("data", {})]


def panels_of(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def check(objects_enabled: list[dict], objects_default: list[dict], samples: dict[str, str]) -> list[str]:
    failures = []

    def expect(condition: bool, message: str) -> None:
        if not condition:
            failures.append(message)

    expect(not dashboards(objects_default), "the default values render no dashboard ConfigMap")
    found = dashboards(objects_enabled)
    expect(len(found) == 1, f"one dashboard ConfigMap when enabled, found {len(found)}")
    if len(found) != 1:
        return failures
    cm = found[0]
    labels = cm["metadata"].get("labels", {})
    expect(labels.get(LABEL[0]) == LABEL[1], f"label {LABEL[0]}: \"{LABEL[1]}\" for the sidecar, got {labels}")
    try:
        dashboard = json.loads(cm["data"]["payledger.json"])
    except json.JSONDecodeError as e:
        return failures + [f"payledger.json is not JSON: {e}"]
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    expect("datasource" in variables, "a datasource variable, so the dashboard fits any Prometheus")
    ids = set()
    used = set()
    for panel in panels_of(dashboard):
        title = panel.get("title", "?")
        expect(panel.get("id") not in ids, f"{title}: panel id {panel.get('id')} is unique")
        ids.add(panel.get("id"))
        expect("gridPos" in panel, f"{title}: has a gridPos")
        if panel.get("type") == "row":
            continue
        expect(panel.get("datasource", {}).get("uid") == "${datasource}", f"{title}: queries ${{datasource}}")
        targets = panel.get("targets", [])
        expect(bool(targets), f"{title}: has a query")
        for target in targets:
            expr = target.get("expr", "")
            names = set(SELECTOR.findall(expr)) | set(re.findall(r"\bpayledger_[a-z0-9_]*", expr))
            expect(bool(names), f"{title}: '{expr}' names a metric")
            for name in sorted(names):
                expect(name in samples, f"{title}: '{name}' is not a metric the services export")
                if name in samples:
                    used.add(samples[name])
    for topic, family in TOPICS.items():
        expect(family in used, f"a panel on {topic} ({family})")
    return failures


def main() -> int:
    enabled, default, exported = sys.argv[1:4]
    load = lambda path: [o for o in yaml.safe_load_all(open(path)) if o]
    objects_enabled, objects_default = load(enabled), load(default)
    samples = exported_samples(exported)
    failures = check(objects_enabled, objects_default, samples)
    # Self-test: a misspelt metric and a panel without a query are caught.
    planted = copy.deepcopy(objects_enabled)
    cm = dashboards(planted)[0] if dashboards(planted) else None
    if cm is not None:
        dashboard = json.loads(cm["data"]["payledger.json"])
        panel = next(p for p in panels_of(dashboard) if p.get("targets"))
        panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace("payledger_", "payledgr_", 1)
        cm["data"]["payledger.json"] = json.dumps(dashboard)
        if not check(planted, objects_default, samples):
            failures.append("self-test: a misspelt metric was not caught")
    for failure in failures:
        print(f"  dashboard: {failure}")
    panels = 0
    if dashboards(objects_enabled):
        panels = len(panels_of(json.loads(dashboards(objects_enabled)[0]["data"]["payledger.json"])))
    print(f"  dashboard: {panels} panels, {'OK' if not failures else f'{len(failures)} failed checks'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
