#!/usr/bin/env bash
# Checks of the Helm chart and the container image that need neither a Kubernetes
# cluster nor a Docker engine (README, "Deploying with Helm", says what they cover):
#   - helm lint --strict, with the default values and each values set below;
#   - helm template with each values set, every object validated strictly against the
#     Kubernetes schemas of the oldest supported and a current version
#     (kubernetes-validate), the CRD kinds checked field by field, and the chart's
#     promises asserted (check_manifests.py);
#   - values that break values.schema.json, or the chart's own cross-checks, rejected;
#   - the in-chart NATS configuration parsed by nats-server itself;
#   - the Grafana dashboard's ConfigMap, and every panel's PromQL naming only metrics
#     the services export (check_dashboard.py, exported_metrics.txt);
#   - every setting the default values give a server pod equal to that binary's own
#     default, or listed with its reason (check_defaults.py);
#   - the real binaries started as the rendered pods would start them, on this machine
#     (pod_env_smoke.py): health, reflection, tokens, partition ownership, the nightly
#     replay's command;
#   - the Dockerfile linted (hadolint) and its build context loaded by cargo.
# Tools come from `just setup` (Helm in .venv/bin via charts/fetch-helm.sh).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export PATH="$root/.venv/bin:$PATH"
chart=charts/payledger
tests=charts/tests
release=payledger
namespace=payments
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and Helm 4.1's.
kube_versions=(1.30.0 1.35.0)

for tool in helm hadolint nats-server python cargo git; do
    command -v "$tool" >/dev/null || { echo "charts/tests/run.sh: $tool is missing; run \`just setup\`" >&2; exit 1; }
done
python -c "import kubernetes_validate" 2>/dev/null \
    || { echo "charts/tests/run.sh: kubernetes-validate is missing; run \`just setup\`" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
skipped=0
started=$SECONDS

# run WHAT COMMAND...: one check; its output is shown only when it fails.
run() {
    local what=$1
    shift
    if "$@" >"$work/out" 2>&1; then
        passed=$((passed + 1))
        printf 'ok    %s\n' "$what"
        sed -n 's/^  note: /      note: /p' "$work/out"
    else
        failed=$((failed + 1))
        printf 'FAIL  %s\n' "$what"
        sed 's/^/      /' "$work/out"
        return 1
    fi
}

render() {
    local out=$1
    shift
    helm template "$release" "$chart" -n "$namespace" --kube-version "${kube_versions[0]}" "$@" >"$out"
}

# rejected FILE: helm template refuses the values in FILE with the error its first
# line names: "# expect (schema): ..." for values.schema.json, which helm lint enforces
# too, or "# expect (template): ..." for the chart's own checks across values (helm
# lint only logs a template's `fail`).
rejected() {
    local file=$1 by expect
    by="$(sed -n '1s/^# expect (\(schema\|template\)): .*/\1/p' "$file")"
    expect="$(sed -n '1s/^# expect ([a-z]*): //p' "$file")"
    [ -n "$by" ] && [ -n "$expect" ] || { echo "$file has no '# expect (schema|template): ...' first line"; return 1; }
    if helm template "$release" "$chart" -n "$namespace" -f "$file" >"$work/rendered" 2>"$work/err"; then
        echo "helm template accepted $file"
        return 1
    fi
    grep -qF -- "$expect" "$work/err" || { echo "helm template refused $file, but not with \"$expect\":"; cat "$work/err"; return 1; }
    if [ "$by" = schema ] && helm lint --strict "$chart" -f "$file" >"$work/lint" 2>&1; then
        echo "helm lint accepted $file"
        return 1
    fi
}

# The release notes render (helm template leaves them out; a client-side dry run of the
# install needs no cluster).
notes() {
    helm install "$release" "$chart" -n "$namespace" --dry-run=client "$@" >"$work/notes"
    sed -n '/^NOTES:/,$p' "$work/notes" | grep -q "helm test $release"
}

nats_config_valid() {
    python - "$1" >"$work/nats.conf" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(next(d for d in docs if d["kind"] == "ConfigMap" and "nats.conf" in d.get("data", {}))["data"]["nats.conf"])
EOF
    SERVER_NAME=payledger-nats-0 nats-server --config "$work/nats.conf" -t
}

echo "Helm $(helm version --template '{{.Version}}'), kubernetes-validate $(python -c 'import kubernetes_validate; print(kubernetes_validate.__version__)'), Kubernetes schemas ${kube_versions[*]}"

scenarios=(default external-nats backfill-5-replicas tls-monitoring)
for scenario in "${scenarios[@]}"; do
    values=()
    [ "$scenario" = default ] || values=(-f "$tests/values/$scenario.yaml")
    rendered="$work/$scenario.yaml"
    run "lint: $scenario" helm lint --strict "$chart" "${values[@]}" || true
    run "NOTES.txt: $scenario" notes "${values[@]}" || true
    if run "render: $scenario" render "$rendered" "${values[@]}"; then
        run "schemas and facts: $scenario" python "$tests/check_manifests.py" "$scenario" "$rendered" "${kube_versions[@]}" || true
    fi
done

render_dashboard() {
    render "$work/dashboard.yaml" --set grafana.dashboard.enabled=true
}
if run "render: the Grafana dashboard" render_dashboard; then
    run "dashboard: panels query exported metrics" \
        python "$tests/check_dashboard.py" "$work/dashboard.yaml" "$work/default.yaml" "$tests/exported_metrics.txt" || true
fi
run "the checks catch planted mistakes" python "$tests/check_manifests.py" --self-test "$work/default.yaml" "${kube_versions[@]}" || true
run "nats-server accepts the in-chart NATS configuration" nats_config_valid "$work/default.yaml" || true
run "Kubernetes older than 1.30 is refused" \
    bash -c "helm template $release $chart --kube-version 1.29.0 2>&1 | grep -q \"requires kubeVersion\"" || true

for file in "$tests"/invalid/*.yaml; do
    run "rejected: $(basename "$file" .yaml)" rejected "$file" || true
done

# The real binaries with the environment of the rendered pods (`just test` builds them
# first; PAYLEDGER_BIN_DIR points elsewhere).
bin_dir="${PAYLEDGER_BIN_DIR:-$root/target/debug}"
for scenario in default backfill-5-replicas; do
    if [ -x "$bin_dir/payledger" ] && [ -x "$bin_dir/payledger-ingest" ] && [ -x "$bin_dir/payledger-projector" ] \
        && [ -x "$bin_dir/payledger-query" ] && [ -x "$bin_dir/payledger-replay-coordinator" ]; then
        run "the binaries run with the pods' environment: $scenario" \
            python "$tests/pod_env_smoke.py" "$work/$scenario.yaml" "$bin_dir" || true
    else
        skipped=$((skipped + 1))
        printf 'skip  the binaries run with the pods'"'"' environment: %s (none in %s; `just test` builds them)\n' "$scenario" "$bin_dir"
    fi
done

if [ -x "$bin_dir/payledger-ingest" ] && [ -x "$bin_dir/payledger-projector" ] \
    && [ -x "$bin_dir/payledger-query" ] && [ -x "$bin_dir/payledger-replay-coordinator" ]; then
    run "the default values set the binaries' own defaults, or say why not" \
        python "$tests/check_defaults.py" "$work/default.yaml" "$bin_dir" || true
else
    skipped=$((skipped + 1))
    printf 'skip  the default values set the binaries'"'"' own defaults (none in %s; `just test` builds them)\n' "$bin_dir"
fi

run "hadolint Dockerfile" hadolint Dockerfile || true
run "image build context" python "$tests/check_image_context.py" . || true

echo "charts/tests/run.sh: $((SECONDS - started)) s"
if [ "$skipped" -gt 0 ]; then
    echo "chart: $passed passed, $failed failed, $skipped skipped"
else
    echo "chart: $passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
