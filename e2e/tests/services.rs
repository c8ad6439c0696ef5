//! Every service binary as an operator meets it: `--help` explains the flags, gRPC
//! health answers SERVING, reflection lists what the binary serves (and nothing
//! it does not), and SIGTERM stops it cleanly with exit status 0.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use payledger_e2e::{Service, Stack, binary};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION: &str = "grpc.reflection.v1.ServerReflection";
const INGEST: &str = "payledger.v1.IngestService";
const QUERY: &str = "payledger.v1.QueryService";
const PROJECTOR: &str = "payledger.v1.ProjectorService";
const COORDINATOR: &str = "payledger.v1.ReplayCoordinator";

fn help(binary_name: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(binary(binary_name)?)
        .args(args)
        .arg("--help")
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    anyhow::ensure!(
        output.status.success(),
        "{binary_name} {args:?} --help exited with {}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

fn assert_mentions(text: &str, what: &str, words: &[&str]) {
    for word in words {
        assert!(
            text.contains(word),
            "{what} does not mention {word}:\n{text}"
        );
    }
}

#[test]
fn help_of_every_binary_explains_its_flags() -> anyhow::Result<()> {
    let ingest = help("payledger-ingest", &[])?;
    assert_mentions(
        &ingest,
        "payledger-ingest --help",
        &[
            "Usage: payledger-ingest",
            "--listen",
            "--nats-url",
            "--partitions",
            "--dedup-horizon",
            "--max-clock-skew",
            "--max-batch-events",
            "--max-request-bytes",
            "--heartbeat-interval",
            "--duplicate-window",
            "PAYLEDGER_NATS_URL",
            "[default: 1m]",
        ],
    );
    // Ingest enforces only the stream's settings; the projection's are the projector's.
    assert!(
        !ingest.contains("--allowed-lateness") && !ingest.contains("--bucket-width"),
        "{ingest}"
    );
    let projector = help("payledger-projector", &[])?;
    assert_mentions(
        &projector,
        "payledger-projector --help",
        &[
            "Usage: payledger-projector",
            "--listen",
            "--nats-url",
            "--store",
            "--own-partitions",
            "--checkpoint-every",
            "--checkpoint-interval",
            "--flush-interval",
            "--allowed-lateness",
            "--bucket-width",
            "--mode",
            "--max-concurrent-shards",
            "--replay-max-records-per-sec",
            "--pod-name",
            "PAYLEDGER_STORE",
        ],
    );
    let coordinator = help("payledger-replay-coordinator", &[])?;
    assert_mentions(
        &coordinator,
        "payledger-replay-coordinator --help",
        &[
            "Usage: payledger-replay-coordinator",
            "--workers",
            "--max-shards-per-worker",
            "--shard-attempts",
            "--shard-stall-timeout",
            "--max-active-replays",
            "--reconcile-wait",
            "PAYLEDGER_WORKERS",
        ],
    );
    let replay_start = help("payledger", &["replay", "start"])?;
    assert_mentions(
        &replay_start,
        "payledger replay start --help",
        &[
            "--from",
            "--to",
            "--yesterday",
            "--reason",
            "--wait",
            "--coordinator-url",
            "Exit status",
        ],
    );
    let query = help("payledger-query", &[])?;
    assert_mentions(
        &query,
        "payledger-query --help",
        &[
            "Usage: payledger-query",
            "--listen",
            "--nats-url",
            "--max-watch-merchants",
            "--max-concurrent-requests",
        ],
    );
    let cli = help("payledger", &[])?;
    assert_mentions(
        &cli,
        "payledger --help",
        &[
            "Usage: payledger",
            "dev",
            "demo",
            "gen",
            "ingest",
            "query",
            "--json",
        ],
    );
    let gen_help = help("payledger", &["gen"])?;
    assert_mentions(
        &gen_help,
        "payledger gen --help",
        &["--seed", "--events", "--send", "--out", "--ingest-url"],
    );
    let query_daily = help("payledger", &["query", "daily"])?;
    assert_mentions(
        &query_daily,
        "payledger query daily --help",
        &["--consistency", "--query-url"],
    );
    Ok(())
}

async fn health(service: &Service, name: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = Channel::from_shared(service.url())
        .expect("a valid url")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: name.to_string(),
        })
        .await?
        .into_inner()
        .status;
    Ok(ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown))
}

async fn reflect(service: &Service, request: MessageRequest) -> anyhow::Result<MessageResponse> {
    let channel = Channel::from_shared(service.url())?.connect().await?;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await?
        .into_inner();
    let response = responses
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("{}: reflection answered nothing", service.name))?;
    response
        .message_response
        .ok_or_else(|| anyhow::anyhow!("{}: an empty reflection response", service.name))
}

async fn listed_services(service: &Service) -> anyhow::Result<BTreeSet<String>> {
    match reflect(service, MessageRequest::ListServices(String::new())).await? {
        MessageResponse::ListServicesResponse(list) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("{}: ListServices answered {other:?}", service.name),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_health_and_reflection_and_stops_on_sigterm() -> anyhow::Result<()> {
    let Stack {
        mut ingest,
        projector: Some(mut projector),
        query: Some(mut query),
        mut h,
        store,
        ..
    } = Stack::builder().projector(&[]).query(&[]).start().await?
    else {
        unreachable!("the stack was built with a projector and query")
    };
    let mut coordinator = h
        .spawn(
            "payledger-replay-coordinator",
            &["--store", &store, "--workers", &projector.url()],
        )
        .await?;

    // (service, the payledger service it serves, if any)
    let expectations: [(&Service, Option<&str>); 4] = [
        (&ingest, Some(INGEST)),
        (&projector, Some(PROJECTOR)),
        (&query, Some(QUERY)),
        (&coordinator, Some(COORDINATOR)),
    ];
    for (service, own) in expectations {
        let name = &service.name;
        // Health: the server as a whole, and its own service by name.
        assert_eq!(
            health(service, "").await?,
            ServingStatus::Serving,
            "{name}: overall health"
        );
        if let Some(own) = own {
            assert_eq!(
                health(service, own).await?,
                ServingStatus::Serving,
                "{name}: health of {own}"
            );
        }
        // A service the binary does not run is unknown to its health service.
        for other in [INGEST, QUERY, PROJECTOR, COORDINATOR]
            .into_iter()
            .filter(|s| Some(*s) != own)
        {
            let status = health(service, other).await;
            assert!(
                matches!(&status, Err(s) if s.code() == Code::NotFound),
                "{name}: health of {other}, which it does not serve, answered {status:?}"
            );
        }

        // Reflection lists exactly what the binary serves.
        let listed = listed_services(service).await?;
        let mut want: BTreeSet<String> = [HEALTH, REFLECTION].map(String::from).into();
        want.extend(own.map(String::from));
        assert_eq!(
            listed, want,
            "{name}: reflection must list the services the binary serves, and only those"
        );
        // ...and describes its own service, so that grpcurl can call it.
        if let Some(own) = own {
            match reflect(
                service,
                MessageRequest::FileContainingSymbol(own.to_string()),
            )
            .await?
            {
                MessageResponse::FileDescriptorResponse(files) => assert!(
                    !files.file_descriptor_proto.is_empty(),
                    "{name}: no descriptor for {own}"
                ),
                other => panic!("{name}: FileContainingSymbol({own}) answered {other:?}"),
            }
        }
    }

    // `payledger check` (the Helm test hook) agrees, and fails on a dead address.
    let urls: Vec<String> = [&ingest, &projector, &query, &coordinator]
        .iter()
        .map(|s| s.url())
        .collect();
    let checked = Command::new(binary("payledger")?)
        .arg("check")
        .args(&urls)
        .output()?;
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "payledger check: {out}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert_eq!(out.matches("SERVING").count(), 4, "{out}");
    assert!(
        out.contains(COORDINATOR) && out.contains(PROJECTOR),
        "{out}"
    );
    let dead = format!(
        "http://127.0.0.1:{}",
        payledger_server_common::local_nats::free_port()?
    );
    let failed = Command::new(binary("payledger")?)
        .args(["check", &dead])
        .output()?;
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("cannot connect"),
        "{failed:?}"
    );

    // SIGTERM: each stops with status 0 and says so in its log. The projector and
    // query first, while ingest (and the stream) are still there.
    for (service, last_words) in [
        (&mut coordinator, "replay coordinator stopped"),
        (&mut projector, "projector stopped"),
        (&mut query, "query stopped"),
        (&mut ingest, "ingest stopped"),
    ] {
        let started = std::time::Instant::now();
        service.terminate().await?;
        eprintln!(
            "{} stopped {:?} after SIGTERM",
            service.name,
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} took {:?} to stop",
            service.name,
            started.elapsed()
        );
        let log = service.log();
        assert!(
            log.contains(last_words),
            "{}: no '{last_words}' in its log:\n{log}",
            service.name
        );
    }
    Ok(())
}
