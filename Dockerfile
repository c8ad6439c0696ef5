# syntax=docker/dockerfile:1
# One image with every PayLedger binary; a workload picks its service by the command
# (payledger-ingest, payledger-query, payledger-projector,
# payledger-replay-coordinator, or the payledger CLI).
#
#   docker build -t payledger:0.1.0 .        (or: just image)

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The protos are compiled by protox inside the build: no protoc needed. The C parts of
# ring and aws-lc (TLS to S3) build with the gcc the slim Rust image carries.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY services services
COPY e2e e2e
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        -p payledger-cli -p payledger-ingest -p payledger-projector \
        -p payledger-query -p payledger-replay-coordinator \
 && mkdir -p /out \
 && cp target/release/payledger target/release/payledger-ingest \
       target/release/payledger-projector target/release/payledger-query \
       target/release/payledger-replay-coordinator /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# CA roots for object storage and NATS over TLS; nothing else. Unpinned on purpose: it
# should carry the release's latest roots.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 payledger \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin payledger
COPY --from=build /out/ /usr/local/bin/
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 50052 50053 50054 9090
CMD ["payledger", "--help"]
