"""Checks the manifests `helm template` rendered for one values set.

    python check_manifests.py SCENARIO RENDERED.yaml K8S_VERSION...
    python check_manifests.py --self-test DEFAULT_RENDERED.yaml K8S_VERSION...

1. Every object of a core kind validates against the Kubernetes OpenAPI schemas of
   each version given, strictly (unknown fields are errors), with kubernetes-validate.
   An object whose kind has no schema there fails, so a typo in an apiVersion cannot
   pass as "unknown".
2. The two CRD kinds (ServiceMonitor, PrometheusRule) have no schema in
   kubernetes-validate: their apiVersion, required fields and the references they make
   are checked here instead.
3. Facts the chart promises, common to every values set, then those of SCENARIO.

Prints one line per failed check and exits 1 if any failed. --self-test plants one
mistake at a time in a good rendering and fails unless every one is caught.
"""

from __future__ import annotations

import re
import sys

import kubernetes_validate
import yaml

CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
}
SERVER_BINARIES = {
    "payledger-ingest",
    "payledger-query",
    "payledger-projector",
    "payledger-replay-coordinator",
}
SECRET_LIKE = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL)", re.I)

failures: list[str] = []


def check(condition: bool, message: str) -> None:
    if not condition:
        failures.append(message)


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(obj: dict) -> dict | None:
    kind = obj["kind"]
    if kind == "Pod":
        return obj["spec"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def pod_labels(obj: dict) -> dict:
    kind = obj["kind"]
    if kind == "Pod":
        return obj["metadata"].get("labels", {})
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# 1 and 2: schemas ----------------------------------------------------------------


def validate_schemas(objects: list[dict], versions: list[str]) -> None:
    for obj in objects:
        kind = obj.get("kind")
        if kind in CRD_KINDS:
            check_crd(obj)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                failures.append(f"{name_of(obj)} fails Kubernetes {version} schema at {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                failures.append(f"{name_of(obj)}: no Kubernetes {version} schema ({e.message})")


def check_crd(obj: dict) -> None:
    kind = obj["kind"]
    where = name_of(obj)
    check(obj.get("apiVersion") == CRD_KINDS[kind], f"{where}: apiVersion {obj.get('apiVersion')}")
    meta = obj.get("metadata", {})
    check(bool(meta.get("name")) and len(meta["name"]) <= 63, f"{where}: metadata.name")
    check(set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, f"{where}: unexpected top-level fields")
    spec = obj.get("spec") or {}
    if kind == "ServiceMonitor":
        check(set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}, f"{where}: unexpected spec fields {sorted(spec)}")
        check(isinstance(spec.get("selector"), dict) and spec["selector"], f"{where}: spec.selector is required")
        endpoints = spec.get("endpoints")
        check(isinstance(endpoints, list) and endpoints, f"{where}: spec.endpoints is required")
        for ep in endpoints or []:
            check(set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}, f"{where}: endpoint fields {sorted(ep)}")
            check(isinstance(ep.get("port"), str), f"{where}: endpoint port must name a Service port")
            check(ep.get("scheme") in (None, "http", "https"), f"{where}: endpoint scheme")
            for field in ("interval", "scrapeTimeout"):
                if field in ep:
                    check(re.fullmatch(r"([0-9]+(ms|s|m|h))+", str(ep[field])) is not None, f"{where}: {field} {ep[field]!r}")
    if kind == "PrometheusRule":
        groups = spec.get("groups")
        check(isinstance(groups, list) and groups, f"{where}: spec.groups is required")
        for group in groups or []:
            check(bool(group.get("name")), f"{where}: a group without a name")
            for rule in group.get("rules") or []:
                alert = rule.get("alert", "?")
                check(set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, f"{where}/{alert}: fields {sorted(rule)}")
                check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", alert) is not None, f"{where}: alert name {alert!r}")
                expr = rule.get("expr")
                check(isinstance(expr, str) and expr.strip(), f"{where}/{alert}: expr is required")
                if isinstance(expr, str):
                    check(balanced(expr), f"{where}/{alert}: unbalanced brackets in {expr!r}")
                    check("{{" not in expr, f"{where}/{alert}: unrendered template in expr")
                if "for" in rule:
                    check(re.fullmatch(r"([0-9]+(ms|s|m|h|d))+", str(rule["for"])) is not None, f"{where}/{alert}: for")
                check(rule.get("labels", {}).get("severity") in ("warning", "critical"), f"{where}/{alert}: severity")
                check(bool(rule.get("annotations", {}).get("summary")), f"{where}/{alert}: summary")


def balanced(expr: str) -> bool:
    pairs, stack, quoted = {")": "(", "]": "[", "}": "{"}, [], False
    for ch in expr:
        if ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and not quoted


# 3: facts common to every values set ---------------------------------------------


def common_facts(objects: list[dict], index: dict) -> None:
    kinds = [o["kind"] for o in objects]
    check("Secret" not in kinds, "the chart renders a Secret: it must only reference them")
    check("ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds, "cluster-wide RBAC rendered")

    for obj in objects:
        name = obj["metadata"]["name"]
        limit = 52 if obj["kind"] == "CronJob" else 63
        check(len(name) <= limit, f"{name_of(obj)}: name longer than {limit}")

    workloads = [o for o in objects if pod_spec(o) is not None]
    for obj in workloads:
        spec = pod_spec(obj)
        where = name_of(obj)
        psc = spec.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot")
        check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile")
        coordinator = pod_labels(obj).get("app.kubernetes.io/component") == "replay-coordinator"
        check(spec.get("automountServiceAccountToken") is coordinator,
              f"{where}: only the coordinator mounts a ServiceAccount token")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            check(sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: allowPrivilegeEscalation")
            check(sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: readOnlyRootFilesystem")
            check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}: capabilities")
            res = c.get("resources", {})
            check("memory" in res.get("limits", {}) and res.get("requests"), f"{where}/{c['name']}: resources")
            for e in c.get("env", []):
                if SECRET_LIKE.search(e["name"]) and not e["name"].startswith("PAYLEDGER_TLS"):
                    check("value" not in e and "secretKeyRef" in e.get("valueFrom", {}),
                          f"{where}: {e['name']} must come from a Secret")
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])}
            templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])} if obj["kind"] == "StatefulSet" else set()
            check(mounts <= volumes | templates, f"{where}: mounts {sorted(mounts - volumes - templates)} have no volume")
            for ref in c.get("envFrom", []):
                cm = ref.get("configMapRef", {}).get("name")
                check(cm is None or ("ConfigMap", cm) in index, f"{where}: ConfigMap {cm} not rendered")
        for v in spec.get("volumes", []):
            if "configMap" in v:
                check(("ConfigMap", v["configMap"]["name"]) in index, f"{where}: ConfigMap {v['configMap']['name']} not rendered")
        sa = spec.get("serviceAccountName")
        check(("ServiceAccount", sa) in index, f"{where}: ServiceAccount {sa} not rendered")

        command = spec["containers"][0].get("command", [])
        if command and command[0] in SERVER_BINARIES:
            c = spec["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            env = env_of(c)
            check(env["PAYLEDGER_LISTEN"]["value"] == f"0.0.0.0:{ports['grpc']}", f"{where}: PAYLEDGER_LISTEN")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc = c.get(probe, {}).get("grpc")
                check(grpc is not None and grpc["port"] in (ports.get("health"), ports["grpc"]),
                      f"{where}: {probe} must be a gRPC probe on the service's port")
            check(c["readinessProbe"]["grpc"].get("service", "").startswith("payledger.v1."),
                  f"{where}: readiness asks for its payledger.v1 service")
            check(c["livenessProbe"]["grpc"].get("service", "") == "", f"{where}: liveness asks for the server as a whole")
            check("metrics" in ports, f"{where}: metrics port")

    # Every Service, PDB and NetworkPolicy selects pods that exist, by ports they have.
    pods = [(pod_labels(o), pod_spec(o)) for o in workloads if o["kind"] in ("Deployment", "StatefulSet")]
    for svc in (o for o in objects if o["kind"] == "Service"):
        matched = [spec for labels, spec in pods if selects(svc["spec"]["selector"], labels)]
        check(bool(matched), f"{name_of(svc)} selects no pod")
        for spec in matched:
            names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                check(port["targetPort"] in names, f"{name_of(svc)}: targetPort {port['targetPort']} not on its pods")
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        check(any(selects(pdb["spec"]["selector"]["matchLabels"], l) for l, _ in pods), f"{name_of(pdb)} selects no pod")
    for np in (o for o in objects if o["kind"] == "NetworkPolicy"):
        matched = [spec for labels, spec in pods if selects(np["spec"]["podSelector"]["matchLabels"], labels)]
        check(bool(matched), f"{name_of(np)} selects no pod")
        names = {p["name"] for spec in matched for c in spec["containers"] for p in c.get("ports", [])}
        for rule in np["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                check(port["port"] in names, f"{name_of(np)}: port {port['port']} not on its pods")

    # RBAC: one Role, and it grants exactly what the coordinator needs.
    roles = [o for o in objects if o["kind"] == "Role"]
    check(len(roles) == 1, "exactly one Role")
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in roles[0]["rules"] if roles else []:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
                check("*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], "wildcards in the Role")
    check(grants == {
        ("", "pods"): {"get", "list", "watch"},
        ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
        ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    }, f"the Role grants {grants}")
    lease_rules = [r for r in roles[0]["rules"] if "leases" in r["resources"] and set(r["verbs"]) & {"get", "update"}] if roles else []
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    check(binding["roleRef"]["name"] == roles[0]["metadata"]["name"], "RoleBinding binds the Role")

    # The coordinator: discovery through the projectors' headless Service, its Lease.
    coordinator = find_workload(objects, "replay-coordinator")
    projector = find_workload(objects, "projector")
    c_env = env_of(pod_spec(coordinator)["containers"][0])
    headless = index[("Service", projector["spec"]["serviceName"])]
    check(headless["spec"].get("clusterIP") == "None", "the projectors' Service is headless")
    check(c_env["PAYLEDGER_WORKERS_SERVICE"]["value"] == headless["metadata"]["name"], "PAYLEDGER_WORKERS_SERVICE names the headless Service")
    check(any(p["name"] == "grpc" for p in headless["spec"]["ports"]), "the headless Service has a port named grpc")
    grpc_port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    pods = [f"{projector['metadata']['name']}-{i}.{headless['metadata']['name']}:{grpc_port}" for i in range(projector["spec"]["replicas"])]
    check([u.split("://", 1)[1] for u in c_env["PAYLEDGER_WORKERS"]["value"].split(",")] == pods,
          "PAYLEDGER_WORKERS lists every projector pod")
    for rule in lease_rules:
        check(rule.get("resourceNames") == [c_env["PAYLEDGER_LEASE_NAME"]["value"]], "get/update only on the coordinator's own Lease")
    check(c_env["PAYLEDGER_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "coordinator PAYLEDGER_POD_NAME")
    check(c_env["PAYLEDGER_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", "coordinator PAYLEDGER_NAMESPACE")
    check(pod_spec(coordinator)["serviceAccountName"] == binding["subjects"][0]["name"], "the coordinator runs as the bound ServiceAccount")
    # Only the leader is ready: readiness asks for the ReplayCoordinator service
    # (NOT_SERVING on a standby), startup for the server as a whole (else a standby
    # would be restarted), and neither a rollout nor a PDB may wait for a standby.
    probes = pod_spec(coordinator)["containers"][0]
    check(probes["readinessProbe"]["grpc"].get("service") == "payledger.v1.ReplayCoordinator", "coordinator readiness: the leader only")
    check(probes["startupProbe"]["grpc"].get("service", "") == "", "coordinator startup: the server as a whole")
    check(coordinator["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": "100%", "maxSurge": 0},
          "a coordinator rollout replaces every old pod at once")
    check(not any(o["kind"] == "PodDisruptionBudget" and selects(o["spec"]["selector"]["matchLabels"], pod_labels(coordinator))
                  for o in objects), "no PodDisruptionBudget for the coordinator")
    others = {pod_spec(o).get("serviceAccountName") for o in workloads if o is not coordinator}
    check(binding["subjects"][0]["name"] not in others, "only the coordinator runs as the bound ServiceAccount")

    # Projectors: ordinal and replica count from the pod, mode both.
    p_env = env_of(pod_spec(projector)["containers"][0])
    check(p_env["PAYLEDGER_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "projector PAYLEDGER_POD_NAME")
    check(p_env["PAYLEDGER_PROJECTOR_REPLICAS"]["value"] == str(projector["spec"]["replicas"]), "PAYLEDGER_PROJECTOR_REPLICAS = replicas")
    check(p_env["PAYLEDGER_MODE"]["value"] == "both", "projectors run --mode both")
    check(p_env["PAYLEDGER_STORE"]["value"].startswith(("s3://", "gs://", "az://", "file://")), "projector PAYLEDGER_STORE")
    check("PAYLEDGER_ARCHIVE_STORE" in p_env, "projector PAYLEDGER_ARCHIVE_STORE")

    # Exactly one archiver: one pod runs payledger-ingest with PAYLEDGER_ARCHIVE_STORE.
    archivers = [o for o in workloads if o["kind"] == "Deployment" and "PAYLEDGER_ARCHIVE_STORE" in env_of(pod_spec(o)["containers"][0])]
    check(len(archivers) == 1 and archivers[0]["spec"]["replicas"] == 1 and archivers[0]["spec"]["strategy"]["type"] == "Recreate",
          "one archiver: one replica, Recreate")

    # The nightly replay.
    cron = [o for o in objects if o["kind"] == "CronJob"]
    check(len(cron) == 1, "one CronJob")
    if cron:
        c = pod_spec(cron[0])["containers"][0]
        argv = c["command"] + c.get("args", [])
        check(argv[:5] == ["payledger", "replay", "start", "--yesterday", "--wait"],
              f"the CronJob runs `payledger replay start --yesterday --wait`, not {argv}")
        check(cron[0]["spec"]["concurrencyPolicy"] == "Forbid", "nightly replays never overlap")
        check_replay_client(c, index, cron[0])
    for job in (o for o in objects if o["kind"] == "Job"):
        check_replay_client(pod_spec(job)["containers"][0], index, job)

    # helm test: health and reflection of every service and every projector pod.
    tests = [o for o in objects if o["kind"] == "Pod"]
    check(len(tests) == 1 and tests[0]["metadata"]["annotations"]["helm.sh/hook"] == "test", "one helm test Pod")
    if tests:
        c = pod_spec(tests[0])["containers"][0]
        urls = c["args"][1:]
        check(c["command"] == ["payledger"] and c["args"][0] == "check", "the test Pod runs `payledger check`")
        for component in ("ingest", "query", "replay-coordinator"):
            svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-" + component))
            port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
            check(any(u.endswith(f"//{svc['metadata']['name']}:{port}") for u in urls), f"helm test checks {component}")
        projector_urls = [u for u in urls if f".{headless['metadata']['name']}:" in u]
        check(len(projector_urls) == projector["spec"]["replicas"], "helm test checks every projector pod")


def check_replay_client(container: dict, index: dict, obj: dict) -> None:
    env = env_of(container)
    url = env["PAYLEDGER_COORDINATOR_URL"]["value"]
    m = re.fullmatch(r"(https?)://([a-z0-9-]+):([0-9]+)", url)
    check(m is not None, f"{name_of(obj)}: coordinator URL {url}")
    if m:
        svc = index.get(("Service", m.group(2)))
        check(svc is not None and any(p["port"] == int(m.group(3)) and p["name"] == "grpc" for p in svc["spec"]["ports"]),
              f"{name_of(obj)}: {url} is not the coordinator's Service")
    if "PAYLEDGER_TOKEN" in env:
        check(env["PAYLEDGER_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "operator", f"{name_of(obj)}: the operator token")


def find_workload(objects: list[dict], component: str) -> dict:
    return next(o for o in objects if o["kind"] in ("Deployment", "StatefulSet")
                and pod_labels(o).get("app.kubernetes.io/component") == component)


def config(objects: list[dict]) -> dict:
    return next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["labels"]["app.kubernetes.io/component"] == "config")["data"]


# 3: facts of each values set ---------------------------------------------------------


def scenario_default(objects: list[dict], index: dict) -> None:
    nats = [o for o in objects if o["kind"] == "StatefulSet" and pod_labels(o)["app.kubernetes.io/component"] == "nats"]
    check(len(nats) == 1 and nats[0]["spec"]["replicas"] == 3, "in-chart NATS: a StatefulSet of 3")
    conf = next(o for o in objects if o["kind"] == "ConfigMap" and "nats.conf" in o.get("data", {}))["data"]["nats.conf"]
    check(re.search(r"^\s*sync_interval: always$", conf, re.M) is not None, "NATS runs with sync_interval: always")
    check(conf.count("nats://") == 3, "three cluster routes")
    cfg = config(objects)
    check(cfg["PAYLEDGER_NATS_URL"].startswith("nats://") and cfg["PAYLEDGER_NATS_URL"].endswith("-nats:4222"), "services use the in-chart NATS")
    check(cfg["PAYLEDGER_STREAM_REPLICAS"] == "3" and cfg["PAYLEDGER_KV_REPLICAS"] == "3", "stream and KV replicas 3")
    check(cfg.get("PAYLEDGER_STREAM_MAX_AGE") == "7d", "one stream max_age for ingest and the archiver alike")
    check(not any(o["kind"] in CRD_KINDS or o["kind"] == "Job" for o in objects), "monitoring and backfill are off by default")
    ingest = find_workload(objects, "ingest")
    check("AWS_SECRET_ACCESS_KEY" not in env_of(pod_spec(ingest)["containers"][0]), "ingest gets no object-store keys")
    c_env = env_of(pod_spec(find_workload(objects, "replay-coordinator"))["containers"][0])
    check(not {"PAYLEDGER_WORKER_CA", "PAYLEDGER_WORKER_TLS_SERVER_NAME", "PAYLEDGER_WORKER_CLIENT_CERT"} & c_env.keys(),
          "without TLS the coordinator calls the workers in plaintext")
    for component, roles in {"ingest": ["producer"], "query": ["reader", "operator"], "projector": ["internal"],
                             "replay-coordinator": ["operator", "internal"]}.items():
        volumes = pod_spec(find_workload(objects, component))["volumes"]
        tokens = next(v for v in volumes if v["name"] == "api-tokens")["secret"]["items"]
        check([t["key"] for t in tokens] == roles, f"{component} gets the tokens {roles} only")


def scenario_external_nats(objects: list[dict], index: dict) -> None:
    check(not any(pod_labels(o).get("app.kubernetes.io/component") == "nats" for o in objects if pod_spec(o)), "no in-chart NATS")
    check(not any(o["metadata"]["name"].endswith("-nats") for o in objects), "no NATS objects at all")
    cfg = config(objects)
    check(cfg["PAYLEDGER_NATS_URL"] == "nats://nats.nats.svc.cluster.local:4222", "the external NATS URL")
    check(cfg["PAYLEDGER_NATS_CREDS"] == "/etc/payledger/nats/nats.creds", "PAYLEDGER_NATS_CREDS")
    for obj in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
        spec = pod_spec(obj)
        creds = [v for v in spec["volumes"] if v["name"] == "nats-credentials"]
        check(len(creds) == 1 and creds[0]["secret"]["secretName"] == "payledger-nats"
              and creds[0]["secret"]["items"] == [{"key": "payledger.creds", "path": "nats.creds"}],
              f"{name_of(obj)}: the NATS credentials file from its Secret")
        check("AWS_ACCESS_KEY_ID" not in env_of(spec["containers"][0]), f"{name_of(obj)}: no keys with workload identity")
    projector = find_workload(objects, "projector")
    p_env = env_of(pod_spec(projector)["containers"][0])
    check(p_env["PAYLEDGER_STORE"]["value"] == "s3://payledger-prod/checkpoints", "checkpoints location")
    check(p_env["PAYLEDGER_ARCHIVE_STORE"]["value"] == "s3://payledger-prod/ledger", "archive location")
    for sa in (o for o in objects if o["kind"] == "ServiceAccount"):
        check(sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "").startswith("arn:aws:iam::"), f"{name_of(sa)}: annotations")
    ingest_np = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-ingest"))
    grpc_rule = next(r for r in ingest_np["spec"]["ingress"] if r["ports"][0]["port"] == "grpc")
    check({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "payments-api"}}} in grpc_rule["from"], "ingest clients restricted")
    check(any(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "test" for p in grpc_rule["from"]),
          "the helm test Pod may still call ingest")


def scenario_backfill_5_replicas(objects: list[dict], index: dict) -> None:
    projector = find_workload(objects, "projector")
    check(projector["spec"]["replicas"] == 5, "5 projector replicas rendered")
    check(env_of(pod_spec(projector)["containers"][0])["PAYLEDGER_PROJECTOR_REPLICAS"]["value"] == "5", "PAYLEDGER_PROJECTOR_REPLICAS=5")
    # The ownership rule the projectors apply: every partition has exactly one owner,
    # and every pod owns some.
    partitions = int(config(objects)["PAYLEDGER_PARTITIONS"])
    owners = {p: [n for n in range(5) if p % 5 == n] for p in range(partitions)}
    check(all(len(o) == 1 for o in owners.values()) and {o[0] for o in owners.values()} == set(range(5)), "ownership p % 5")
    jobs = [o for o in objects if o["kind"] == "Job"]
    check(len(jobs) == 1, "one backfill Job")
    if jobs:
        c = pod_spec(jobs[0])["containers"][0]
        argv = c["command"] + c["args"]
        check(argv[:8] == ["payledger", "replay", "start", "--from", "2026-11-01", "--to", "2026-11-30", "--wait"],
              f"the backfill runs `payledger replay start --from 2026-11-01 --to 2026-11-30 --wait`, not {argv}")
        check(jobs[0]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [3], "exit status 3 fails the Job")
    cron = next(o for o in objects if o["kind"] == "CronJob")
    check(cron["spec"]["suspend"] is True, "nightly replay suspended")
    coordinator = find_workload(objects, "replay-coordinator")
    check(env_of(pod_spec(coordinator)["containers"][0])["PAYLEDGER_MAX_SHARDS_PER_WORKER"]["value"] == "2", "shards per worker")


def scenario_tls_monitoring(objects: list[dict], index: dict) -> None:
    cfg = config(objects)
    check(cfg.get("PAYLEDGER_TLS_CERT") == "/etc/payledger/tls/tls.crt" and cfg.get("PAYLEDGER_TLS_KEY") == "/etc/payledger/tls/tls.key", "TLS cert and key")
    check(cfg.get("PAYLEDGER_TLS_CLIENT_CA") == "/etc/payledger/tls/ca.crt", "client certificates required")
    check(cfg.get("PAYLEDGER_HEALTH_LISTEN") == "0.0.0.0:8081", "plaintext health port for the kubelet")
    check(cfg.get("AWS_ENDPOINT") == "http://minio.storage.svc:9000" and cfg.get("AWS_ALLOW_HTTP") == "true", "S3-compatible endpoint")
    for obj in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet") and pod_labels(o)["app.kubernetes.io/component"] != "nats"):
        c = pod_spec(obj)["containers"][0]
        check(c["readinessProbe"]["grpc"]["port"] == 8081 and c["livenessProbe"]["grpc"]["port"] == 8081, f"{name_of(obj)}: probes on the health port")
        check(any(m["mountPath"] == "/etc/payledger/tls" for m in c["volumeMounts"]), f"{name_of(obj)}: TLS files mounted")
    ingest = env_of(pod_spec(find_workload(objects, "ingest"))["containers"][0])
    check(ingest["PAYLEDGER_MAX_BATCH_EVENTS"]["value"] == "500", "component env rendered as strings")
    for obj in [o for o in objects if o["kind"] in ("CronJob", "Pod")]:
        env = env_of(pod_spec(obj)["containers"][0])
        check(env.get("PAYLEDGER_TLS_CA", {}).get("value") == "/etc/payledger/tls/ca.crt" and "PAYLEDGER_TLS_CLIENT_CERT" in env,
              f"{name_of(obj)}: TLS client settings")
    # The coordinator calls the projectors over mutual TLS, checking their certificate
    # against the headless Service's name (it dials discovered pods by IP).
    projector = find_workload(objects, "projector")
    c_env = {k: v.get("value") for k, v in env_of(pod_spec(find_workload(objects, "replay-coordinator"))["containers"][0]).items()}
    check(c_env.get("PAYLEDGER_WORKER_CA") == "/etc/payledger/tls/ca.crt", "the coordinator trusts ca.crt for RunShard")
    check(c_env.get("PAYLEDGER_WORKER_TLS_SERVER_NAME") == projector["spec"]["serviceName"],
          "the coordinator checks the projectors' certificate against their Service's name")
    check(c_env.get("PAYLEDGER_WORKER_CLIENT_CERT") == "/etc/payledger/tls/tls.crt"
          and c_env.get("PAYLEDGER_WORKER_CLIENT_KEY") == "/etc/payledger/tls/tls.key", "the coordinator's client certificate for RunShard")
    check(all(u.startswith("https://") for u in c_env["PAYLEDGER_WORKERS"].split(",")), "https to the workers")
    cron = pod_spec(next(o for o in objects if o["kind"] == "CronJob"))["containers"][0]
    check(env_of(cron)["PAYLEDGER_COORDINATOR_URL"]["value"].startswith("https://"), "https to the coordinator")
    test = pod_spec(next(o for o in objects if o["kind"] == "Pod"))["containers"][0]
    check(all(u.startswith("https://") for u in test["args"][1:]), "helm test over TLS")

    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    check(len(monitors) == 1, "one ServiceMonitor")
    if monitors:
        sm = monitors[0]
        check(sm["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor labels")
        selected = [o for o in objects if o["kind"] == "Service" and selects(sm["spec"]["selector"]["matchLabels"], o["metadata"]["labels"])
                    and all(o["metadata"]["labels"].get(e["key"]) in e["values"] for e in sm["spec"]["selector"]["matchExpressions"])]
        check(sorted(o["metadata"]["labels"]["app.kubernetes.io/component"] for o in selected)
              == ["archiver", "ingest", "projector", "query", "replay-coordinator"], "the ServiceMonitor scrapes every service")
        for svc in selected:
            check(any(p["name"] == "metrics" for p in svc["spec"]["ports"]), f"{name_of(svc)}: metrics port")
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    check(len(rules) == 1, "one PrometheusRule")
    if rules:
        exprs = {r["alert"]: r["expr"] for g in rules[0]["spec"]["groups"] for r in g["rules"]}
        for metric in ("payledger_projector_lag_records", "payledger_projector_partition_owned", "payledger_projector_checkpoint_timestamp_seconds",
                       "payledger_projector_freshness_seconds_bucket", "payledger_reconciliation_differences",
                       "payledger_archive_lag_records", "payledger_archive_last_cut_timestamp_seconds"):
            check(any(metric in e for e in exprs.values()), f"an alert on {metric}")
        check("!= 0" in exprs.get("PayLedgerReconciliationDifferences", ""), "reconciliation differences != 0")


SCENARIOS = {
    "default": scenario_default,
    "external-nats": scenario_external_nats,
    "backfill-5-replicas": scenario_backfill_5_replicas,
    "tls-monitoring": scenario_tls_monitoring,
}


def run_checks(scenario: str, objects: list[dict], versions: list[str]) -> list[str]:
    failures.clear()
    index = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    check(len(index) == len(objects), "two objects of the same kind and name")
    validate_schemas(objects, versions)
    if not failures:
        common_facts(objects, index)
        SCENARIOS[scenario](objects, index)
    return list(failures)


# Mistakes the checks must catch, each applied alone to the default rendering.
def _first(objects: list[dict], kind: str) -> dict:
    return next(o for o in objects if o["kind"] == kind)


MUTATIONS = {
    "a misspelt container field": lambda objs: pod_spec(_first(objs, "Deployment"))["containers"][0].update(imagePulPolicy="Always"),
    "an unknown apiVersion": lambda objs: _first(objs, "StatefulSet").update(apiVersion="apps/v2"),
    "a string where Kubernetes wants an integer": lambda objs: _first(objs, "Deployment")["spec"].update(replicas="2"),
    "one more verb in the Role": lambda objs: _first(objs, "Role")["rules"][0]["verbs"].append("delete"),
    "a token as a plain value": lambda objs: pod_spec(_first(objs, "CronJob"))["containers"][0]["env"].append({"name": "PAYLEDGER_TOKEN_X", "value": "t0ken"}),
    "a CronJob running something else": lambda objs: pod_spec(_first(objs, "CronJob"))["containers"][0]["args"].remove("--yesterday"),
    "a Service selecting no pod": lambda objs: _first(objs, "Service")["spec"]["selector"].update({"app.kubernetes.io/component": "nothing"}),
}


def self_test(rendered: str, versions: list[str]) -> int:
    """Each mutation of a good rendering must fail the checks; the rendering itself must pass."""
    with open(rendered) as f:
        text = f.read()
    bad = 0
    for what, mutate in {"nothing": lambda objs: None, **MUTATIONS}.items():
        objects = [o for o in yaml.safe_load_all(text) if o]
        mutate(objects)
        found = run_checks("default", objects, versions)
        if (what == "nothing") == bool(found):
            bad += 1
            print(f"  self-test: {what}: {'failed' if found else 'not caught'} {found[:3]}")
    print(f"  self-test: {len(MUTATIONS)} planted mistakes, {'all caught' if not bad else f'{bad} wrong'}")
    return 1 if bad else 0


def main() -> int:
    if sys.argv[1] == "--self-test":
        return self_test(sys.argv[2], sys.argv[3:])
    scenario, rendered, versions = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(rendered) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    found = run_checks(scenario, objects, versions)
    for failure in found:
        print(f"  {scenario}: {failure}")
    print(f"  {scenario}: {len(objects)} objects, {'OK' if not found else f'{len(found)} failed checks'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
