"""Runs the real binaries with the environment the chart gives its pods.

    python pod_env_smoke.py RENDERED.yaml BIN_DIR

No cluster here, so each pod of the rendered Deployments and StatefulSets becomes a
local process: its ConfigMap and env entries as the kubelet would resolve them
(fieldRefs from the pod's name and namespace, Secret volumes written to a temporary
directory with the keys their `items` select, one generated token per role), with only
what a cluster provides and one machine cannot rewritten:

- addresses: NATS, the listen and metrics ports and the workers' URLs point at
  127.0.0.1 on free ports;
- object storage: the s3:// URLs become one local directory (no S3 server is started
  here);
- NATS replicas: 1, since there is one nats-server.

Then: every service passes the helm test Pod's `payledger check`; once the archiver
has written a cut, the nightly CronJob's command with its operator token commits and
reconciles (exit status 0) on the projector pods; the same command without a token is
refused; each projector worked on its own partitions only (p % replicas == ordinal,
from the partitions its log names), and together on all of them. A process that exits
is restarted, as the kubelet would (at most 3 times; each restart is reported). The
processes are stopped at the end, whatever happens.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SERVER_BINARIES = ("payledger-ingest", "payledger-projector", "payledger-query", "payledger-replay-coordinator")
# Start order: ingest creates the stream whose metadata the others read.
ORDER = {"ingest": 0, "archiver": 1, "projector": 2, "query": 3, "replay-coordinator": 4}
NAMESPACE = "payments"


_handed_out: set[int] = set()


def free_port() -> int:
    # A port is free only until someone binds it, and the processes bind theirs
    # later: never hand out the same one twice.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def main() -> int:
    rendered, bin_dir = sys.argv[1], Path(sys.argv[2]).resolve()
    objects = [o for o in yaml.safe_load_all(open(rendered)) if o]
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    tokens = {role: secrets.token_hex(16) for role in ("producer", "reader", "operator", "internal")}
    work = Path(tempfile.mkdtemp(prefix="payledger-pods-"))
    procs: list[tuple[str, subprocess.Popen]] = []
    failures: list[str] = []
    restarts: dict[str, int] = {}
    work_logs: dict[str, list[str]] = {}
    try:
        nats_port = free_port()
        procs.append(("nats-server", subprocess.Popen(
            [shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(work / "jetstream")],
            stdout=open(work / "nats.log", "w"), stderr=subprocess.STDOUT)))

        # Pods: (component, pod name, pod spec), with a local address for each.
        pods = []
        for obj in objects:
            if obj["kind"] not in ("Deployment", "StatefulSet"):
                continue
            spec = obj["spec"]["template"]["spec"]
            if spec["containers"][0].get("command", [""])[0] not in SERVER_BINARIES:
                continue
            component = obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            names = ([f"{obj['metadata']['name']}-{i}" for i in range(obj["spec"]["replicas"])]
                     if obj["kind"] == "StatefulSet" else [f"{obj['metadata']['name']}-7d9f8-x2k4q"])
            for name in names:
                pods.append((component, name, spec))
        pods.sort(key=lambda p: ORDER[p[0]])
        local = {name: free_port() for _, name, _ in pods}

        def localize_url(url: str) -> str:
            # http://<sts>-N.<headless>:port and http://<service>:port -> 127.0.0.1
            m = re.fullmatch(r"(https?)://([^:/]+):([0-9]+)", url)
            host = m.group(2).split(".")[0]
            if host in local:
                return f"{m.group(1)}://127.0.0.1:{local[host]}"
            service = next(n for c, n, _ in pods if n.startswith(host + "-") and n[len(host) + 1:].count("-") == 1)
            return f"{m.group(1)}://127.0.0.1:{local[service]}"

        def pod_env(name: str, spec: dict) -> dict[str, str]:
            c = spec["containers"][0]
            env: dict[str, str] = {}
            for ref in c.get("envFrom", []):
                env.update(configmaps[ref["configMapRef"]["name"]])
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = str(e["value"])
                elif "fieldRef" in e.get("valueFrom", {}):
                    path = e["valueFrom"]["fieldRef"]["fieldPath"]
                    env[e["name"]] = {"metadata.name": name, "metadata.namespace": NAMESPACE}[path]
                elif "secretKeyRef" in e.get("valueFrom", {}):
                    env[e["name"]] = "unused-with-a-local-store"
            # Secret volumes, as the kubelet projects them.
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for mount in c.get("volumeMounts", []):
                target = work / "pods" / name / mount["name"]
                target.mkdir(parents=True, exist_ok=True)
                secret = volumes[mount["name"]].get("secret")
                if secret and secret["secretName"] == "payledger-api-tokens":
                    for item in secret["items"]:
                        (target / item["path"]).write_text(tokens[item["key"]] + "\n")
                for key, value in list(env.items()):
                    if value.startswith(mount["mountPath"]):
                        env[key] = str(target) + value[len(mount["mountPath"]):]
            # What one machine cannot be.
            env["PAYLEDGER_NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
            env["PAYLEDGER_LISTEN"] = f"127.0.0.1:{local[name]}"
            env["PAYLEDGER_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
            env["PAYLEDGER_STREAM_REPLICAS"] = env["PAYLEDGER_KV_REPLICAS"] = "1"
            for key in ("PAYLEDGER_STORE", "PAYLEDGER_ARCHIVE_STORE"):
                if key in env:
                    env[key] = str(work / "store" / re.sub(r"^[a-z0-9]+://", "", env[key]))
            if "PAYLEDGER_WORKERS" in env:
                env["PAYLEDGER_WORKERS"] = ",".join(localize_url(u) for u in env["PAYLEDGER_WORKERS"].split(","))
            # No Kubernetes API here: the coordinator uses the static worker list the
            # chart also renders (discovery and the Lease have tests of their own,
            # against a fake API server).
            for key in ("PAYLEDGER_WORKERS_SERVICE", "PAYLEDGER_LEASE_NAME"):
                env.pop(key, None)
            return env

        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYLEDGER_", "AWS_", "RUST_BACKTRACE"))}
        launch: dict[str, tuple[list[str], dict[str, str]]] = {}

        def start(name: str) -> None:
            argv, env = launch[name]
            log = open(work / f"{name}.log", "a")
            procs.append((name, subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)))

        def restart_exited() -> None:
            # restartPolicy: Always, as the kubelet would (a pod that lost a start-up
            # race comes back), at most 3 times a pod.
            for i, (name, proc) in enumerate(list(procs)):
                if name in launch and proc.poll() is not None and restarts.get(name, 0) < 3:
                    restarts[name] = restarts.get(name, 0) + 1
                    procs.remove((name, proc))
                    start(name)

        for component, name, spec in pods:
            c = spec["containers"][0]
            launch[name] = ([str(bin_dir / c["command"][0]), *c.get("args", [])], {**base_env, **pod_env(name, spec)})
            start(name)
            if component == "ingest":
                time.sleep(1)  # the stream, with its settings, before the others look for it

        def cli(argv: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
            return subprocess.run([str(bin_dir / "payledger"), *argv], env={**base_env, **env},
                                  capture_output=True, text=True, timeout=timeout)

        # The helm test Pod's check, against every service and projector pod.
        test_pod = next(o for o in objects if o["kind"] == "Pod")["spec"]["containers"][0]
        urls = [localize_url(u) for u in test_pod["args"][1:]]
        deadline = time.monotonic() + 90
        while True:
            result = cli(["check", *urls], {})
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
            restart_exited()
        if result.returncode != 0:
            failures.append(f"payledger check {' '.join(urls)}: {result.stdout}{result.stderr}")
        else:
            print(result.stdout.rstrip())

        # The nightly replay needs an archive cut: the heartbeats ingest sent at start
        # are archived within the archiver's flush interval.
        watermarks = list((work / "store").glob("*/archive/_watermarks"))
        deadline = time.monotonic() + 60
        while not any(w.is_dir() and any(w.iterdir()) for w in watermarks) and time.monotonic() < deadline:
            time.sleep(0.5)
            watermarks = list((work / "store").glob("*/archive/_watermarks"))
        if not watermarks:
            failures.append("the archiver wrote no watermark within 60 s")

        # The nightly CronJob's command, with and without its token.
        cron = next(o for o in objects if o["kind"] == "CronJob")
        job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value", "") for e in job["env"]}
        env["PAYLEDGER_COORDINATOR_URL"] = localize_url(env["PAYLEDGER_COORDINATOR_URL"])
        token_ref = next(e for e in job["env"] if e["name"] == "PAYLEDGER_TOKEN")["valueFrom"]["secretKeyRef"]["key"]
        argv = job["args"]
        unauthenticated = cli(argv, {k: v for k, v in env.items() if k != "PAYLEDGER_TOKEN"})
        if unauthenticated.returncode == 0 or "nauthenticated" not in unauthenticated.stdout + unauthenticated.stderr:
            failures.append(f"without a token the coordinator must refuse: exit {unauthenticated.returncode} "
                            f"{unauthenticated.stdout}{unauthenticated.stderr}")
        env["PAYLEDGER_TOKEN"] = tokens[token_ref]
        nightly = cli(argv, env, timeout=180)
        # 0: committed, and reconciled without a difference.
        if nightly.returncode != 0:
            failures.append(f"payledger {' '.join(argv)}: exit {nightly.returncode}\n{nightly.stdout}{nightly.stderr}")
        else:
            print(f"payledger {' '.join(argv)}: exit {nightly.returncode} "
                  f"({(nightly.stdout + nightly.stderr).strip().splitlines()[-1] if (nightly.stdout + nightly.stderr).strip() else ''})")

        for name, proc in procs:
            if proc.poll() is not None:
                failures.append(f"{name} exited with {proc.returncode}")
    finally:
        for _, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Partition ownership from the ordinal: the partitions each projector's log
        # names are its own (p % replicas == ordinal), and together all of them.
        seen: dict[int, set[int]] = {}
        for component, name, spec in pods:
            if component != "projector":
                continue
            ordinal = int(name.rsplit("-", 1)[1])
            for line in (work / f"{name}.log").read_text(errors="replace").splitlines():
                m = re.search(r'"partition":\s*"?([0-9]+)', line)
                if m:
                    seen.setdefault(ordinal, set()).add(int(m.group(1)))
        replicas = sum(1 for c, _, _ in pods if c == "projector")
        partitions = int(configmaps[next(iter(c for c in configmaps if "PAYLEDGER_PARTITIONS" in configmaps[c]))]["PAYLEDGER_PARTITIONS"])
        for ordinal, owned in seen.items():
            foreign = sorted(p for p in owned if p % replicas != ordinal)
            if foreign:
                failures.append(f"projector {ordinal} of {replicas} worked on partitions {foreign}")
        if set().union(*seen.values()) != set(range(partitions)):
            failures.append(f"the projectors' logs name partitions {sorted(set().union(*seen.values()))}, not all {partitions}")
        for name in restarts:
            work_logs[name] = [l for l in (work / f"{name}.log").read_text(errors="replace").splitlines() if l.startswith("Error:")]
        if failures:
            for log in sorted(work.glob("*.log")):
                tail = log.read_text(errors="replace").strip().splitlines()[-8:]
                print(f"--- {log.name}\n" + "\n".join(tail))
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print(f"  pods: {f}")
    for name, count in sorted(restarts.items()):
        first = (work_logs.get(name) or ["(no output)"])[-1]
        print(f"  note: {name} exited and was restarted {count} time(s); it said: {first}")
    print(f"  pods: {len(procs) - 1} processes from the rendered pods, {'OK' if not failures else f'{len(failures)} failed checks'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
