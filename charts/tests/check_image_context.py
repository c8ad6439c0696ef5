"""Checks the Dockerfile's build against the repository, without a Docker engine.

    python check_image_context.py REPO_ROOT

- Every COPY source of the build stage is let through by .dockerignore (which
  excludes everything else).
- Cargo can load the workspace from those files alone, with the lock file as it is
  (`cargo metadata --locked`): no workspace member or path dependency outside them.
- The binaries the build stage copies out are exactly the [[bin]] targets of the
  packages it builds, and those are every binary of the workspace.

It does not build the image: that needs a Docker engine (`just image`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    root = Path(sys.argv[1]).resolve()
    failures: list[str] = []
    dockerfile = (root / "Dockerfile").read_text()
    # Join continuation lines, drop comments.
    lines = re.sub(r"\\\n\s*", " ", "\n".join(l for l in dockerfile.splitlines() if not l.lstrip().startswith("#"))).splitlines()
    stages: list[list[str]] = []
    for line in lines:
        if re.match(r"^FROM\s", line, re.I):
            stages.append([])
        if stages:
            stages[-1].append(line.strip())
    build = stages[0]

    sources: list[str] = []
    for line in build:
        if line.upper().startswith("COPY ") and "--from" not in line:
            parts = line.split()[1:]
            sources += parts[:-1]
    allowed = {l.strip().lstrip("!").rstrip("/") for l in (root / ".dockerignore").read_text().splitlines() if l.strip().startswith("!")}
    first_rule = next(l.strip() for l in (root / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#"))
    if first_rule != "*":
        failures.append(".dockerignore should exclude everything ('*') and let through what the build copies")
    for src in sources:
        if src.rstrip("/") not in allowed:
            failures.append(f"COPY {src}: excluded by .dockerignore")

    # The build context: the files git knows under the COPY sources.
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *sources],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        for rel in listed:
            if (root / rel).is_file():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / rel, Path(tmp) / rel)
        result = subprocess.run(
            ["cargo", "metadata", "--locked", "--format-version", "1", "--manifest-path", str(Path(tmp) / "Cargo.toml")],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            failures.append("cargo cannot load the workspace from the build context: " + result.stderr.strip()[-600:])
            metadata = None
        else:
            metadata = json.loads(result.stdout)

    run = " ".join(l for l in build if l.upper().startswith("RUN "))
    built = set(re.findall(r"-p\s+([A-Za-z0-9_-]+)", run))
    copied = set(re.findall(r"target/release/([A-Za-z0-9_-]+)", run))
    if metadata:
        members = set(metadata["workspace_members"])
        bins = {
            p["name"]: {t["name"] for t in p["targets"] if "bin" in t["kind"]}
            for p in metadata["packages"] if p["id"] in members
        }
        every_bin = set().union(*bins.values())
        of_built = set().union(*(bins.get(p, set()) for p in built))
        if not built <= set(bins):
            failures.append(f"cargo build -p names unknown packages: {sorted(built - set(bins))}")
        if copied != of_built:
            failures.append(f"copies {sorted(copied)} but builds the binaries {sorted(of_built)}")
        if every_bin != of_built:
            failures.append(f"the image lacks the workspace binaries {sorted(every_bin - of_built)}")

    runtime = stages[-1]
    user = next((l.split()[1] for l in runtime if l.upper().startswith("USER ")), None)
    if user is None or not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user):
        failures.append(f"the runtime stage should end as a numeric non-root USER, not {user}")
    if not re.match(r"FROM\s+\S*slim", runtime[0], re.I):
        failures.append(f"the runtime stage should start from a slim base: {runtime[0]}")

    for f in failures:
        print(f"  image: {f}")
    print(f"  image: {len(sources)} COPY sources, {len(copied)} binaries, {'OK' if not failures else f'{len(failures)} failed checks'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
