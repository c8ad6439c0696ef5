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
    let before = progress.batches_acked();
    if let Err(e) = progress
        .wait_for(before + 1, Duration::from_secs(120))
        .await
    {
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
    Ok(since.elapsed())
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
