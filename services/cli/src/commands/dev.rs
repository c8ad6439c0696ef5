//! `payledger dev` (the stack until a signal) and `payledger demo` (the stack, a
//! short workload, a replay, then stop).

use std::io::Write;
use std::time::Duration;

use payledger_proto::v1;
use payledger_semantics::Day;

use super::query::{Current, Daily};
use super::{now_us, status_error};
use crate::dev::{DevArgs, DevStack};
use crate::generate::{GenConfig, Generator};
use crate::render::{Exit, Output, Plain, Report};
use crate::replay;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    dev: DevArgs,
    /// Events to send.
    #[arg(long, default_value_t = 5000)]
    events: usize,
}

/// Where the stack listens.
struct StackUp<'a> {
    stack: &'a DevStack,
    workers: &'a [std::net::SocketAddr],
}

impl Report for StackUp<'_> {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let s = self.stack;
        writeln!(out, "payledger dev is up (Ctrl-C or SIGTERM to stop)")?;
        writeln!(out, "  nats      {}", s.nats.url())?;
        writeln!(out, "  ingest    http://{}", s.ingest)?;
        writeln!(out, "  query     http://{}", s.query)?;
        writeln!(out, "  projector http://{} (health)", s.projector)?;
        writeln!(
            out,
            "  replay coordinator http://{} (workers {:?})",
            s.coordinator, self.workers
        )?;
        writeln!(out, "  data      {}", s.data.display())?;
        writeln!(
            out,
            "try: payledger gen --send --events 5000 && payledger query current m-00001"
        )?;
        writeln!(
            out,
            "then: payledger replay start --from $(date -u +%F) --to $(date -u +%F) --wait"
        )
    }

    fn json(&self) -> serde_json::Value {
        let s = self.stack;
        serde_json::json!({
            "nats": s.nats.url(),
            "ingest": format!("http://{}", s.ingest),
            "query": format!("http://{}", s.query),
            "projector": format!("http://{}", s.projector),
            "coordinator": format!("http://{}", s.coordinator),
            "workers": self.workers.iter().map(|w| format!("http://{w}")).collect::<Vec<_>>(),
            "data": s.data.display().to_string(),
        })
    }
}

pub async fn dev(args: DevArgs, out: &Output) -> anyhow::Result<Exit> {
    let stack = DevStack::start(&args).await?;
    out.emit(&StackUp {
        stack: &stack,
        workers: &args.workers,
    })?;
    // SIGTERM as well as Ctrl-C: a supervisor, a terminal closing or `kill`
    // must not leave the private nats-server running.
    payledger_server_common::shutdown::next_signal().await;
    tracing::info!("shutdown requested; draining (signal again to exit at once)");
    // A second signal cuts the drain short, but only once the drain, and
    // with it `stack`, is dropped, since that stops nats-server.
    let drained = tokio::select! {
        stopped = stack.stop() => Some(stopped),
        _ = payledger_server_common::shutdown::next_signal() => None,
    };
    match drained {
        Some(stopped) => stopped?,
        None => {
            tracing::warn!("second signal; exiting without draining");
            std::process::exit(130);
        }
    }
    Ok(Exit::Success)
}

pub async fn demo(args: DemoArgs, out: &Output) -> anyhow::Result<Exit> {
    // Interrupted, the demo is dropped, and its stack with it, which stops the
    // stack's nats-server.
    tokio::select! {
        finished = run_demo(args, out) => finished,
        _ = payledger_server_common::shutdown::next_signal() => {
            eprintln!("interrupted; the demo's stack is stopped");
            std::process::exit(130);
        }
    }
}

async fn run_demo(args: DemoArgs, out: &Output) -> anyhow::Result<Exit> {
    let DemoArgs { dev, events } = args;
    let stack = DevStack::start(&dev).await?;
    out.note(&format!(
        "stack up: nats {}  ingest {}  query {}  projector {}  coordinator {}",
        stack.nats.url(),
        stack.ingest,
        stack.query,
        stack.projector,
        stack.coordinator
    ))?;
    let config = GenConfig {
        events,
        merchants: 20,
        ..GenConfig::default()
    };
    let mut generator = Generator::new(config);
    let ingest_url = format!("http://{}", stack.ingest);
    let tally = super::traffic::send_generated(&mut generator, events, 500, 0, &ingest_url).await?;
    out.emit(&Plain {
        text: format!(
            "sent {events} events: {} accepted, {} duplicate (absorbed by ingest), {} rejected",
            tally.accepted, tally.duplicate, tally.rejected
        ),
        value: serde_json::json!({"sent": events, "result": tally.json()}),
        exit: Exit::Success,
    })?;
    let mut client = super::query::client(&format!("http://{}", stack.query)).await?;
    let mut merchants: Vec<_> = tally.last_seq.iter().collect();
    merchants.sort();
    let today = Day::of_micros(now_us());
    for (merchant, last) in merchants.iter().take(3) {
        // Wait until the stream tables have caught up with what ingest acknowledged.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let exposure = loop {
            match client
                .get_current_exposure(v1::GetCurrentExposureRequest {
                    merchant_id: merchant.to_string(),
                })
                .await
            {
                Ok(e) if e.get_ref().rows.iter().map(|r| r.log_position).max() >= Some(**last) => {
                    break e.into_inner();
                }
                _ if std::time::Instant::now() > deadline => {
                    anyhow::bail!("rows of {merchant} did not catch up within 30 s")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        out.note("")?;
        out.emit(&Current(exposure))?;
        if let Ok(daily) = client
            .get_daily_exposure(v1::GetDailyExposureRequest {
                merchant_id: merchant.to_string(),
                day: today.to_string(),
                ..Default::default()
            })
            .await
        {
            out.note("")?;
            out.emit(&Daily(daily.into_inner()))?;
        }
    }
    // The authoritative side: replay the archive and commit today's rows.
    let objects = payledger_storage::open_store(&stack.data.join("store").display().to_string())?;
    let archive = payledger_storage::ArchiveStore::new(
        objects.clone(),
        payledger_semantics::RecordedStream::new(dev.stream.settings()?),
    );
    let last = tally.last_seq.values().copied().max().unwrap_or(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while payledger_projector::replay::latest_cutoff(&archive).await? < last {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the archive did not catch up within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The nightly job, run now: the coordinator shards the replay over the two
    // workers and commits the snapshot.
    let mut coordinator = replay::client(&format!("http://{}", stack.coordinator)).await?;
    let started = coordinator
        .start_replay(v1::StartReplayRequest {
            from_day: Day(today.0 - 1).to_string(),
            to_day: today.to_string(),
            reason: "demo".into(),
            cutoff: 0,
            from_genesis: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    out.note(&format!(
        "\n{} on the replay workers",
        replay::started_line(&started)
    ))?;
    let ended = replay::wait(&mut coordinator, &started.replay_id, !out.is_json()).await?;
    let replayed = super::replay::Replay {
        replay: ended,
        shards: false,
        waited: true,
    };
    out.emit(&replayed)?;
    anyhow::ensure!(
        replayed.replay.state == i32::from(v1::ReplayState::Succeeded),
        "the replay did not succeed"
    );
    if let Some((merchant, _)) = merchants.first() {
        let ask = v1::GetDailyExposureRequest {
            merchant_id: merchant.to_string(),
            day: today.to_string(),
            ..Default::default()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let answer = client
                .get_daily_exposure(ask.clone())
                .await
                .map_err(status_error)?
                .into_inner();
            let from_replay = answer
                .provenance
                .as_ref()
                .is_some_and(|p| p.source == v1::Source::Replay as i32);
            if from_replay || std::time::Instant::now() > deadline {
                out.note("")?;
                out.emit(&Daily(answer))?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    stack.stop().await?;
    Ok(Exit::Success)
}
