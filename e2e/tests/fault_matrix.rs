//! The fault matrix (README "Fault matrix", docs/failure-contract.md): each row
//! drives a paced history through a client that retries as documented, injects
//! its fault mid-ingest, and checks at the end that every acknowledged event is
//! in the log and the archive exactly once, the archive tiles, the stream's rows
//! equal a fold of the archive and a replay's commit equals them. Every row
//! writes its figures to `target/fault-matrix/`; `just faults` runs the matrix
//! at a larger size and prints the table.
//!
//! `PAYLEDGER_FAULT_BATCHES` sets the batches of 20 events each row writes.

use std::time::{Duration, Instant};

use payledger_e2e::cluster::Network;
use payledger_e2e::faults::{ClientReport, FaultStack, MatrixLine, Nats, PacedClient, Progress};

fn batches() -> usize {
    std::env::var("PAYLEDGER_FAULT_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

/// Starts the client, waits until a third of its batches are acknowledged (the
/// fault comes mid-ingest), and returns it running.
async fn client_running(
    stack: &FaultStack,
    tag: &str,
) -> anyhow::Result<(
    Progress,
    tokio::task::JoinHandle<anyhow::Result<ClientReport>>,
)> {
    let (progress, client) = PacedClient::new(stack.ingest.url(), tag, batches()).spawn();
    progress
        .wait_for(batches() / 3, Duration::from_secs(60))
        .await?;
    Ok((progress, client))
}

/// After the fault: the time until the client has another batch acknowledged.
async fn recovery(
    stack: &FaultStack,
    progress: &Progress,
    since: Instant,
) -> anyhow::Result<Duration> {
    match progress
        .first_ack_after(since, Duration::from_secs(120))
        .await
    {
        Ok(took) => Ok(took),
        Err(e) => {
            let log = stack.ingest.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let mut nodes = String::new();
            if let Some(cluster) = &stack.cluster {
                for i in 0..cluster.len() {
                    let log = cluster.log(i);
                    // Route redials repeat every second while a node is down.
                    let tail: Vec<&str> = log
                        .lines()
                        .rev()
                        .filter(|l| !l.contains("Error trying to connect to route"))
                        .take(25)
                        .collect();
                    nodes += &format!(
                        "\n{}:\n{}",
                        cluster.name(i),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            anyhow::bail!(
                "{e}; ingest's log ends:\n{}{nodes}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

async fn finish(
    mut stack: FaultStack,
    client: tokio::task::JoinHandle<anyhow::Result<ClientReport>>,
    row: &str,
    nats: &str,
    fault: &str,
    recovered: Duration,
) -> anyhow::Result<()> {
    let report = client.await??;
    anyhow::ensure!(
        report.acked.sequences.len() == batches() * 20,
        "{} events acknowledged, {} sent",
        report.acked.sequences.len(),
        batches() * 20
    );
    let verified = match stack.verify(&report.acked).await {
        Ok(verified) => verified,
        Err(e) => {
            // What the services said about it: their warnings and errors.
            let mut said = String::new();
            for service in [&stack.ingest, &stack.projector, &stack.query] {
                let log = service.log();
                let tail: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                let tail = &tail[tail.len().saturating_sub(20)..];
                said += &format!("\n{}:\n{}", service.name, tail.join("\n"));
            }
            anyhow::bail!("{e:#}{said}");
        }
    };
    stack.verify_replay(&verified).await?;
    MatrixLine {
        row,
        nats,
        fault,
        report: &report,
        verified: &verified,
        recovery: recovered,
    }
    .write()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_sigkill_and_restart() -> anyhow::Result<()> {
    let mut stack = FaultStack::start(Nats::Single).await?;
    let (progress, client) = client_running(&stack, "single-kill").await?;
    stack.h.nats.stop();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let port = stack.h.nats.port();
    let dir = stack.h.dir.path().join("nats");
    stack.h.nats = payledger_server_common::local_nats::LocalNats::start_on(&dir, port)?;
    let recovered = recovery(&stack, &progress, killed).await?;
    finish(
        stack,
        client,
        "nats-server SIGKILL, back after 2 s",
        "1 node",
        "SIGKILL",
        recovered,
    )
    .await
}

/// Which node of the cluster a row kills.
enum Victim {
    StreamLeader,
    Follower,
    /// The node ingest's NATS connection is on.
    IngestsNode,
}

async fn pick(stack: &FaultStack, victim: Victim) -> anyhow::Result<usize> {
    let cluster = stack.cluster.as_ref().expect("a cluster");
    let leader = cluster
        .stream_leader(payledger_server_common::topology::STREAM)
        .await?;
    Ok(match victim {
        Victim::StreamLeader => leader,
        Victim::Follower => (leader + 1) % cluster.len(),
        Victim::IngestsNode => cluster
            .connected_node("payledger-ingest")
            .ok_or_else(|| anyhow::anyhow!("no node reports ingest's connection"))?,
    })
}

/// Kills a node of the cluster, brings it back after 3 s, and checks the
/// client went on through the other two and the node caught up.
async fn cluster_node_killed(tag: &str, row: &str, victim: Victim) -> anyhow::Result<()> {
    let mut stack = FaultStack::start(Nats::Cluster(Network::Loopback)).await?;
    let (progress, client) = client_running(&stack, tag).await?;
    let node = pick(&stack, victim).await?;
    stack.cluster.as_mut().expect("a cluster").kill(node);
    let killed = Instant::now();
    let recovered = recovery(&stack, &progress, killed).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cluster = stack.cluster.as_mut().expect("a cluster");
    cluster.start_node(node)?;
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    let name = cluster.name(node).to_string();
    finish(
        stack,
        client,
        row,
        "3 nodes, R3",
        &format!("SIGKILL {name}, back after 3 s"),
        recovered,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_stream_leader_sigkill() -> anyhow::Result<()> {
    cluster_node_killed("leader", "stream leader SIGKILL", Victim::StreamLeader).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_follower_sigkill() -> anyhow::Result<()> {
    cluster_node_killed("follower", "stream follower SIGKILL", Victim::Follower).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_connected_node_sigkill() -> anyhow::Result<()> {
    cluster_node_killed("connected", "ingest's node SIGKILL", Victim::IngestsNode).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_rolling_restart() -> anyhow::Result<()> {
    let mut stack = FaultStack::start(Nats::Cluster(Network::Loopback)).await?;
    let (progress, client) = client_running(&stack, "rolling").await?;
    let began = Instant::now();
    let cluster = stack.cluster.as_mut().expect("a cluster");
    for node in 0..cluster.len() {
        // One at a time, each back and current before the next goes, as a
        // StatefulSet's rolling update does.
        cluster.stop(node)?;
        cluster.start_node(node)?;
        cluster.wait_healthy(Duration::from_secs(60)).await?;
    }
    let rolled = began.elapsed();
    let recovered = recovery(&stack, &progress, Instant::now()).await?;
    stack.ensure_running()?;
    finish(
        stack,
        client,
        "rolling restart",
        "3 nodes, R3",
        &format!(
            "SIGTERM + restart n0, n1, n2 in turn ({:.0} s)",
            rolled.as_secs_f64()
        ),
        recovered,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_partition_of_the_stream_leader_heals() -> anyhow::Result<()> {
    let stack = FaultStack::start(Nats::Cluster(Network::Isolated)).await?;
    let (progress, client) = client_running(&stack, "partition").await?;
    let node = pick(&stack, Victim::StreamLeader).await?;
    let cluster = stack.cluster.as_ref().expect("a cluster");
    cluster.partition(node)?;
    let cut = Instant::now();
    let recovered = recovery(&stack, &progress, cut).await?;
    // Stay cut off well past the point the majority went on without it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cluster = stack.cluster.as_ref().expect("a cluster");
    cluster.heal(node)?;
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    let name = cluster.name(node).to_string();
    finish(
        stack,
        client,
        "partition of the stream leader",
        "3 nodes, R3, a netns each",
        &format!("{name}'s link down ≥ 10 s, then up"),
        recovered,
    )
    .await
}

/// Twice as many clients writing back to back as ingest takes calls at once:
/// the excess is refused early with RESOURCE_EXHAUSTED naming the limits, the
/// clients back off and retry, and nothing is lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_at_twice_the_admitted_calls() -> anyhow::Result<()> {
    const IN_FLIGHT: usize = 8;
    let in_flight = IN_FLIGHT.to_string();
    let mut stack = FaultStack::start_with(
        Nats::Single,
        &[
            "--max-concurrent-batches",
            &in_flight,
            "--max-queued-batches",
            "2",
        ],
    )
    .await?;
    let began = Instant::now();
    let clients: Vec<_> = (0..2 * IN_FLIGHT)
        .map(|c| {
            let mut client =
                PacedClient::new(stack.ingest.url(), &format!("load{c}"), batches() / 4);
            client.pace = Duration::ZERO;
            client.spawn().1
        })
        .collect();
    let mut reports = Vec::new();
    for client in clients {
        reports.push(client.await??);
    }
    let report = ClientReport::merge(reports)?;
    let took = began.elapsed();
    anyhow::ensure!(
        report.acked.sequences.len() == 2 * IN_FLIGHT * (batches() / 4) * 20,
        "{} events acknowledged",
        report.acked.sequences.len()
    );
    if let Some(message) = report.messages.get("ResourceExhausted") {
        anyhow::ensure!(
            message.contains(&format!(
                "{IN_FLIGHT} publish calls in flight (--max-concurrent-batches)"
            )) && message.contains("2 waiting (--max-queued-batches)"),
            "the refusal names the limits: {message}"
        );
    }
    let verified = stack.verify(&report.acked).await?;
    stack.verify_replay(&verified).await?;
    eprintln!(
        "{} calls in {:.1} s, p50 {:?}, p99 {:?} of acknowledged calls",
        report.calls,
        took.as_secs_f64(),
        report.latency_quantile(0.5),
        report.latency_quantile(0.99)
    );
    MatrixLine {
        row: "overload",
        nats: "1 node",
        fault: &format!(
            "{} clients back to back, {IN_FLIGHT} calls admitted + 2 queued; acknowledged calls p50 {} ms, p99 {} ms",
            2 * IN_FLIGHT,
            report.latency_quantile(0.5).as_millis(),
            report.latency_quantile(0.99).as_millis()
        ),
        report: &report,
        verified: &verified,
        recovery: Duration::ZERO,
    }
    .write()
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// Waits until `service` of the server at `url` reports `status`; the time it took.
async fn wait_health(
    url: &str,
    service: &str,
    status: i32,
    within: Duration,
) -> anyhow::Result<Duration> {
    let began = Instant::now();
    loop {
        let now = payledger_e2e::faults::health_of(url, service).await;
        if now == Some(status) {
            return Ok(began.elapsed());
        }
        anyhow::ensure!(
            began.elapsed() < within,
            "{service} at {url} is {now:?}, not {status}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A write of the test's own to the readiness probe's stream: None when it was
/// stored, else JetStream's answer. Tells whether nats-server left that stream
/// unable to write after a full store was freed.
async fn probe_stream_refuses(urls: &str) -> anyhow::Result<Option<String>> {
    let js = async_nats::jetstream::new(payledger_e2e::connect_nats(urls).await?);
    let write = async {
        js.publish("payledger.probe.e2e", bytes::Bytes::from_static(b"probe"))
            .await?
            .await
    };
    Ok(
        match tokio::time::timeout(Duration::from_secs(5), write).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no acknowledgement within 5 s".to_string()),
        },
    )
}

/// Waits until every one of `services` reports SERVING; the longest it took.
async fn all_serving(services: &[(&str, String)], within: Duration) -> anyhow::Result<Duration> {
    let mut took = Duration::ZERO;
    let began = Instant::now();
    for (service, url) in services {
        wait_health(
            url,
            service,
            SERVING,
            within.saturating_sub(began.elapsed()),
        )
        .await?;
        took = began.elapsed();
    }
    Ok(took)
}

/// The JetStream store fills up mid-ingest and is freed: no platform process
/// exits, liveness stays SERVING, readiness turns NOT_SERVING (at the first
/// batch the full store refuses) and back once the services' own writes are
/// stored again, and nothing acknowledged is lost. If nats-server leaves a
/// stream unable to write once space is free, the metric says so and a restart
/// of nats-server (the runbook's step) brings the services back by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_and_freed() -> anyhow::Result<()> {
    let metrics = [
        format!(
            "127.0.0.1:{}",
            payledger_server_common::local_nats::free_port()?
        ),
        format!(
            "127.0.0.1:{}",
            payledger_server_common::local_nats::free_port()?
        ),
    ];
    let mut stack = FaultStack::start_with_flags(
        Nats::SingleOnTmpfs { mebibytes: 96 },
        &["--metrics-listen", &metrics[0]],
        &["--metrics-listen", &metrics[1]],
    )
    .await?;
    let (progress, client) = client_running(&stack, "disk").await?;
    let filler = stack.tmpfs.as_ref().expect("a tmpfs").fill()?;
    let filled = Instant::now();
    let readiness: [(&str, String); 2] = [
        ("payledger.v1.IngestService", stack.ingest.url()),
        ("payledger.v1.ProjectorService", stack.projector.url()),
    ];
    // Ingest sees the full store at its next batch, the projector at its next
    // row, progress or lease write (leases are renewed every 2.5 s).
    let mut not_ready_after = Vec::new();
    for (service, url) in &readiness {
        wait_health(url, service, NOT_SERVING, Duration::from_secs(15)).await?;
        not_ready_after.push(filled.elapsed());
    }
    // Full for a while: liveness stays up, nothing exits.
    let full_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < full_until {
        for (_, url) in &readiness {
            anyhow::ensure!(
                payledger_e2e::faults::health_of(url, "").await == Some(SERVING),
                "liveness of {url} went down while the disk was full"
            );
        }
        stack.ensure_running()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    let by_itself = all_serving(&readiness, Duration::from_secs(30)).await;
    let restart = |stack: &mut FaultStack| -> anyhow::Result<()> {
        let port = stack.h.nats.port();
        let dir = stack.tmpfs.as_ref().expect("a tmpfs").path().to_path_buf();
        stack.h.nats.stop();
        stack.h.nats = payledger_server_common::local_nats::LocalNats::start_on(&dir, port)?;
        Ok(())
    };
    let outcome = match by_itself {
        Ok(took) => {
            let mut outcome = format!(
                "ready again by themselves {:.1} s after space was freed",
                took.as_secs_f64()
            );
            // Ready by their own writes; an idle service is judged by its probe.
            if let Some(refusal) = probe_stream_refuses(&stack.nats_urls()).await? {
                eprintln!("the probe's stream still refuses writes: {refusal}");
                restart(&mut stack)?;
                let restarted = Instant::now();
                all_serving(&readiness, Duration::from_secs(60)).await?;
                outcome += &format!(
                    " (their own writes stored), though nats-server left the probe's stream \
                     refusing writes; after its restart ready in {:.1} s",
                    restarted.elapsed().as_secs_f64()
                );
            }
            outcome
        }
        Err(_) => {
            // Whoever is still not ready says why in its metric.
            let mut stuck = Vec::new();
            for ((service, url), address) in readiness.iter().zip(&metrics) {
                if payledger_e2e::faults::health_of(url, service).await == Some(SERVING) {
                    continue;
                }
                let text = payledger_e2e::scrape_metrics(address).await?;
                anyhow::ensure!(
                    payledger_e2e::metric_value(
                        &text,
                        "payledger_readiness_failing{condition=\"jetstream_write\"}"
                    ) == Some(1.0),
                    "{service} is not ready, and its metric does not say JetStream cannot write:\n{text}"
                );
                stuck.push(if service.contains("Ingest") {
                    "ingest"
                } else {
                    "the projector"
                });
            }
            // The runbook: restart that nats-server.
            restart(&mut stack)?;
            let restarted = Instant::now();
            all_serving(&readiness, Duration::from_secs(60)).await?;
            format!(
                "{} stayed NOT_SERVING after space was freed: nats-server left a stream of its own \
                 unable to answer (metric and alert fired); after nats-server's restart the services \
                 were ready again in {:.1} s",
                stuck.join(" and "),
                restarted.elapsed().as_secs_f64()
            )
        }
    };
    let recovered = recovery(&stack, &progress, freed).await?;
    stack.ensure_running()?;
    let not_ready = format!(
        "readiness NOT_SERVING after {:.1} s (ingest), {:.1} s (projector)",
        not_ready_after[0].as_secs_f64(),
        not_ready_after[1].as_secs_f64()
    );
    eprintln!("{not_ready} after the disk filled; {outcome}");
    finish(
        stack,
        client,
        "JetStream store full, then freed",
        "1 node, store on a 96 MiB tmpfs",
        &format!("filled ≥ 8 s; {not_ready}, liveness up; {outcome}"),
        recovered,
    )
    .await
}

/// What one service's readiness did while a row watched it.
#[derive(Default)]
struct ReadinessSeen {
    first_not_serving: Option<Duration>,
    /// Polls that found it NOT_SERVING, and every poll.
    not_serving: usize,
    polls: usize,
}

impl ReadinessSeen {
    /// What the polls saw, and how often the service's log says `jetstream_write`
    /// started failing (a spell shorter than a poll shows there only).
    fn line(&self, name: &str, log: &str) -> String {
        let spells = log
            .lines()
            .filter(|l| l.contains("not ready") && l.contains("jetstream_write"))
            .count();
        let polls = match self.first_not_serving {
            None => format!("{name} SERVING at all {} polls", self.polls),
            Some(at) => format!(
                "{name} NOT_SERVING from {:.1} s at {} of {} polls",
                at.as_secs_f64(),
                self.not_serving,
                self.polls
            ),
        };
        format!("{polls} ({spells} spells NOT_SERVING in its log)")
    }
}

/// One node's JetStream store fills up mid-ingest while that node leads the
/// event stream, and is freed: the row finds out what nats-server does (the
/// node's JetStream, the stream's leadership, whether writes go on through the
/// other two, whether the node needs a restart) and what the platform does,
/// with the pass criteria of the single-node row. What it found: at once or
/// about 10 s after the fill (it varies) the node hits its write error and
/// disables its JetStream; about 10 s after the fill the stream's leadership
/// moves and the other two take the writes (the batch in flight got no answer
/// within ingest's ack timeout and was retried); ingest stays ready but for a
/// spell during the election; once space is freed the node's JetStream stays
/// disabled until the node is restarted (the runbook's step), after which it
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_disk_full_on_the_stream_leader() -> anyhow::Result<()> {
    const FULL: usize = 0;
    let stream = payledger_server_common::topology::STREAM;
    let metrics = format!(
        "127.0.0.1:{}",
        payledger_server_common::local_nats::free_port()?
    );
    let mut stack = FaultStack::start_with(
        Nats::ClusterWithOneStoreOnTmpfs {
            node: FULL,
            mebibytes: 96,
        },
        &["--metrics-listen", &metrics],
    )
    .await?;
    let cluster = stack.cluster.as_ref().expect("a cluster");
    let name = cluster.name(FULL).to_string();
    cluster
        .move_stream_leader(stream, FULL, Duration::from_secs(30))
        .await?;
    let (progress, client) = client_running(&stack, "cluster-disk").await?;
    // Still the leader at the moment of the fault.
    let cluster = stack.cluster.as_ref().expect("a cluster");
    cluster
        .move_stream_leader(stream, FULL, Duration::from_secs(30))
        .await?;
    // Which of the projector's buckets the node leads too: their writes
    // depend on its store as well.
    let mut also_led = Vec::new();
    for bucket in [
        payledger_server_common::topology::DAILY_BUCKET,
        payledger_server_common::topology::CURRENT_BUCKET,
        payledger_server_common::topology::PROGRESS_BUCKET,
        payledger_server_common::topology::LEASE_BUCKET,
    ] {
        let bucket_stream = format!("KV_{bucket}");
        if cluster.stream_leader(&bucket_stream).await? == FULL {
            also_led.push(bucket_stream);
        }
    }
    let filler = stack.tmpfs.as_ref().expect("a tmpfs").fill()?;
    let filled = Instant::now();
    let readiness: [(&str, String); 2] = [
        ("payledger.v1.IngestService", stack.ingest.url()),
        ("payledger.v1.ProjectorService", stack.projector.url()),
    ];
    // Readiness and liveness polled on their own, every 100 ms: the cluster's
    // answers below take seconds while a node gives up its leaderships.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = tokio::spawn({
        let readiness = readiness.clone();
        let watching = watching.clone();
        async move {
            let mut seen = [ReadinessSeen::default(), ReadinessSeen::default()];
            let mut liveness_down = None;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                for ((service, url), seen) in readiness.iter().zip(&mut seen) {
                    if payledger_e2e::faults::health_of(url, "").await != Some(SERVING) {
                        liveness_down.get_or_insert(url.clone());
                    }
                    seen.polls += 1;
                    if payledger_e2e::faults::health_of(url, service).await == Some(NOT_SERVING) {
                        seen.not_serving += 1;
                        seen.first_not_serving.get_or_insert(filled.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (seen, liveness_down)
        }
    });
    let mut leader_moved: Option<(Duration, String)> = None;
    let mut disabled_after: Option<Duration> = None;
    let mut unhealthy_after: Option<Duration> = None;
    // Full until the evidence is in: the stream led by another node and a batch
    // acknowledged after the fill (or the client done), and at least 8 s.
    let full_until = filled + Duration::from_secs(8);
    loop {
        let cluster = stack.cluster.as_ref().expect("a cluster");
        if leader_moved.is_none()
            && let Ok(leader) = cluster.stream_leader(stream).await
            && leader != FULL
        {
            leader_moved = Some((filled.elapsed(), cluster.name(leader).to_string()));
        }
        if disabled_after.is_none() && cluster.jetstream_enabled(FULL) == Some(false) {
            disabled_after = Some(filled.elapsed());
        }
        if unhealthy_after.is_none() && !cluster.is_healthy(FULL) {
            unhealthy_after = Some(filled.elapsed());
        }
        stack.ensure_running()?;
        // A batch acknowledged since the fill, or the client done before it.
        let written = progress
            .first_ack_after(filled, Duration::ZERO)
            .await
            .is_ok();
        if Instant::now() >= full_until && leader_moved.is_some() && written {
            break;
        }
        anyhow::ensure!(
            filled.elapsed() < Duration::from_secs(60),
            "60 s after {name}'s store filled: stream leader moved {leader_moved:?}, \
             {} batches acknowledged\n{}",
            progress.batches_acked(),
            stack
                .cluster
                .as_ref()
                .expect("a cluster")
                .log(FULL)
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let (seen, liveness_down) = watcher.await?;
    anyhow::ensure!(
        liveness_down.is_none(),
        "liveness of {liveness_down:?} went down while {name}'s store was full"
    );
    let recovered = recovery(&stack, &progress, filled).await?;
    let full_log = stack.cluster.as_ref().expect("a cluster").log(FULL);
    let said: Vec<&str> = full_log
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("space") || l.contains("disabl") || l.contains("resource")
        })
        .take(5)
        .collect();
    eprintln!("{name}'s log on the full store:\n{}", said.join("\n"));
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    // Does the node come back by itself? Positive evidence: its JetStream runs
    // and it reports healthy (current with every stream).
    let mut back_by_itself = None;
    while freed.elapsed() < Duration::from_secs(20) {
        let cluster = stack.cluster.as_ref().expect("a cluster");
        if cluster.jetstream_enabled(FULL) == Some(true) && cluster.is_healthy(FULL) {
            back_by_itself = Some(freed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let node_outcome = match back_by_itself {
        Some(took) => format!(
            "{name} was healthy again by itself {:.1} s after space was freed",
            took.as_secs_f64()
        ),
        None => {
            // The runbook: restart the nats-server whose store filled.
            let cluster = stack.cluster.as_mut().expect("a cluster");
            let enabled = cluster.jetstream_enabled(FULL);
            cluster.stop(FULL)?;
            cluster.start_node(FULL)?;
            let restarted = Instant::now();
            cluster.wait_healthy(Duration::from_secs(60)).await?;
            format!(
                "{name} stayed {} 20 s after space was freed; after its restart it was current again in {:.1} s",
                if enabled == Some(false) {
                    "with JetStream disabled"
                } else {
                    "unhealthy"
                },
                restarted.elapsed().as_secs_f64()
            )
        }
    };
    let ready_again = all_serving(&readiness, Duration::from_secs(60)).await?;
    stack.ensure_running()?;
    let nats_did = format!(
        "{}, {}; stream leader {}",
        match disabled_after {
            Some(at) => format!(
                "{name}'s JetStream disabled itself {:.1} s after",
                at.as_secs_f64()
            ),
            None => format!("{name}'s JetStream stayed enabled"),
        },
        match unhealthy_after {
            Some(at) => format!("its /healthz not ok from {:.1} s", at.as_secs_f64()),
            None => "its /healthz stayed ok".to_string(),
        },
        match &leader_moved {
            Some((at, to)) => format!("moved to {to} {:.1} s after", at.as_secs_f64()),
            None => "did not move".to_string(),
        }
    );
    let platform = format!(
        "{}, {}; both SERVING {:.1} s after that",
        seen[0].line("ingest", &stack.ingest.log()),
        seen[1].line("projector", &stack.projector.log()),
        ready_again.as_secs_f64()
    );
    eprintln!("{nats_did}; {platform}; {node_outcome}");
    finish(
        stack,
        client,
        "JetStream store of the stream leader full, then freed",
        &format!("3 nodes, R3, {name}'s store on a 96 MiB tmpfs"),
        &format!(
            "{name} (stream leader{}) filled ≥ 8 s; {nats_did}; {platform}; {node_outcome}",
            if also_led.is_empty() {
                ", no bucket's".to_string()
            } else {
                format!(" and {}'s", also_led.join(", "))
            }
        ),
        recovered,
    )
    .await
}
