//! Access control over real processes: every payledger method needs a bearer token
//! of its role; a refused call changes nothing; health stays open; the coordinator
//! calls the workers with the internal role's token.

use std::time::{Duration, Instant};

use payledger_e2e::{Harness, ingest_client, now_us, query_client, stream_messages};
use payledger_proto::v1::{self, replay_coordinator_client::ReplayCoordinatorClient};
use tonic::Code;
use tonic::transport::Channel;

const PRODUCER: &str = "producer-token-aaaaaaaaaaaaaaaa";
const READER: &str = "reader-token-bbbbbbbbbbbbbbbbbb";
const OPERATOR: &str = "operator-token-cccccccccccccccc";
const INTERNAL: &str = "internal-token-dddddddddddddddd";

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    request
}

fn event(id: &str) -> v1::Event {
    v1::Event {
        event_id: id.into(),
        merchant_id: "m-access".into(),
        kind: v1::EventKind::PaymentCaptured as i32,
        amount_minor: 1250,
        currency: "EUR".into(),
        event_time_us: now_us() - 1_000_000,
        corrects_event_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_only_its_methods_and_refused_calls_change_nothing() -> anyhow::Result<()>
{
    let mut h = Harness::start()?;
    let tokens = h.dir.path().join("tokens");
    std::fs::create_dir_all(&tokens)?;
    for (role, token) in [
        ("producer", PRODUCER),
        ("reader", READER),
        ("operator", OPERATOR),
        ("internal", INTERNAL),
    ] {
        std::fs::write(tokens.join(role), format!("{token}\n"))?;
    }
    let tokens = tokens.display().to_string();
    let store = h.store();
    let ingest = h
        .spawn(
            "payledger-ingest",
            &[
                "--tokens-dir",
                &tokens,
                "--archive-store",
                &store,
                "--archive-flush-interval",
                "200ms",
                "--heartbeat-interval",
                "0s",
            ],
        )
        .await?;
    let projector = h
        .spawn(
            "payledger-projector",
            &[
                "--tokens-dir",
                &tokens,
                "--store",
                &format!("{store}-projector"),
                "--archive-store",
                &store,
            ],
        )
        .await?;
    // The query service takes its tokens from the environment instead of files.
    let query = h
        .spawn_with_env(
            "payledger-query",
            &["--store", &store],
            &[
                ("PAYLEDGER_PRODUCER_TOKENS".into(), PRODUCER.into()),
                ("PAYLEDGER_READER_TOKENS".into(), READER.into()),
                ("PAYLEDGER_OPERATOR_TOKENS".into(), OPERATOR.into()),
                ("PAYLEDGER_INTERNAL_TOKENS".into(), INTERNAL.into()),
            ],
        )
        .await?;
    let coordinator = h
        .spawn(
            "payledger-replay-coordinator",
            &[
                "--tokens-dir",
                &tokens,
                "--store",
                &store,
                "--workers",
                &projector.url(),
            ],
        )
        .await?;

    // Ingest: no token, an unknown one and a reader's are refused; nothing is written.
    let mut ingest_calls = ingest_client(&ingest.url()).await?;
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("not-a-token-of-this-platform"), Code::Unauthenticated),
        (Some(READER), Code::PermissionDenied),
        (Some(OPERATOR), Code::PermissionDenied),
    ] {
        let request = with_token(
            v1::PublishRequest {
                events: vec![event("ev-refused")],
            },
            token,
        );
        let status = ingest_calls.publish(request).await.expect_err("refused");
        assert_eq!(status.code(), code, "{token:?}: {status:?}");
        assert!(!status.message().contains(PRODUCER) && !status.message().contains(READER));
    }
    let dimension = v1::PublishDimensionRequest {
        record: Some(v1::publish_dimension_request::Record::Fx(v1::FxRate {
            currency: "EUR".into(),
            rate: "1.08".into(),
            effective_date: "2026-11-24".into(),
            version: 1,
        })),
    };
    let status = ingest_calls
        .publish_dimension(with_token(dimension, Some(READER)))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        stream_messages(&h.nats.url()).await?,
        0,
        "a refused call writes nothing"
    );
    let accepted = ingest_calls
        .publish(with_token(
            v1::PublishRequest {
                events: vec![event("ev-1")],
            },
            Some(PRODUCER),
        ))
        .await?
        .into_inner();
    assert_eq!(accepted.results.len(), 1);
    assert_eq!(stream_messages(&h.nats.url()).await?, 1);

    // Query: reads need the reader role, reconciliation the operator's.
    let mut reads = query_client(&query.url()).await?;
    let current = || v1::GetCurrentExposureRequest {
        merchant_id: "m-access".into(),
    };
    assert_eq!(
        reads
            .get_current_exposure(with_token(current(), Some(PRODUCER)))
            .await
            .expect_err("refused")
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        reads
            .get_current_exposure(with_token(current(), None))
            .await
            .expect_err("refused")
            .code(),
        Code::Unauthenticated
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match reads
            .get_current_exposure(with_token(current(), Some(READER)))
            .await
        {
            Ok(found) if !found.get_ref().rows.is_empty() => break,
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(s.into()),
        }
        anyhow::ensure!(Instant::now() < deadline, "the accepted event never showed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let today = payledger_semantics::Day::of_micros(now_us()).to_string();
    let reconcile = || v1::ReconcileRequest {
        from_day: today.clone(),
        to_day: today.clone(),
        max_differences: 0,
    };
    assert_eq!(
        reads
            .reconcile(with_token(reconcile(), Some(READER)))
            .await
            .expect_err("refused")
            .code(),
        Code::PermissionDenied
    );
    reads
        .reconcile(with_token(reconcile(), Some(OPERATOR)))
        .await?;

    // Replays: the operator's; the coordinator reaches the worker with the internal token.
    let mut replays =
        ReplayCoordinatorClient::new(Channel::from_shared(coordinator.url())?.connect().await?);
    let start = || v1::StartReplayRequest {
        from_day: today.clone(),
        to_day: today.clone(),
        reason: "access test".into(),
        cutoff: 0,
        from_genesis: false,
    };
    assert_eq!(
        replays
            .start_replay(with_token(start(), Some(READER)))
            .await
            .expect_err("refused")
            .code(),
        Code::PermissionDenied
    );
    let mut worker = payledger_proto::v1::projector_service_client::ProjectorServiceClient::new(
        Channel::from_shared(projector.url())?.connect().await?,
    );
    let shard = v1::RunShardRequest {
        partitions: vec![0],
        ..Default::default()
    };
    assert_eq!(
        worker
            .run_shard(with_token(shard.clone(), Some(OPERATOR)))
            .await
            .expect_err("refused")
            .code(),
        Code::PermissionDenied
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let started = loop {
        match replays
            .start_replay(with_token(start(), Some(OPERATOR)))
            .await
        {
            Ok(r) => break r.into_inner(),
            // The archiver writes its first watermark shortly.
            Err(s) if s.code() == Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(s.into()),
        }
    };
    wait_succeeded(&mut replays, &started.replay_id).await?;

    // Token files are read again when they change (a rotated Secret): once the
    // internal token is replaced, the worker refuses the old one, and the
    // coordinator calls it with the new one.
    const INTERNAL_ROTATED: &str = "internal-rotated-eeeeeeeeeeeeeeee";
    replace(
        &h.dir.path().join("tokens").join("internal"),
        &format!("{INTERNAL_ROTATED}\n"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match worker
            .run_shard(with_token(shard.clone(), Some(INTERNAL)))
            .await
        {
            Err(s) if s.code() == Code::Unauthenticated => break,
            _ => {}
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the worker still accepts the replaced internal token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = replays
        .start_replay(with_token(start(), Some(OPERATOR)))
        .await?
        .into_inner();
    wait_succeeded(&mut replays, &again.replay_id).await
}

async fn wait_succeeded(
    replays: &mut ReplayCoordinatorClient<Channel>,
    replay_id: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replay = replays
            .get_replay(with_token(
                v1::GetReplayRequest {
                    replay_id: replay_id.to_string(),
                },
                Some(OPERATOR),
            ))
            .await?
            .into_inner();
        if replay.state == i32::from(v1::ReplayState::Succeeded) {
            return Ok(());
        }
        anyhow::ensure!(
            replay.state < i32::from(v1::ReplayState::Succeeded) && Instant::now() < deadline,
            "replay did not succeed: {replay:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A certificate authority for the test, and certificates it signs.
struct Authority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Authority {
    fn new(name: &str) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        })
    }

    /// (certificate, key) in PEM for the loopback names.
    fn sign(&self) -> anyhow::Result<(String, String)> {
        self.sign_for(&["localhost", "127.0.0.1"])
    }

    /// (certificate, key) in PEM naming `names` only.
    fn sign_for(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        Ok((
            params.signed_by(&key, &self.issuer)?.pem(),
            key.serialize_pem(),
        ))
    }
}

/// Writes through a rename, as a Kubernetes Secret update does.
fn replace(path: &std::path::Path, content: &str) -> anyhow::Result<()> {
    let temp = path.with_extension("new");
    std::fs::write(&temp, content)?;
    std::fs::rename(temp, path)?;
    Ok(())
}

async fn tls_channel(
    addr: &str,
    ca: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("a url")
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_plaintext_and_strangers_and_serves_a_rotated_certificate() -> anyhow::Result<()>
{
    let mut h = Harness::start()?;
    let (ca, other_ca) = (
        Authority::new("payledger test CA")?,
        Authority::new("another CA")?,
    );
    let dir = h.dir.path().join("tls");
    std::fs::create_dir_all(&dir)?;
    let (cert_path, key_path, client_ca_path) =
        (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    let (cert, key) = ca.sign()?;
    std::fs::write(&cert_path, cert)?;
    std::fs::write(&key_path, key)?;
    std::fs::write(&client_ca_path, &ca.pem)?;
    let tokens = h.dir.path().join("tokens");
    std::fs::create_dir_all(&tokens)?;
    std::fs::write(tokens.join("producer"), format!("{PRODUCER}\n"))?;
    let health = format!(
        "127.0.0.1:{}",
        payledger_server_common::local_nats::free_port()?
    );
    let ingest = h
        .spawn(
            "payledger-ingest",
            &[
                "--tokens-dir",
                &tokens.display().to_string(),
                "--tls-cert",
                &cert_path.display().to_string(),
                "--tls-key",
                &key_path.display().to_string(),
                "--health-listen",
                &health,
                "--heartbeat-interval",
                "0s",
            ],
        )
        .await?;
    let publish = |id: &str| {
        with_token(
            v1::PublishRequest {
                events: vec![event(id)],
            },
            Some(PRODUCER),
        )
    };

    // Plaintext to the TLS port: no answer.
    let plaintext = match Channel::from_shared(ingest.url())?.connect().await {
        Ok(channel) => {
            payledger_proto::v1::ingest_service_client::IngestServiceClient::new(channel)
                .publish(publish("ev-plain"))
                .await
                .map(|_| ())
        }
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(plaintext.is_err(), "plaintext must not reach a TLS server");
    // A client that trusts another CA refuses the server.
    assert!(
        tls_channel(&ingest.addr, &other_ca.pem, None)
            .await
            .is_err(),
        "a wrong CA must fail the handshake"
    );
    assert_eq!(
        stream_messages(&h.nats.url()).await?,
        0,
        "nothing refused was written"
    );
    // The right CA and token: accepted. Health answers in plaintext beside.
    let mut client = payledger_proto::v1::ingest_service_client::IngestServiceClient::new(
        tls_channel(&ingest.addr, &ca.pem, None).await?,
    );
    client.publish(publish("ev-tls")).await?;
    assert_eq!(stream_messages(&h.nats.url()).await?, 1);
    let status = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{health}"))?
            .connect()
            .await?,
    )
    .check(tonic_health::pb::HealthCheckRequest::default())
    .await?
    .into_inner()
    .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // The certificate is rotated (now signed by the other CA): new connections get
    // the new one without a restart.
    let (cert, key) = other_ca.sign()?;
    replace(&key_path, &key)?;
    replace(&cert_path, &cert)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_channel(&ingest.addr, &other_ca.pem, None)
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        tls_channel(&ingest.addr, &ca.pem, None).await.is_err(),
        "the old certificate is gone"
    );

    // Mutual TLS: without a client certificate of the client CA, no connection.
    let query = h
        .spawn(
            "payledger-query",
            &[
                "--tls-cert",
                &cert_path.display().to_string(),
                "--tls-key",
                &key_path.display().to_string(),
                "--tls-client-ca",
                &client_ca_path.display().to_string(),
                "--health-listen",
                &format!(
                    "127.0.0.1:{}",
                    payledger_server_common::local_nats::free_port()?
                ),
            ],
        )
        .await?;
    let ask = || v1::GetCurrentExposureRequest {
        merchant_id: "m-access".into(),
    };
    let anonymous = match tls_channel(&query.addr, &other_ca.pem, None).await {
        Ok(channel) => payledger_proto::v1::query_service_client::QueryServiceClient::new(channel)
            .get_current_exposure(ask())
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(anonymous.is_err(), "no client certificate, no answer");
    let stranger = other_ca.sign()?;
    let strange = match tls_channel(&query.addr, &other_ca.pem, Some(&stranger)).await {
        Ok(channel) => payledger_proto::v1::query_service_client::QueryServiceClient::new(channel)
            .get_current_exposure(ask())
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(
        strange.is_err(),
        "a client certificate of another CA is refused"
    );
    let known = ca.sign()?;
    let mut reads = payledger_proto::v1::query_service_client::QueryServiceClient::new(
        tls_channel(&query.addr, &other_ca.pem, Some(&known)).await?,
    );
    // Through mutual TLS the service answers about the data (no projector runs
    // here, so the merchant is not found): access is no longer the question.
    let answer = reads.get_current_exposure(ask()).await;
    assert!(
        matches!(&answer, Err(s) if s.code() == Code::NotFound),
        "{answer:?}"
    );
    Ok(())
}

/// Starts a replay of today through `coordinator` (once the archiver has cut the log)
/// and follows it until it ends.
async fn replay_today(coordinator: &str) -> anyhow::Result<v1::Replay> {
    let mut replays = ReplayCoordinatorClient::new(
        Channel::from_shared(coordinator.to_string())?
            .connect()
            .await?,
    );
    let today = payledger_semantics::Day::of_micros(now_us()).to_string();
    let start = || v1::StartReplayRequest {
        from_day: today.clone(),
        to_day: today.clone(),
        reason: "worker TLS test".into(),
        cutoff: 0,
        from_genesis: false,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let started = loop {
        match replays.start_replay(start()).await {
            Ok(r) => break r.into_inner(),
            // The archiver writes its first watermark shortly.
            Err(s) if s.code() == Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(s.into()),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replay = replays
            .get_replay(v1::GetReplayRequest {
                replay_id: started.replay_id.clone(),
            })
            .await?
            .into_inner();
        if replay.state >= i32::from(v1::ReplayState::Succeeded) {
            return Ok(replay);
        }
        anyhow::ensure!(Instant::now() < deadline, "replay did not end: {replay:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The coordinator calls a worker that serves TLS and requires client certificates:
/// with the worker CA, its client certificate and the name the worker's certificate
/// carries, a replay commits; without the CA (plaintext), without a client
/// certificate, or checking the wrong name, the shard fails and the replay with it,
/// saying what to check. https:// workers without the CA are refused at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_calls_workers_over_mutual_tls_and_fails_plainly_without_it()
-> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let ca = Authority::new("payledger test CA")?;
    let dir = h.dir.path().join("tls");
    std::fs::create_dir_all(&dir)?;
    let write = |name: &str, pem: &str| -> anyhow::Result<String> {
        let path = dir.join(name);
        std::fs::write(&path, pem)?;
        Ok(path.display().to_string())
    };
    // The worker's certificate names its Service only, not the address the
    // coordinator dials: as in a cluster, where discovered workers are pod IPs.
    let (cert, key) = ca.sign_for(&["payledger-projector"])?;
    let (worker_cert, worker_key) = (write("worker.crt", &cert)?, write("worker.key", &key)?);
    let (cert, key) = ca.sign_for(&["payledger-replay-coordinator"])?;
    let (client_cert, client_key) = (write("client.crt", &cert)?, write("client.key", &key)?);
    let ca_file = write("ca.crt", &ca.pem)?;
    let store = h.store();
    let ingest = h
        .spawn(
            "payledger-ingest",
            &[
                "--archive-store",
                &store,
                "--archive-flush-interval",
                "200ms",
                "--heartbeat-interval",
                "0s",
            ],
        )
        .await?;
    ingest_client(&ingest.url())
        .await?
        .publish(v1::PublishRequest {
            events: vec![event("ev-worker-tls")],
        })
        .await?;
    // A replay worker that serves TLS only and requires client certificates.
    let worker = h
        .spawn(
            "payledger-projector",
            &[
                "--mode",
                "replay",
                "--store",
                &format!("{store}-worker"),
                "--archive-store",
                &store,
                "--tls-cert",
                &worker_cert,
                "--tls-key",
                &worker_key,
                "--tls-client-ca",
                &ca_file,
                "--health-listen",
                &format!(
                    "127.0.0.1:{}",
                    payledger_server_common::local_nats::free_port()?
                ),
            ],
        )
        .await?;
    let (https, http) = (format!("https://{}", worker.addr), worker.url());
    // No stream projector runs: reconciliation compares after a short wait.
    let coordinator_args = |workers: &str, more: &[&str]| -> Vec<String> {
        let mut args = [
            "--store",
            store.as_str(),
            "--workers",
            workers,
            "--shard-attempts",
            "1",
            "--reconcile-wait",
            "1s",
        ]
        .map(String::from)
        .to_vec();
        args.extend(more.iter().map(|a| a.to_string()));
        args
    };
    let spawn = async |h: &mut Harness, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        h.spawn("payledger-replay-coordinator", &args).await
    };

    // With the CA, the client certificate and the Service's name: the replay runs
    // on the worker over mutual TLS and commits.
    let mut coordinator = spawn(
        &mut h,
        coordinator_args(
            &https,
            &[
                "--worker-ca",
                &ca_file,
                "--worker-client-cert",
                &client_cert,
                "--worker-client-key",
                &client_key,
                "--worker-tls-server-name",
                "payledger-projector",
            ],
        ),
    )
    .await?;
    let replay = replay_today(&coordinator.url()).await?;
    anyhow::ensure!(
        replay.state == i32::from(v1::ReplayState::Succeeded) && replay.commit_number > 0,
        "the replay over TLS did not commit: {replay:?}"
    );
    assert!(
        replay
            .shards
            .iter()
            .all(|s| s.worker == https && s.state == i32::from(v1::ShardState::Done)),
        "{replay:?}"
    );
    coordinator.terminate().await?;

    // An https:// worker without the worker CA: refused at start-up.
    let refused = spawn(&mut h, coordinator_args(&https, &[]))
        .await
        .err()
        .expect("a coordinator with https:// workers and no --worker-ca must not start");
    assert!(refused.to_string().contains("--worker-ca"), "{refused:#}");

    // Plaintext to the TLS worker: the shard fails, and the replay with it.
    let mut plaintext = spawn(&mut h, coordinator_args(&http, &[])).await?;
    let replay = replay_today(&plaintext.url()).await?;
    assert_eq!(
        replay.state,
        i32::from(v1::ReplayState::Failed),
        "{replay:?}"
    );
    assert_eq!(replay.commit_number, 0);
    assert!(
        replay.error.contains(&http) && replay.error.contains("pass --worker-ca"),
        "{}",
        replay.error
    );
    plaintext.terminate().await?;

    // The CA but no client certificate: the worker refuses the handshake.
    let mut anonymous = spawn(
        &mut h,
        coordinator_args(
            &https,
            &[
                "--worker-ca",
                &ca_file,
                "--worker-tls-server-name",
                "payledger-projector",
            ],
        ),
    )
    .await?;
    let replay = replay_today(&anonymous.url()).await?;
    assert_eq!(
        replay.state,
        i32::from(v1::ReplayState::Failed),
        "{replay:?}"
    );
    assert!(
        replay.error.contains("pass --worker-client-cert"),
        "{}",
        replay.error
    );
    anonymous.terminate().await?;

    // The certificate checked against the host of the URL, an address it does not
    // name: refused too.
    let mut misnamed = spawn(
        &mut h,
        coordinator_args(
            &https,
            &[
                "--worker-ca",
                &ca_file,
                "--worker-client-cert",
                &client_cert,
                "--worker-client-key",
                &client_key,
            ],
        ),
    )
    .await?;
    let replay = replay_today(&misnamed.url()).await?;
    assert_eq!(
        replay.state,
        i32::from(v1::ReplayState::Failed),
        "{replay:?}"
    );
    assert!(
        replay.error.contains("invalid peer certificate"),
        "{}",
        replay.error
    );
    misnamed.terminate().await?;
    Ok(())
}
