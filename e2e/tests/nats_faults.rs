//! NATS going away under the services, against the real binaries: a nats-server
//! that crashes and comes back on the same port and store, a server list whose
//! first node is down, and `payledger dev` stopped with SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use payledger_e2e::{
    Harness, Service, assert_converges, binary, ingest_client, metric_value, now_us, query_client,
    read_log, scrape_metrics, wait_healthy,
};
use payledger_proto::v1::{
    self, EventKind, ingest_service_client::IngestServiceClient,
    query_service_client::QueryServiceClient,
};
use payledger_semantics::{Exposure, RecordBody, Settings};
use payledger_server_common::local_nats::free_port;
use tonic::transport::Channel;

const MINUTE_US: i64 = 60_000_000;

/// Ingest without heartbeats, so that the log holds only the test's events.
const INGEST_ARGS: [&str; 2] = ["--heartbeat-interval", "0s"];

/// 20 valid events of round `round` (enough to go as one atomic batch).
fn round_events(round: usize) -> Vec<v1::Event> {
    let now = now_us();
    (0..20)
        .map(|i| v1::Event {
            event_id: format!("ev-{round}-{i}"),
            merchant_id: format!("m-{}", i % 4),
            kind: EventKind::PaymentCaptured as i32,
            amount_minor: 100 + i as i64,
            currency: "EUR".to_string(),
            event_time_us: now - MINUTE_US,
            corrects_event_id: String::new(),
        })
        .collect()
}

/// Publishes one round; Ok only when every event was accepted or absorbed.
async fn publish_round(
    client: &mut IngestServiceClient<Channel>,
    round: usize,
) -> anyhow::Result<()> {
    let call = client.publish(v1::PublishRequest {
        events: round_events(round),
    });
    let results = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??
        .into_inner()
        .results;
    for r in &results {
        anyhow::ensure!(
            !matches!(
                r.outcome,
                Some(v1::publish_result::Outcome::Rejected(_)) | None
            ),
            "round {round}: {r:?}"
        );
    }
    Ok(())
}

/// The oracle from the log itself: a call whose answer was lost in the restart
/// may still have stored its events, and the projector folds what the log holds.
async fn oracle_of_log(nats_url: &str) -> anyhow::Result<Exposure> {
    let mut exposure = Exposure::new(Settings::default());
    for entry in read_log(nats_url).await? {
        if let Some(partition) = entry.partition() {
            exposure.apply(partition, &entry.to_record()?)?;
        }
    }
    Ok(exposure)
}

/// Ingest, a projector and query on one nats-server, a first round of events
/// served.
struct Stack {
    h: Harness,
    _ingest: Service,
    projector: Service,
    query: Service,
    client: IngestServiceClient<Channel>,
    q: QueryServiceClient<Channel>,
}

async fn stack() -> anyhow::Result<Stack> {
    let payledger_e2e::Stack {
        h,
        ingest,
        projector: Some(projector),
        query: Some(query),
        ..
    } = payledger_e2e::Stack::builder()
        .projector(&["--checkpoint-interval", "500ms"])
        .query(&[])
        .start()
        .await?
    else {
        unreachable!("the stack was built with a projector and query")
    };
    let mut client = ingest_client(&ingest.url()).await?;
    let mut q = query_client(&query.url()).await?;
    publish_round(&mut client, 0).await?;
    assert_converges(
        &mut q,
        &oracle_of_log(&h.nats.url()).await?,
        Duration::from_secs(30),
    )
    .await?;
    Ok(Stack {
        h,
        _ingest: ingest,
        projector,
        query,
        client,
        q,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_rides_out_a_nats_server_crash_and_serves_what_follows() -> anyhow::Result<()> {
    let Stack {
        mut h,
        _ingest,
        mut projector,
        mut query,
        mut client,
        mut q,
    } = stack().await?;

    h.restart_nats_hard()?;
    let restarted = Instant::now();

    // Keep writing until the query service says it re-created what the crash took
    // from it (or has had time to), and rounds written after the restart were
    // accepted.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut round = 1;
    let mut accepted_after_restart = 0;
    loop {
        if let Some(status) = query.exited()? {
            anyhow::bail!(
                "query exited with {status} after nats-server restarted:\n{}",
                query.log()
            );
        }
        if let Some(status) = projector.exited()? {
            anyhow::bail!(
                "the projector exited with {status} after nats-server restarted:\n{}",
                projector.log()
            );
        }
        match publish_round(&mut client, round).await {
            Ok(()) => accepted_after_restart += 1,
            Err(e) => eprintln!("round {round} after the restart: {e}"),
        }
        round += 1;
        // Whether a follower saw the loss depends on how fast the server came
        // back (async-nats re-creates some consumers by itself); what must hold
        // either way is checked below: query up, serving what came after.
        let resumed = query.log().contains("re-created");
        let settled = restarted.elapsed() > Duration::from_secs(15);
        if (resumed || settled) && accepted_after_restart >= 3 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "within 120 s of the restart: {accepted_after_restart} rounds accepted, \
             followers re-created: {resumed}; query log:\n{}",
            query.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{round} rounds written; {accepted_after_restart} accepted after the restart");
    for line in query
        .log()
        .lines()
        .filter(|l| l.contains("lost") || l.contains("re-created"))
    {
        eprintln!("query: {line}");
    }

    // Rows written after the restart are served, equal to the log's fold.
    assert_converges(
        &mut q,
        &oracle_of_log(&h.nats.url()).await?,
        Duration::from_secs(30),
    )
    .await?;
    anyhow::ensure!(query.exited()?.is_none(), "query exited:\n{}", query.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_stops_cleanly_when_its_buckets_come_back_empty() -> anyhow::Result<()> {
    let Stack {
        mut h,
        _ingest,
        projector: _projector,
        mut query,
        client: _client,
        q: _q,
    } = stack().await?;

    // The node comes back empty: the rows the query service holds are in no bucket.
    h.restart_nats_wiped()?;
    // Buckets again, but from revision 0: following them from where it was would
    // miss every row until their revisions pass it.
    let js = async_nats::jetstream::new(async_nats::connect(h.nats.url()).await?);
    payledger_server_common::topology::ensure_buckets(&js, 1).await?;

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = query.exited()? {
            break status;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "query kept serving tables its buckets no longer hold:\n{}",
            query.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = query.log();
    anyhow::ensure!(
        status.code() == Some(1) && !log.contains("panicked"),
        "query should stop with an error, not a panic; it exited with {status}:\n{log}"
    );
    anyhow::ensure!(log.contains("was reset"), "the log says why:\n{log}");
    eprintln!("query stopped with {status}:");
    for line in log.lines().skip_while(|l| !l.contains("ERROR")).take(8) {
        eprintln!("  {line}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_list_whose_first_node_is_down_connects_to_the_next() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    // Nothing listens on `down`: bound once to find it free, then released.
    let down = format!("nats://127.0.0.1:{}", free_port()?);
    let servers = format!("{down},{}", h.nats.url());
    let ingest = h
        .spawn_with_nats_url("payledger-ingest", &servers, &INGEST_ARGS, &[])
        .await?;
    let mut client = ingest_client(&ingest.url()).await?;
    // Accepted means stored by JetStream, so the list reached the live node.
    publish_round(&mut client, 0).await?;
    let stored = read_log(&h.nats.url()).await?;
    anyhow::ensure!(
        stored.len() == round_events(0).len(),
        "{} messages in the stream of the live node, expected {}",
        stored.len(),
        round_events(0).len()
    );
    Ok(())
}

/// Waits until the sample `name` at the metrics address `metrics` satisfies `holds`.
async fn wait_for_metric(
    metrics: &str,
    name: &str,
    holds: impl Fn(f64) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape_metrics(metrics).await?;
        let value = metric_value(&text, name);
        if value.is_some_and(&holds) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} is {value:?} after 30 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Publish call waiting for JetStream's ack when the connection to NATS drops
/// is answered at once with UNAVAILABLE saying the connection was lost (its ack
/// was due on that connection and cannot come), not when --ack-timeout runs
/// out; the same call retried once nats-server is back stores its events once.
/// Both ways of writing: one atomic batch (20 events) and pipelined single
/// publishes (4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_waiting_for_its_ack_when_the_connection_drops_is_answered_at_once()
-> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    // Acks may take a minute and pings are a minute apart: only the connection
    // closing can end the wait early.
    let ingest = h
        .spawn(
            "payledger-ingest",
            &[
                "--heartbeat-interval",
                "0s",
                "--ack-timeout",
                "60s",
                "--nats-ping-interval",
                "60s",
                "--metrics-listen",
                &metrics,
            ],
        )
        .await?;
    let mut client = ingest_client(&ingest.url()).await?;
    publish_round(&mut client, 0).await?;
    let mut stored = round_events(0).len();
    for (round, count) in [(1, 20), (2, 4)] {
        let events: Vec<v1::Event> = round_events(round).into_iter().take(count).collect();
        // Frozen: the write reaches the server's socket, no ack can come.
        h.nats.pause()?;
        let call = tokio::spawn({
            let (mut client, events) = (client.clone(), events.clone());
            async move { client.publish(v1::PublishRequest { events }).await }
        });
        wait_for_metric(&metrics, "payledger_ingest_writes_awaiting_ack", |v| {
            v >= 1.0
        })
        .await?;
        // SIGKILL: the TCP connection closes.
        h.nats.stop();
        let answer = tokio::time::timeout(Duration::from_secs(90), call)
            .await
            .map_err(|_| anyhow::anyhow!("round {round}: no answer within 90 s"))??;
        let status = match answer {
            Ok(r) => anyhow::bail!("round {round}: answered without nats-server: {r:?}"),
            Err(status) => status,
        };
        eprintln!("round {round} ({count} events): {status:?}");
        anyhow::ensure!(
            status.code() == tonic::Code::Unavailable,
            "round {round}: {status:?}"
        );
        for part in [
            "connection to NATS was lost",
            "safe to retry the same call with the same event ids",
        ] {
            anyhow::ensure!(
                status.message().contains(part),
                "round {round}: {part:?} missing from {status:?}"
            );
        }
        anyhow::ensure!(
            !status.message().contains("no ack"),
            "round {round}: answered as an ack timeout: {status:?}"
        );

        // Back on the same port and store; the retry is answered once ingest
        // has reconnected.
        h.restart_nats_hard()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let results = loop {
            match client
                .publish(v1::PublishRequest {
                    events: events.clone(),
                })
                .await
            {
                Ok(r) => break r.into_inner().results,
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => anyhow::bail!("round {round}: the retry failed: {s:?}"),
            }
        };
        anyhow::ensure!(
            results.len() == count
                && results.iter().all(|r| matches!(
                    r.outcome,
                    Some(
                        v1::publish_result::Outcome::Accepted(_)
                            | v1::publish_result::Outcome::Duplicate(_)
                    )
                )),
            "round {round}: the retry was not taken whole: {results:?}"
        );
        stored += count;
        let mut ids = Vec::new();
        for entry in read_log(&h.nats.url()).await? {
            if let RecordBody::Fact(f) = entry.to_record()?.body {
                ids.push(f.event_id);
            }
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        anyhow::ensure!(
            ids.len() == stored && unique.len() == stored,
            "round {round}: the log holds {} events ({} distinct), expected {stored} once each",
            ids.len(),
            unique.len()
        );
    }
    Ok(())
}

/// Kills a process left behind, so a failing test does not leak it.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0
            && alive(pid)
        {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Running and not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The pids of the children of `parent` whose command is `name`.
fn children_named(parent: u32, name: &str) -> anyhow::Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map(|(_, c)| c).unwrap_or_default();
        let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if comm == name && ppid == Some(parent) {
            found.push(pid);
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payledger_dev_stopped_with_sigterm_stops_its_nats_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("dev");
    let address = || -> anyhow::Result<String> { Ok(format!("127.0.0.1:{}", free_port()?)) };
    let (ingest, query, projector, coordinator) = (address()?, address()?, address()?, address()?);
    let workers = format!("{},{}", address()?, address()?);
    let log = dir.path().join("dev.log");
    let mut dev = Running(
        Command::new(binary("payledger")?)
            .arg("dev")
            .arg("--data")
            .arg(&data)
            .args([
                "--ingest",
                &ingest,
                "--query",
                &query,
                "--projector",
                &projector,
            ])
            .args(["--coordinator", &coordinator, "--workers", &workers])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let dev_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let pid = dev.0.id();
    for url in [&ingest, &query] {
        if let Err(e) = wait_healthy(&format!("http://{url}"), Duration::from_secs(60)).await {
            anyhow::bail!("payledger dev never served: {e}\n{}", dev_log());
        }
    }
    let nats = children_named(pid, "nats-server")?;
    anyhow::ensure!(
        nats.len() == 1,
        "payledger dev runs one nats-server, found {nats:?}"
    );
    let nats_pid = nats[0];
    let _leak_guard = KillOnDrop(Some(nats_pid));
    let config = std::fs::read_to_string(data.join("nats/nats.conf"))?;
    let nats_port: u16 = config
        .lines()
        .find_map(|l| l.strip_prefix("listen: 127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no listen port in nats.conf:\n{config}"))?;

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = dev.0.try_wait()? {
            break exit;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "payledger dev did not exit within 30 s of SIGTERM:\n{}",
            dev_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    anyhow::ensure!(
        !alive(nats_pid),
        "payledger dev exited ({exit}) and left its nats-server (pid {nats_pid}) running"
    );
    anyhow::ensure!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
        "something still listens on the nats-server's port {nats_port}"
    );
    anyhow::ensure!(
        exit.success(),
        "payledger dev exited with {exit} on SIGTERM:\n{}",
        dev_log()
    );
    Ok(())
}
