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
    let verified = stack.verify(&report.acked).await?;
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

/// The JetStream store fills up mid-ingest and is freed: no platform process
/// exits, liveness stays SERVING, readiness turns NOT_SERVING and back, and
/// nothing acknowledged is lost. If nats-server stays unable to write once space
/// is free, the metric says so and a restart of nats-server (the runbook's step)
/// brings the services back by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_and_freed() -> anyhow::Result<()> {
    let metrics = format!(
        "127.0.0.1:{}",
        payledger_server_common::local_nats::free_port()?
    );
    let mut stack = FaultStack::start_with(
        Nats::SingleOnTmpfs { mebibytes: 96 },
        &["--metrics-listen", &metrics],
    )
    .await?;
    let (progress, client) = client_running(&stack, "disk").await?;
    let filler = stack.tmpfs.as_ref().expect("a tmpfs").fill()?;
    let filled = Instant::now();
    let readiness: [(&str, String); 2] = [
        ("payledger.v1.IngestService", stack.ingest.url()),
        ("payledger.v1.ProjectorService", stack.projector.url()),
    ];
    let mut not_ready_after = Duration::ZERO;
    for (service, url) in &readiness {
        let took = wait_health(url, service, NOT_SERVING, Duration::from_secs(30)).await?;
        not_ready_after = not_ready_after.max(took);
    }
    let not_ready_after = not_ready_after.max(filled.elapsed().min(not_ready_after));
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
    let by_itself = wait_health(
        &stack.ingest.url(),
        readiness[0].0,
        SERVING,
        Duration::from_secs(30),
    )
    .await;
    let outcome = match by_itself {
        Ok(took) => format!(
            "writes resumed by themselves {:.1} s after space was freed",
            took.as_secs_f64()
        ),
        Err(_) => {
            let text = payledger_e2e::scrape_metrics(&metrics).await?;
            anyhow::ensure!(
                payledger_e2e::metric_value(
                    &text,
                    "payledger_readiness_failing{condition=\"jetstream_write\"}"
                ) == Some(1.0),
                "nats-server cannot write, and the metric does not say so:\n{text}"
            );
            // The runbook: restart that nats-server.
            let port = stack.h.nats.port();
            let dir = stack.tmpfs.as_ref().expect("a tmpfs").path().to_path_buf();
            stack.h.nats.stop();
            stack.h.nats = payledger_server_common::local_nats::LocalNats::start_on(&dir, port)?;
            let restarted = Instant::now();
            for (service, url) in &readiness {
                wait_health(url, service, SERVING, Duration::from_secs(60)).await?;
            }
            format!(
                "nats-server kept refusing writes after space was freed (metric and alert fired); \
                 after its restart the services were ready again in {:.1} s",
                restarted.elapsed().as_secs_f64()
            )
        }
    };
    let recovered = recovery(&stack, &progress, freed).await?;
    stack.ensure_running()?;
    eprintln!("readiness NOT_SERVING {not_ready_after:?} after the disk filled; {outcome}");
    finish(
        stack,
        client,
        "JetStream store full, then freed",
        "1 node, store on a 96 MiB tmpfs",
        &format!(
            "filled ≥ 8 s; readiness NOT_SERVING after {:.1} s, liveness up; {outcome}",
            not_ready_after.as_secs_f64()
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

    let metrics = format!(
        "127.0.0.1:{}",
        payledger_server_common::local_nats::free_port()?
    );
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
    let first_ack = {
        let progress = progress.clone();
        tokio::spawn(async move {
            progress
                .first_ack_after(killed, Duration::from_secs(120))
                .await
        })
    };

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
