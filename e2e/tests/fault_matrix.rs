//! The fault matrix (README "Fault matrix", docs/failure-contract.md): each row
//! drives a paced history through a client that retries as documented, injects
//! its fault mid-ingest, and checks at the end that every acknowledged event is
//! in the log and the archive exactly once, the archive tiles, the stream's rows
//! equal a fold of the archive and a replay's commit equals them. Every row
//! writes its figures to `target/fault-matrix/`; `just faults` runs the matrix
//! at a larger size and prints the table.
//!
//! `PAYLEDGER_FAULT_BATCHES` sets the batches of 20 events each row writes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use payledger_e2e::cluster::Network;
use payledger_e2e::faults::{
    ClientReport, FaultStack, MatrixLine, Nats, PacedClient, Progress, Stores,
};
use payledger_e2e::tail;

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
                tail(&stack.ingest.log(), 40)
            );
        }
    }
}

async fn finish(
    stack: FaultStack,
    client: tokio::task::JoinHandle<anyhow::Result<ClientReport>>,
    row: &str,
    nats: &str,
    fault: &str,
    recovered: Duration,
) -> anyhow::Result<()> {
    let report = client.await??;
    finish_with(stack, report, batches(), row, nats, fault, recovered).await
}

/// [`finish`] with the client's report already in hand, of `sent` batches.
async fn finish_with(
    mut stack: FaultStack,
    report: ClientReport,
    sent: usize,
    row: &str,
    nats: &str,
    fault: &str,
    recovered: Duration,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        report.acked.sequences.len() == sent * 20,
        "{} events acknowledged, {} sent",
        report.acked.sequences.len(),
        sent * 20
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
        payledger_server_common::local_nats::free_address()?,
        payledger_server_common::local_nats::free_address()?,
    ];
    let mut stack = FaultStack::start_on(
        Nats::SingleOnTmpfs { mebibytes: 96 },
        Stores::Fs,
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
    let metrics = payledger_server_common::local_nats::free_address()?;
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

/// The sum over every sample of `name` (one per partition) in `text`, and how
/// many samples there are.
fn sum_of(text: &str, name: &str) -> (f64, usize) {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (values.iter().sum(), values.len())
}

/// History longer than the log: a first client's history is archived, the
/// stream's head below its last quarter purged (what `max_age` drops), the
/// projector's store and the row buckets gone. A new projector bootstraps from
/// the archive alone, and the single nats-server is SIGKILLed while it does
/// (the projector's `payledger_projector_bootstrapping` says so before the kill
/// and still after it: no partition can hand over to the log without NATS) and
/// restarted at once, while a second client writes. The projector does not
/// exit, its rows equal the archive's fold, a replay equals them; the row
/// records how long after NATS came back every partition was reading the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_sigkill_while_a_projector_bootstraps() -> anyhow::Result<()> {
    let partitions = payledger_semantics::Settings::default().partitions as usize;
    // Small cuts: many archive segments for the bootstrap to fold.
    let mut stack = FaultStack::start_with(Nats::Single, &["--archive-cut-records", "25"]).await?;
    let mut old = PacedClient::new(stack.ingest.url(), "boot-old", 2 * batches());
    old.pace = Duration::ZERO;
    let old = old.spawn().1.await??;
    let log = payledger_e2e::read_log(&stack.h.nats.url()).await?;
    let last = log.last().map(|e| e.seq).unwrap_or(0);
    payledger_e2e::wait_until_archived(&stack.archive()?, last).await?;

    // A new deployment: the projector stopped (its leases released) and its store
    // removed, the rows and progress purged, the log's head gone.
    stack.projector.terminate().await?;
    std::fs::remove_dir_all(format!("{}-projector", stack.store))?;
    let keep_from = last - last / 4;
    {
        let js =
            async_nats::jetstream::new(payledger_e2e::connect_nats(&stack.h.nats.url()).await?);
        let mut stream = js
            .get_stream(payledger_server_common::topology::STREAM)
            .await?;
        stream.purge().sequence(keep_from).await?;
        anyhow::ensure!(stream.info().await?.state.first_sequence == keep_from);
        use payledger_server_common::topology::{CURRENT_BUCKET, DAILY_BUCKET, PROGRESS_BUCKET};
        for bucket in [DAILY_BUCKET, CURRENT_BUCKET, PROGRESS_BUCKET] {
            js.get_stream(format!("KV_{bucket}")).await?.purge().await?;
        }
    }
    stack.log_head_dropped_below = Some(keep_from);

    let metrics = payledger_server_common::local_nats::free_address()?;
    let own = format!("{}-bootstrap", stack.store);
    let archive = stack.store.clone();
    stack.projector = stack
        .h
        .spawn(
            "payledger-projector",
            &[
                "--store",
                &own,
                "--archive-store",
                &archive,
                "--checkpoint-interval",
                "1s",
                "--metrics-listen",
                &metrics,
            ],
        )
        .await?;
    let (progress, client) = PacedClient::new(stack.ingest.url(), "boot-new", batches()).spawn();

    // Positive evidence that the bootstrap is under way: partitions starting,
    // archive segments read.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = payledger_e2e::scrape_metrics(&metrics).await?;
        let (starting, _) = sum_of(&text, "payledger_projector_bootstrapping");
        let (read, _) = sum_of(&text, "payledger_projector_bootstrap_segments_read_total");
        if starting > 0.0 && read > 0.0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no bootstrap seen within 60 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.h.nats.stop();
    let killed = Instant::now();
    // Without NATS no partition hands over to the log: those still starting now
    // were bootstrapping when nats-server died.
    let text = payledger_e2e::scrape_metrics(&metrics).await?;
    let (at_kill, _) = sum_of(&text, "payledger_projector_bootstrapping");
    let (segments_at_kill, _) = sum_of(&text, "payledger_projector_bootstrap_segments_read_total");
    anyhow::ensure!(
        at_kill > 0.0,
        "every partition had bootstrapped before nats-server was killed; the row needs a longer history:\n{text}"
    );
    let port = stack.h.nats.port();
    let dir = stack.h.dir.path().join("nats");
    stack.h.nats = payledger_server_common::local_nats::LocalNats::start_on(&dir, port)?;
    let restarted = Instant::now();
    let first_ack = progress.first_ack_after_in_background(killed, Duration::from_secs(120));

    // Every partition reading the log again.
    let deadline = Instant::now() + Duration::from_secs(120);
    let bootstrapped_after = loop {
        stack.ensure_running()?;
        let text = payledger_e2e::scrape_metrics(&metrics).await?;
        let (starting, samples) = sum_of(&text, "payledger_projector_bootstrapping");
        if samples == partitions && starting == 0.0 {
            break restarted.elapsed();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{starting} partitions still starting 120 s after nats-server came back:\n{}",
            stack.projector.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let recovered = first_ack.await??;
    let text = payledger_e2e::scrape_metrics(&metrics).await?;
    let (segments, _) = sum_of(&text, "payledger_projector_bootstrap_segments_read_total");
    let log = stack.projector.log();
    let failed = log.matches("partition failed").count();
    eprintln!(
        "{at_kill} of {partitions} partitions bootstrapping at the kill ({segments_at_kill} segments read); \
         all reading the log {:.1} s after nats-server came back; {segments} segments read in all, \
         {failed} partition starts failed and were tried again",
        bootstrapped_after.as_secs_f64()
    );
    // A start waiting on NATS when it died gave up at once, saying why, rather
    // than when its request timed out after NATS was back.
    anyhow::ensure!(
        !log.contains("timed out"),
        "a partition's start waited out a timeout:\n{log}"
    );
    for line in log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .take(20)
    {
        eprintln!("projector: {line}");
    }

    let new = client.await??;
    anyhow::ensure!(
        new.acked.sequences.len() == batches() * 20,
        "{} events acknowledged after the purge, {} sent",
        new.acked.sequences.len(),
        batches() * 20
    );
    let report = ClientReport::merge(vec![old, new])?;
    let verified = stack.verify(&report.acked).await?;
    stack.verify_replay(&verified).await?;
    MatrixLine {
        row: "nats-server SIGKILL while a projector bootstraps",
        nats: "1 node",
        fault: &format!(
            "log head purged (history {last} records, log from {keep_from}); SIGKILL with {at_kill} of \
             {partitions} partitions bootstrapping from the archive, restarted at once; bootstrap \
             done {:.1} s after NATS was back",
            bootstrapped_after.as_secs_f64()
        ),
        report: &report,
        verified: &verified,
        recovery: recovered,
    }
    .write()
}

/// How long a row keeps the object store away.
const STORE_DOWN: Duration = Duration::from_secs(20);

/// Brings the object store back on the same endpoint and data and waits until
/// it serves again; the instant it did.
async fn store_back(stack: &mut FaultStack) -> anyhow::Result<Instant> {
    stack.s3.as_mut().expect("an S3 stack").restart().await?;
    Ok(Instant::now())
}

/// The stream's last sequence.
async fn last_sequence(stack: &FaultStack) -> anyhow::Result<u64> {
    let client = payledger_e2e::connect_nats(&stack.nats_urls()).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(payledger_server_common::topology::STREAM)
        .await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// Waits until the archive's highest watermark reaches `through`; how long it took.
async fn archived_through(
    stack: &FaultStack,
    through: u64,
    within: Duration,
) -> anyhow::Result<Duration> {
    payledger_e2e::wait_until_archived_within(&stack.archive()?, through, within)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; ingest's log ends:\n{}", tail(&stack.ingest.log(), 30)))
}

/// Prints the WARN and ERROR lines of a service's log (once each, with a count):
/// what an operator reading it during the row would have seen.
fn print_warnings(name: &str, log: &str) {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        // Without the timestamp, so that repeats count as one.
        let text = line
            .split_once(' ')
            .map(|(_, rest)| rest)
            .unwrap_or(line)
            .to_string();
        match seen.iter_mut().find(|(t, _)| *t == text) {
            Some((_, n)) => *n += 1,
            None => seen.push((text, 1)),
        }
    }
    eprintln!(
        "{name}: {} warning/error lines",
        seen.iter().map(|(_, n)| n).sum::<usize>()
    );
    for (text, n) in seen.iter().take(15) {
        let text: String = text.chars().take(400).collect();
        eprintln!("  {n}x {text}");
    }
}

/// The object store goes away for 20 s while the client writes: ingest goes on
/// acknowledging (the log is NATS), the archiver catches up once the store is
/// back, and the end checks hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_down_20s_mid_archive() -> anyhow::Result<()> {
    let mut stack = FaultStack::start_on(Nats::Single, Stores::S3, &[], &[]).await?;
    let (progress, client) = client_running(&stack, "s3-archive").await?;
    let ingest_metrics = stack.metrics.clone().expect("metrics").0;
    let acked_before = progress.batches_acked();
    let killed = Instant::now();
    let first_ack =
        progress.first_ack_after_in_background(killed, STORE_DOWN + Duration::from_secs(60));
    stack.s3.as_mut().expect("an S3 stack").kill();
    // The archiver's lag shows the outage: positive evidence that records were
    // acknowledged and not archived while the store was away.
    let mut lag_seen = 0.0f64;
    let until = killed + STORE_DOWN;
    let readiness: [(&str, String); 2] = [
        ("payledger.v1.IngestService", stack.ingest.url()),
        ("payledger.v1.ProjectorService", stack.projector.url()),
    ];
    while Instant::now() < until {
        stack.ensure_running()?;
        // The services need NATS to be ready, not the object store.
        for (service, url) in &readiness {
            let status = payledger_e2e::faults::health_of(url, service).await;
            anyhow::ensure!(
                status == Some(SERVING),
                "{service} answered readiness {status:?} while the object store was down"
            );
        }
        if let Ok(text) = payledger_e2e::scrape_metrics(&ingest_metrics).await
            && let Some(lag) = payledger_e2e::metric_value(&text, "payledger_archive_lag_records")
        {
            lag_seen = lag_seen.max(lag);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let acked_while_down = progress.batches_acked() - acked_before;
    anyhow::ensure!(
        acked_while_down > 0,
        "no batch was acknowledged while the object store was down ({acked_before} before)"
    );
    store_back(&mut stack).await?;
    let recovered = first_ack.await??;
    let report = client.await??;
    let last = last_sequence(&stack).await?;
    let caught_up = archived_through(&stack, last, Duration::from_secs(120)).await?;
    let text = payledger_e2e::scrape_metrics(&ingest_metrics).await?;
    eprintln!(
        "{acked_while_down} batches acknowledged while the store was down, archive lag up to {lag_seen}; \
         the archive reached sequence {last} {:.1} s after the store was back; lag metric now {:?}",
        caught_up.as_secs_f64(),
        payledger_e2e::metric_value(&text, "payledger_archive_lag_records")
    );
    print_warnings("ingest", &stack.ingest.log());
    anyhow::ensure!(
        lag_seen > 0.0,
        "payledger_archive_lag_records never rose while the store was down"
    );
    finish_with(
        stack,
        report,
        batches(),
        "object store down 20 s mid-archive",
        "1 node; stores on SeaweedFS",
        &format!(
            "weed SIGKILL, back after 20 s; {acked_while_down} batches acknowledged while down, \
             readiness SERVING, archive lag up to {lag_seen} records; archive caught up {:.1} s after the store was back",
            caught_up.as_secs_f64()
        ),
        recovered,
    )
    .await
}

/// The newest checkpoint of each partition in the projector's store.
async fn newest_checkpoints(stack: &FaultStack) -> anyhow::Result<BTreeMap<u32, u64>> {
    use futures::TryStreamExt;
    let store = stack.open(&stack.projector_store)?;
    let objects: Vec<_> = store
        .list(Some(&object_store::path::Path::from("checkpoints")))
        .try_collect()
        .await?;
    let mut newest = BTreeMap::new();
    for o in objects {
        let parts: Vec<&str> = o.location.as_ref().split('/').collect();
        if let [.., p, name] = parts.as_slice()
            && let (Some(p), Some(seq)) = (
                p.strip_prefix('p').and_then(|p| p.parse::<u32>().ok()),
                name.strip_suffix(".bin")
                    .and_then(|s| s.parse::<u64>().ok()),
            )
        {
            let e = newest.entry(p).or_insert(0);
            *e = (*e).max(seq);
        }
    }
    Ok(newest)
}

/// The last sequence of each partition in the log.
async fn last_of_each_partition(stack: &FaultStack) -> anyhow::Result<BTreeMap<u32, u64>> {
    let mut last = BTreeMap::new();
    for entry in payledger_e2e::read_log(&stack.nats_urls()).await? {
        if let Some(p) = entry.partition() {
            last.insert(p, entry.seq);
        }
    }
    Ok(last)
}

/// The stream's rows as a fold of the log (NATS is up while the store is not).
async fn fold_of_the_log(stack: &FaultStack) -> anyhow::Result<payledger_semantics::Exposure> {
    let mut exposure = payledger_semantics::Exposure::new(payledger_semantics::Settings::default());
    for entry in payledger_e2e::read_log(&stack.nats_urls()).await? {
        if entry.partition().is_some() {
            exposure.apply_fact(&entry.to_record()?)?;
        }
    }
    Ok(exposure)
}

/// The object store goes away for 20 s while the projector checkpoints every
/// second: its checkpoints fail meanwhile, the stream's rows go on (they are in
/// NATS), checkpoints resume once the store is back; then the projector is
/// SIGKILLed and restarted, restores every partition from a checkpoint, and its
/// rows still equal the archive's fold, also after every row changed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_down_20s_mid_checkpoint() -> anyhow::Result<()> {
    let mut stack = FaultStack::start_on(Nats::Single, Stores::S3, &[], &[]).await?;
    let projector_metrics = stack.metrics.clone().expect("metrics").1;
    let (progress, client) = client_running(&stack, "s3-ckpt").await?;
    let killed = Instant::now();
    let first_ack =
        progress.first_ack_after_in_background(killed, STORE_DOWN + Duration::from_secs(60));
    stack.s3.as_mut().expect("an S3 stack").kill();
    let until = killed + STORE_DOWN;
    // While the store is still away, once the client is done (unless it writes
    // until 5 s before the store returns, at larger sizes): the stream's rows
    // reach a fold of the log.
    let mut client = client;
    let written = tokio::time::timeout(
        until
            .saturating_duration_since(Instant::now())
            .saturating_sub(Duration::from_secs(5)),
        &mut client,
    )
    .await;
    let (report, rows_while_down) = match written {
        Ok(report) => {
            let report = report??;
            let oracle = fold_of_the_log(&stack).await?;
            let mut q = payledger_e2e::query_client(&stack.query.url()).await?;
            let rows = payledger_e2e::assert_converges(
                &mut q,
                &oracle,
                until.saturating_duration_since(Instant::now()),
            )
            .await;
            (Some(report), Some(rows))
        }
        Err(_) => (None, None),
    };
    while Instant::now() < until {
        stack.ensure_running()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let text = payledger_e2e::scrape_metrics(&projector_metrics).await?;
    let newest_checkpoint_at = text
        .lines()
        .filter(|l| l.starts_with("payledger_projector_checkpoint_timestamp_seconds"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0f64, f64::max);
    let checkpoint_age_at_end = payledger_e2e::now_us() as f64 / 1e6 - newest_checkpoint_at;
    eprintln!(
        "rows while the store was down: {rows_while_down:?}; newest checkpoint {checkpoint_age_at_end:.1} s old \
         at the end of the outage"
    );
    print_warnings("projector", &stack.projector.log());
    let rows_while_down = match rows_while_down {
        Some(rows) => {
            rows?;
            "stream rows = fold of the log while the store was down"
        }
        None => "the client wrote until the store returned (rows not compared during the outage)",
    };
    let report = match report {
        Some(report) => report,
        None => client.await??,
    };
    let failures = sum_of(&text, "payledger_projector_checkpoint_failures_total").0;
    let back = store_back(&mut stack).await?;
    // Checkpoints resume: each partition's newest covers its last record.
    let wanted = last_of_each_partition(&stack).await?;
    let resumed = loop {
        let newest = newest_checkpoints(&stack).await.unwrap_or_default();
        if wanted
            .iter()
            .all(|(p, seq)| newest.get(p).is_some_and(|n| n >= seq))
        {
            break back.elapsed();
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(90),
            "checkpoints did not reach the log's last records within 90 s of the store's return: \
             have {newest:?}, want {wanted:?}; the projector's log ends:\n{}",
            tail(&stack.projector.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stack.ensure_running()?;
    stack.projector.kill_hard();
    stack.respawn_projector().await?;
    // Every partition restores from a checkpoint, none from the beginning.
    let restored_from = loop {
        let log = stack.projector.log();
        let restored: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("restored partition"))
            .filter(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("partition="))
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|p| wanted.contains_key(&p))
            })
            .collect();
        if restored.len() >= wanted.len() {
            break restored.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(180),
            "the restarted projector restored {} partitions:\n{}",
            restored.len(),
            tail(&log, 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for line in &restored_from {
        anyhow::ensure!(
            line.contains("from=checkpoint "),
            "a partition did not restore from its checkpoint: {line}"
        );
    }
    // More events on every merchant: a state that had counted anything twice,
    // or lost anything, would now write rows that differ from the fold.
    let mut after = PacedClient::new(stack.ingest.url(), "s3-ckpt-after", 6);
    after.pace = Duration::ZERO;
    let after = after.spawn().1.await??;
    let report = ClientReport::merge(vec![report, after])?;
    let recovered = first_ack.await??;
    eprintln!(
        "checkpoints caught up {:.1} s after the store was back; {failures} checkpoint failures counted",
        resumed.as_secs_f64()
    );
    finish_with(
        stack,
        report,
        batches() + 6,
        "object store down 20 s mid-checkpoint",
        "1 node; stores on SeaweedFS",
        &format!(
            "weed SIGKILL, back after 20 s, checkpoints every 1 s; {failures} checkpoint failures counted, \
             {rows_while_down}; newest checkpoint {checkpoint_age_at_end:.0} s old \
             when the store came back, checkpoints caught up {:.1} s later; projector SIGKILL + restart: \
             {} partitions from their checkpoints",
            resumed.as_secs_f64(),
            restored_from.len()
        ),
        recovered,
    )
    .await
}

/// What query answered, over and over, for every merchant-day of the fold with
/// consistency AUTHORITATIVE (only a committed snapshot answers that).
#[derive(Default, Debug)]
struct SnapshotWatch {
    /// Answers with rows, all equal to the fold's.
    served: usize,
    /// Answers whose rows differ from the fold's: a torn or wrong snapshot.
    torn: Vec<String>,
    /// Calls that ended with another code than OK, by code.
    codes: BTreeMap<String, usize>,
}

/// Asks query for each merchant-day of `expected` with consistency
/// AUTHORITATIVE until `stop` turns true.
fn watch_snapshots(
    query_url: String,
    expected: Vec<payledger_semantics::DailyRow>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<anyhow::Result<SnapshotWatch>> {
    tokio::spawn(async move {
        let mut by_key: BTreeMap<(String, payledger_semantics::Day), Vec<_>> = BTreeMap::new();
        for row in expected {
            by_key
                .entry((row.merchant_id.clone(), row.day))
                .or_default()
                .push(row);
        }
        let mut watch = SnapshotWatch::default();
        let mut q = payledger_e2e::query_client(&query_url).await?;
        while !*stop.borrow() {
            for ((merchant_id, day), want) in &by_key {
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    q.get_daily_exposure(payledger_proto::v1::GetDailyExposureRequest {
                        merchant_id: merchant_id.clone(),
                        day: day.to_string(),
                        consistency: payledger_proto::v1::Consistency::Authoritative as i32,
                        snapshot_id: String::new(),
                    }),
                )
                .await;
                match answer {
                    Ok(Ok(answer)) => {
                        let answer = answer.into_inner();
                        let mut rows = answer
                            .rows
                            .iter()
                            .map(payledger_proto::daily_row_from_proto)
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        rows.sort_by_key(|r| r.currency);
                        let mut want = want.clone();
                        want.sort_by_key(|r| r.currency);
                        if rows == want {
                            watch.served += 1;
                        } else if watch.torn.len() < 5 {
                            watch.torn.push(format!(
                                "{merchant_id} {day}: served {rows:?} from {:?}, the fold has {want:?}",
                                answer.provenance
                            ));
                        } else {
                            watch.torn.push(String::new());
                        }
                    }
                    Ok(Err(status)) => {
                        *watch
                            .codes
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                        if status.code() == tonic::Code::NotFound && watch.torn.len() < 5 {
                            // A snapshot that covers the day but lacks the merchant's rows.
                            watch.torn.push(format!(
                                "{merchant_id} {day}: NOT_FOUND ({}) but the fold has rows",
                                status.message()
                            ));
                        }
                    }
                    Err(_) => {
                        *watch
                            .codes
                            .entry("no answer within 10 s".into())
                            .or_default() += 1
                    }
                }
                if *stop.borrow() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(watch)
    })
}

/// A replay is started and the object store goes away for 20 s right after, while
/// its shard runs and before it commits. The replay either succeeds once the
/// store is back or fails with a reason, and then a second replay succeeds;
/// either way the committed snapshot equals the archive's fold, and query never
/// serves rows other than the fold's from a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_down_20s_mid_replay_commit() -> anyhow::Result<()> {
    let mut stack = FaultStack::start_on(Nats::Single, Stores::S3, &[], &[]).await?;
    let (_progress, client) = client_running(&stack, "s3-replay").await?;
    let report = client.await??;
    let verified = stack.verify(&report.acked).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let watcher = watch_snapshots(stack.query.url(), verified.archive_rows.clone(), stopped);
    let mut replayers = stack.replayers().await?;
    let id = FaultStack::start_replay(&mut replayers, &verified).await?;
    let killed = Instant::now();
    stack.s3.as_mut().expect("an S3 stack").kill();
    let state_at_kill = replayers
        .client
        .get_replay(payledger_proto::v1::GetReplayRequest {
            replay_id: id.clone(),
        })
        .await?
        .into_inner()
        .state;
    while Instant::now() < killed + STORE_DOWN {
        stack.ensure_running()?;
        for service in [&mut replayers.worker, &mut replayers.coordinator] {
            if let Some(status) = service.exited()? {
                anyhow::bail!("{} exited with {status}:\n{}", service.name, service.log());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let back = store_back(&mut stack).await?;
    let first = FaultStack::replay_outcome(&mut replayers, &id, Duration::from_secs(240)).await?;
    let ended = back.elapsed();
    let (outcome, done) = if first.state == payledger_proto::v1::ReplayState::Succeeded as i32 {
        (
            format!(
                "the replay succeeded {:.1} s after the store was back",
                ended.as_secs_f64()
            ),
            first,
        )
    } else {
        anyhow::ensure!(
            !first.error.is_empty(),
            "the replay failed without a reason: {first:?}"
        );
        eprintln!("the replay failed: {}", first.error);
        let again = FaultStack::start_replay(&mut replayers, &verified).await?;
        let second =
            FaultStack::replay_outcome(&mut replayers, &again, Duration::from_secs(120)).await?;
        anyhow::ensure!(
            second.state == payledger_proto::v1::ReplayState::Succeeded as i32,
            "the retried replay did not succeed: {second:?}\n{}",
            tail(&replayers.coordinator.log(), 40)
        );
        (
            format!(
                "the replay FAILED {:.1} s after the store was back ({}); a retried replay succeeded",
                ended.as_secs_f64(),
                first.error
            ),
            second,
        )
    };
    stack.check_committed(&done.snapshot_id, &verified).await?;
    // Positive evidence the watcher would have seen a snapshot's rows: query serves
    // the committed one.
    let seen = Instant::now();
    loop {
        let served = {
            let mut q = payledger_e2e::query_client(&stack.query.url()).await?;
            let row = &verified.archive_rows[0];
            q.get_daily_exposure(payledger_proto::v1::GetDailyExposureRequest {
                merchant_id: row.merchant_id.clone(),
                day: row.day.to_string(),
                consistency: payledger_proto::v1::Consistency::Authoritative as i32,
                snapshot_id: String::new(),
            })
            .await
            .ok()
            .and_then(|a| a.into_inner().provenance)
            .is_some_and(|p| p.snapshot_id == done.snapshot_id)
        };
        if served {
            break;
        }
        anyhow::ensure!(
            seen.elapsed() < Duration::from_secs(30),
            "query did not serve snapshot {} within 30 s of its commit",
            done.snapshot_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then the commit itself: another replay, the store taken away the moment it
    // is seen COMMITTING (if it gets past that between two looks, the row says so).
    let commit_outcome = {
        let id = FaultStack::start_replay(&mut replayers, &verified).await?;
        let began = Instant::now();
        let seen = loop {
            let replay = replayers
                .client
                .get_replay(payledger_proto::v1::GetReplayRequest {
                    replay_id: id.clone(),
                })
                .await?
                .into_inner();
            let state = payledger_proto::v1::ReplayState::try_from(replay.state)?;
            match state {
                payledger_proto::v1::ReplayState::Committing => {
                    stack.s3.as_mut().expect("an S3 stack").kill();
                    break true;
                }
                payledger_proto::v1::ReplayState::Running => {}
                _ => break false,
            }
            anyhow::ensure!(
                began.elapsed() < Duration::from_secs(120),
                "the second replay did not reach COMMITTING within 120 s: {replay:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if seen {
            let killed = Instant::now();
            while Instant::now() < killed + STORE_DOWN {
                stack.ensure_running()?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let back = store_back(&mut stack).await?;
            let ended =
                FaultStack::replay_outcome(&mut replayers, &id, Duration::from_secs(180)).await?;
            // An outage shorter than the coordinator's --commit-retry-for (60 s)
            // does not fail the replay: the commit is tried again until it lands.
            anyhow::ensure!(
                ended.state == payledger_proto::v1::ReplayState::Succeeded as i32,
                "the replay whose commit met the outage did not succeed: {ended:?}\n{}",
                tail(&replayers.coordinator.log(), 30)
            );
            stack.check_committed(&ended.snapshot_id, &verified).await?;
            format!(
                "store taken away while COMMITTING: the commit was tried again and the replay succeeded {:.1} s after the store was back",
                back.elapsed().as_secs_f64()
            )
        } else {
            "the second replay committed between two looks (2 ms apart): not taken mid-commit"
                .to_string()
        }
    };
    // A few more rounds of the watcher over the committed snapshot.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(true)?;
    let watch = watcher.await??;
    eprintln!(
        "state when the store went away: {state_at_kill}; {outcome}; {commit_outcome}; query served {} snapshot answers, \
         other codes {:?}",
        watch.served, watch.codes
    );
    print_warnings("coordinator", &replayers.coordinator.log());
    print_warnings("worker", &replayers.worker.log());
    print_warnings("query", &stack.query.log());
    anyhow::ensure!(
        watch.torn.is_empty(),
        "query served rows of a snapshot that differ from the fold ({} answers), e.g. {:#?}",
        watch.torn.len(),
        &watch.torn[..watch.torn.len().min(5)]
    );
    anyhow::ensure!(watch.served > 0, "the watcher never saw a snapshot's rows");
    for service in [&mut replayers.worker, &mut replayers.coordinator] {
        if let Some(status) = service.exited()? {
            anyhow::bail!("{} exited with {status}:\n{}", service.name, service.log());
        }
    }
    stack.ensure_running()?;
    let codes: Vec<String> = watch
        .codes
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    MatrixLine {
        row: "object store down 20 s mid-replay commit",
        nats: "1 node; stores on SeaweedFS",
        fault: &format!(
            "weed SIGKILL right after StartReplay, back after 20 s; {outcome}; {commit_outcome}; \
             query's AUTHORITATIVE answers: {} equal to the fold, none torn{}",
            watch.served,
            if codes.is_empty() {
                String::new()
            } else {
                format!(", others {}", codes.join(", "))
            }
        ),
        report: &report,
        verified: &verified,
        recovery: ended,
    }
    .write()
}
