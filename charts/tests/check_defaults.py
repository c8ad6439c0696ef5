"""The chart sets no service setting to a value other than the binary's own default
unless it means to: every PAYLEDGER_* variable a default rendering gives a server
pod (its env and the shared ConfigMap) with a literal value is compared with the
`[default: …]` that binary's --help shows for it. Deliberate differences are listed
below with their reason; any other difference, or a listed one that is no longer
different, fails.

usage: check_defaults.py DEFAULT.yaml BIN_DIR"""

import re
import subprocess
import sys

import yaml

# Variable -> why the chart's value differs from the binary's default.
DELIBERATE = {
    "PAYLEDGER_STREAM_REPLICAS": "a cluster keeps 3 replicas (nats.streamReplicas); the binary's 1 suits one server",
    "PAYLEDGER_KV_REPLICAS": "the same, for the KV buckets",
    "PAYLEDGER_NATS_URL": "the in-chart NATS cluster's Service",
    "PAYLEDGER_STORE": "the release's object store (objectStore.url)",
    "PAYLEDGER_LISTEN": "pods listen on all interfaces",
}


def help_defaults(binary: str) -> dict[str, str]:
    """PAYLEDGER_* variable -> the default --help shows for its flag."""
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    defaults = {}
    for block in re.split(r"\n\s*\n", text):
        env = re.search(r"\[env: (PAYLEDGER_[A-Z_]+)=", block)
        default = re.search(r"\[default: ([^\]]*)\]", block)
        if env and default:
            defaults[env.group(1)] = default.group(1)
    return defaults


def main() -> int:
    rendered, bin_dir = sys.argv[1], sys.argv[2]
    objects = [o for o in yaml.safe_load_all(open(rendered)) if o]
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    failures, compared, differing = [], 0, set()
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            command = container.get("command", [""])[0]
            if not command.startswith("payledger-"):
                continue
            settings = {}
            for source in container.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                settings.update(configmaps.get(name, {}))
            settings.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
            defaults = help_defaults(f"{bin_dir}/{command}")
            for var, value in sorted(settings.items()):
                if var not in defaults:
                    continue
                compared += 1
                if str(value) == defaults[var]:
                    continue
                differing.add(var)
                if var not in DELIBERATE:
                    failures.append(f"{obj['metadata']['name']}: {var}={value}, but {command} defaults to {defaults[var]}"
                                    " (make them agree, or list the difference and its reason in check_defaults.py)")
    for var in sorted(set(DELIBERATE) - differing):
        failures.append(f"{var} is listed as a deliberate difference but no pod sets it to another value")
    for failure in failures:
        print(f"  defaults: {failure}")
    print(f"  defaults: {compared} settings compared with the binaries' defaults, {'OK' if not failures else f'{len(failures)} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
