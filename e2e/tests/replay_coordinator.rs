//! The distributed replay: the coordinator shards a replay over projector worker
//! processes, survives a worker and itself being SIGKILLed, commits only verified
//! snapshots, and reconciles them with the stream.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use payledger_cli::generate::{GenConfig, Generator};
use payledger_e2e::convergence::{history_config, publish_history};
use payledger_e2e::{
    AcceptedLog, Archive, Service, Stack, archive_at, binary, ingest_client, now_us, query_client,
    stream_messages, wait_until_archived,
};
use payledger_projector::replay::fold_partitions;
use payledger_proto::v1::{self, replay_coordinator_client::ReplayCoordinatorClient};
use payledger_semantics::{DailyRow, Day, Settings};
use payledger_storage::{SnapshotStore, open_store};
use tonic::transport::Channel;

/// Records a worker folds per second: slow enough that a shard is still running
/// when the test kills its worker, fast enough to keep the test short.
const PACE: &str = "400";

/// The stack, what ingest accepted and the archive's watermark at its end.
struct Replays {
    stack: Stack,
    log: AcceptedLog,
    cutoff: u64,
}

payledger_e2e::deref_to_stack!(Replays);

/// Ingest (archiving), a stream projector, `workers` replay workers and query, with
/// a generated history of several days (duplicates, conflicts, late events,
/// corrections, FX and risk versions) fully archived.
async fn stack(workers: usize) -> anyhow::Result<Replays> {
    let stack = Stack::builder()
        .archive(Archive::Fs)
        .projector(&["--mode", "stream"])
        .workers(workers, &["--replay-max-records-per-sec", PACE])
        .query(&["--commit-poll-interval", "100ms"])
        .start()
        .await?;
    let mut client = stack.ingest_client().await?;
    let history = GenConfig {
        seed: 29,
        merchants: 80,
        late_pct: 10.0,
        // Event times over the last 30 hours, so that the history has days before
        // today whatever the time of day the test runs (late events alone reach
        // back 20 hours only: after 20:00 UTC they all fall on today).
        spread_secs: 30 * 3600,
        ..history_config()
    };
    // Pauses spread the log over many cuts, so that shards have several segments.
    let log = publish_history(&mut client, history, 16, Duration::from_millis(150)).await?;
    let messages = stream_messages(&stack.h.nats.url()).await?;
    wait_until_archived(&stack.archive()?, messages).await?;
    Ok(Replays {
        stack,
        log,
        cutoff: messages,
    })
}

impl Replays {
    async fn coordinator(&mut self, extra: &[&str]) -> anyhow::Result<Service> {
        let mut args = vec!["--shard-stall-timeout", "10s", "--reconcile-wait", "60s"];
        args.extend_from_slice(extra);
        self.spawn_coordinator(&args).await
    }

    fn first_day(&self) -> Day {
        self.log
            .records
            .values()
            .filter_map(|r| match &r.body {
                payledger_semantics::RecordBody::Fact(f) => Some(Day::of_micros(f.event_time_us)),
                _ => None,
            })
            .min()
            .expect("events")
    }

    /// The rows a single in-process fold of the whole archive gives for the days.
    async fn expected_rows(&self, from: Day, to: Day) -> anyhow::Result<Vec<DailyRow>> {
        let partitions: Vec<u32> = (0..Settings::default().partitions).collect();
        let folded = fold_partitions(
            &archive_at(&self.store)?,
            Settings::default(),
            &partitions,
            self.cutoff,
        )
        .await?;
        Ok(sorted(
            folded
                .daily_rows()
                .into_iter()
                .filter(|r| from <= r.day && r.day <= to)
                .collect(),
        ))
    }

    /// Publishes `batches` more generated batches and waits until the archive holds
    /// them; the stack's cutoff moves to the new end of the log.
    async fn publish_more(&mut self, seed: u64, batches: usize) -> anyhow::Result<()> {
        let mut client = ingest_client(&self.ingest.url()).await?;
        let history = GenConfig {
            seed,
            merchants: 80,
            spread_secs: 30 * 3600,
            ..history_config()
        };
        let more =
            publish_history(&mut client, history, batches, Duration::from_millis(150)).await?;
        self.log.records.extend(more.records);
        let messages = stream_messages(&self.h.nats.url()).await?;
        wait_until_archived(&archive_at(&self.store)?, messages).await?;
        self.cutoff = messages;
        Ok(())
    }

    /// Publishes bursts of generated events and stops ingest (and so its archiver,
    /// SIGSTOP) right after one is acknowledged, until the archive is seen behind
    /// the stream; returns the stream's last sequence and the archive's highest
    /// watermark. Ingest stays stopped: the caller resumes it.
    async fn burst_ahead_of_the_archive(&mut self, seed: u64) -> anyhow::Result<(u64, u64)> {
        let archive = archive_at(&self.store)?;
        let mut ingest = ingest_client(&self.ingest.url()).await?;
        let mut burst = Generator::new(GenConfig {
            seed,
            merchants: 80,
            spread_secs: 30 * 3600,
            ..history_config()
        });
        for _ in 0..20 {
            for _ in 0..4 {
                self.log
                    .publish(&mut ingest, burst.batch(500, now_us()))
                    .await?;
            }
            self.ingest.pause()?;
            let last = stream_messages(&self.h.nats.url()).await?;
            let archived = payledger_projector::replay::latest_cutoff(&archive).await?;
            if archived < last {
                return Ok((last, archived));
            }
            self.ingest.resume()?;
        }
        anyhow::bail!("the archive kept up with every burst")
    }

    async fn snapshot_rows(&self, snapshot_id: &str) -> anyhow::Result<Vec<DailyRow>> {
        let snapshots = SnapshotStore::new(open_store(&self.store)?);
        let mut rows = Vec::new();
        for p in 0..Settings::default().partitions {
            rows.extend(snapshots.read_part(snapshot_id, p).await?);
        }
        Ok(sorted(rows))
    }
}

fn sorted(mut rows: Vec<DailyRow>) -> Vec<DailyRow> {
    rows.sort_by(|a, b| {
        (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
    });
    rows
}

async fn coordinator_client(url: &str) -> anyhow::Result<ReplayCoordinatorClient<Channel>> {
    Ok(ReplayCoordinatorClient::new(
        Channel::from_shared(url.to_string())?.connect().await?,
    ))
}

fn start(from: Day, to: Day, reason: &str) -> v1::StartReplayRequest {
    v1::StartReplayRequest {
        from_day: from.to_string(),
        to_day: to.to_string(),
        reason: reason.into(),
        cutoff: 0,
        from_genesis: false,
    }
}

/// Follows a replay until `done` holds for an update (or the replay ends).
async fn watch_until(
    client: &mut ReplayCoordinatorClient<Channel>,
    replay_id: &str,
    mut done: impl FnMut(&v1::Replay) -> bool,
) -> anyhow::Result<v1::Replay> {
    let mut updates = client
        .watch_replay(v1::GetReplayRequest {
            replay_id: replay_id.into(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(replay) = tokio::time::timeout(Duration::from_secs(120), updates.message())
        .await
        .map_err(|_| anyhow::anyhow!("no replay update within 120 s"))??
    {
        if done(&replay) {
            return Ok(replay);
        }
        last = Some(replay);
    }
    anyhow::bail!("the replay ended before the condition held: {last:#?}")
}

fn ended(r: &v1::Replay) -> bool {
    r.state >= i32::from(v1::ReplayState::Succeeded)
}

fn succeeded(r: &v1::Replay) -> anyhow::Result<()> {
    anyhow::ensure!(
        r.state == i32::from(v1::ReplayState::Succeeded),
        "replay {} ended {:?}: {}",
        r.replay_id,
        v1::ReplayState::try_from(r.state),
        r.error
    );
    Ok(())
}

/// Starts a replay and follows it to a successful end.
async fn replay_to_the_end(
    client: &mut ReplayCoordinatorClient<Channel>,
    request: v1::StartReplayRequest,
) -> anyhow::Result<v1::Replay> {
    let started = client.start_replay(request).await?.into_inner();
    let done = watch_until(client, &started.replay_id, ended).await?;
    succeeded(&done)?;
    Ok(done)
}

fn assert_reconciled_clean(r: &v1::Replay, rows: usize) {
    let summary = r.reconciliation.as_ref().expect("a reconciliation summary");
    assert!(summary.stream_caught_up, "{summary:?}");
    assert_eq!(
        (
            summary.rows_equal as usize,
            summary.rows_stream_ahead,
            summary.rows_divergent,
            summary.rows_missing
        ),
        (rows, 0, 0, 0),
        "{summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_shard_is_replaced_and_the_snapshot_is_identical() -> anyhow::Result<()>
{
    let mut s = stack(3).await?;
    let coordinator = s.coordinator(&["--worker-cooldown", "60s"]).await?;
    let mut client = coordinator_client(&coordinator.url()).await?;
    let (from, to) = (s.first_day(), Day::of_micros(now_us()));
    let started = client
        .start_replay(start(from, to, "late settlement file"))
        .await?
        .into_inner();
    assert_eq!(
        started.cutoff, s.cutoff,
        "the default cutoff is the highest watermark"
    );
    assert_eq!(started.shards.len(), 16, "one shard per partition");

    // Kill the second worker while it is inside a shard: some segments folded, not all.
    let victim = s.workers[1].url();
    let at_kill = watch_until(&mut client, &started.replay_id, |r| {
        r.shards.iter().any(|sh| {
            sh.worker == victim
                && sh.state == i32::from(v1::ShardState::Running)
                && sh
                    .progress
                    .is_some_and(|p| p.segments_done >= 1 && p.segments_done < p.segments_total)
        })
    })
    .await?;
    s.workers[1].kill_hard();
    let interrupted = at_kill
        .shards
        .iter()
        .find(|sh| sh.worker == victim && sh.state == i32::from(v1::ShardState::Running))
        .expect("the shard running on the victim")
        .index as usize;

    let done = watch_until(&mut client, &started.replay_id, ended).await?;
    succeeded(&done)?;
    let retried = &done.shards[interrupted];
    assert!(retried.attempts >= 2, "{retried:?}");
    assert_ne!(
        retried.worker, victim,
        "retried on another worker: {retried:?}"
    );
    assert!(retried.failed_workers.contains(&victim), "{retried:?}");
    assert!(
        done.shards
            .iter()
            .all(|sh| sh.state == i32::from(v1::ShardState::Done)),
        "{done:#?}"
    );

    // The same rows as one fold of the whole archive, and as the stream's.
    let expected = s.expected_rows(from, to).await?;
    assert!(expected.len() > 100 && expected.iter().any(|r| r.late > 0 && r.conflicts > 0));
    assert_eq!(s.snapshot_rows(&done.snapshot_id).await?, expected);
    assert_eq!(done.commit_number, 1);
    assert_reconciled_clean(&done, expected.len());

    // The stored report says the same.
    let snapshots = SnapshotStore::new(open_store(&s.store)?);
    let stored: serde_json::Value = serde_json::from_slice(
        &snapshots
            .reconciliation(done.commit_number)
            .await?
            .expect("a stored report"),
    )?;
    assert_eq!(stored["snapshot_id"], done.snapshot_id.as_str());
    assert_eq!(stored["rows_equal"], expected.len());
    assert_eq!(stored["rows_divergent"], 0);
    assert_eq!(stored["differences"].as_array().map(Vec::len), Some(0));

    // The commit names every part with the hash the workers reported and verified.
    let commit = snapshots.commits().await?.pop().expect("a commit");
    assert_eq!(commit.draft.snapshot_id, done.snapshot_id);
    let reported: BTreeMap<String, String> = done
        .shards
        .iter()
        .flat_map(|sh| sh.result.as_ref().expect("result").parts.clone())
        .map(|p| (p.path, p.content_hash))
        .collect();
    let committed: BTreeMap<String, String> = commit
        .draft
        .parts
        .iter()
        .map(|p| (p.path.clone(), p.content_hash.clone()))
        .collect();
    assert_eq!(reported, committed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_survive_a_coordinator_restart_and_racing_replays_both_commit() -> anyhow::Result<()>
{
    let mut s = stack(2).await?;
    let mut coordinator = s.coordinator(&[]).await?;
    let mut client = coordinator_client(&coordinator.url()).await?;
    let (first, today) = (s.first_day(), Day::of_micros(now_us()));
    let started = client
        .start_replay(start(first, today, "backfill"))
        .await?
        .into_inner();

    // SIGKILL the coordinator once some shards are done and others are not.
    let before = watch_until(&mut client, &started.replay_id, |r| {
        let done = r
            .shards
            .iter()
            .filter(|sh| sh.state == i32::from(v1::ShardState::Done))
            .count();
        (2..r.shards.len() - 4).contains(&done)
    })
    .await?;
    coordinator.kill_hard();
    let coordinator = s.coordinator(&[]).await?;
    let mut client = coordinator_client(&coordinator.url()).await?;
    let resumed = client
        .get_replay(v1::GetReplayRequest {
            replay_id: started.replay_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(resumed.reason, "backfill");
    let done = watch_until(&mut client, &started.replay_id, ended).await?;
    succeeded(&done)?;
    // Shards finished before the kill (and persisted) were not run again.
    let kept = before
        .shards
        .iter()
        .filter(|sh| sh.state == i32::from(v1::ShardState::Done))
        .filter(|sh| done.shards[sh.index as usize].attempts == 1)
        .count();
    assert!(kept >= 1, "before: {before:#?}\nafter: {done:#?}");
    let all_days = s.expected_rows(first, today).await?;
    assert_eq!(s.snapshot_rows(&done.snapshot_id).await?, all_days);
    assert_reconciled_clean(&done, all_days.len());

    // Two replays at once: a nightly one of today only and a correction of the
    // earlier days. Both commit, under distinct consecutive numbers.
    let yesterday = Day(today.0 - 1);
    let (mut a, mut b) = (client.clone(), client.clone());
    let (nightly, correction) = (
        a.start_replay(start(today, today, "nightly")),
        b.start_replay(start(first, yesterday, "correction")),
    );
    let (nightly, correction) = tokio::try_join!(nightly, correction)?;
    let nightly = watch_until(&mut client, &nightly.into_inner().replay_id, ended).await?;
    let correction = watch_until(&mut client, &correction.into_inner().replay_id, ended).await?;
    succeeded(&nightly)?;
    succeeded(&correction)?;
    let mut numbers = vec![nightly.commit_number, correction.commit_number];
    numbers.sort_unstable();
    assert_eq!(numbers, [2, 3]);
    let commits = SnapshotStore::new(open_store(&s.store)?).commits().await?;
    assert_eq!(
        commits.iter().map(|c| c.number).collect::<Vec<_>>(),
        [1, 2, 3],
        "the commit log has no gap"
    );
    for replay in [&done, &nightly, &correction] {
        let commit = &commits[replay.commit_number as usize - 1];
        assert_eq!(commit.draft.snapshot_id, replay.snapshot_id);
        assert_eq!(commit.draft.replay_id, replay.replay_id);
    }

    // The nightly commit of today leaves earlier days' authoritative rows in place:
    // an earlier day answers from a commit covering it, with the same rows.
    let mut query = query_client(&s.query().url()).await?;
    let earlier = all_days
        .iter()
        .find(|r| r.day < today)
        .expect("a row of an earlier day");
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let answer = query
            .get_daily_exposure(v1::GetDailyExposureRequest {
                merchant_id: earlier.merchant_id.clone(),
                day: earlier.day.to_string(),
                consistency: v1::Consistency::Authoritative as i32,
                snapshot_id: String::new(),
            })
            .await?
            .into_inner();
        let snapshot = answer.provenance.as_ref().map(|p| p.snapshot_id.clone());
        if snapshot.as_deref() == Some(correction.snapshot_id.as_str()) || Instant::now() > deadline
        {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let provenance = answer.provenance.expect("provenance");
    assert_eq!(
        provenance.snapshot_id, correction.snapshot_id,
        "the earlier day is answered by the correction (same cutoff, higher number than the nightly's, which does not cover it)"
    );
    let served: Vec<_> = answer
        .rows
        .iter()
        .map(|r| (r.currency.clone(), r.closing_minor.clone()))
        .collect();
    let expected: Vec<_> = all_days
        .iter()
        .filter(|r| r.merchant_id == earlier.merchant_id && r.day == earlier.day)
        .map(|r| (r.currency.to_string(), r.closing_minor.to_string()))
        .collect();
    assert_eq!(served, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replay_requests_are_refused_and_start_nothing() -> anyhow::Result<()> {
    let mut s = stack(1).await?;
    let coordinator = s.coordinator(&["--max-active-replays", "1"]).await?;
    let mut client = coordinator_client(&coordinator.url()).await?;
    let today = Day::of_micros(now_us());
    let cases = [
        (
            v1::StartReplayRequest {
                from_day: "2026-13-01".into(),
                ..start(today, today, "x")
            },
            tonic::Code::InvalidArgument,
            "from_day",
        ),
        (
            start(today, Day(today.0 - 1), "x"),
            tonic::Code::InvalidArgument,
            "after",
        ),
        (
            start(today, today, "  "),
            tonic::Code::InvalidArgument,
            "reason",
        ),
        (
            start(Day(today.0 + 2), Day(today.0 + 3), "x"),
            tonic::Code::FailedPrecondition,
            "are in the future",
        ),
        (
            v1::StartReplayRequest {
                cutoff: s.cutoff + 1,
                ..start(today, today, "x")
            },
            tonic::Code::InvalidArgument,
            "not a watermark",
        ),
    ];
    for (request, code, says) in cases {
        let err = client
            .start_replay(request.clone())
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{request:?}: {err:?}");
        assert!(
            err.message().contains(says),
            "{request:?}: {}",
            err.message()
        );
    }
    let listed = client
        .list_replays(v1::ListReplaysRequest { limit: 0 })
        .await?
        .into_inner();
    assert!(listed.replays.is_empty(), "nothing started: {listed:?}");

    // The active-replay limit, then cancelling the running one.
    let running = client
        .start_replay(start(today, today, "first"))
        .await?
        .into_inner();
    let err = client
        .start_replay(start(today, today, "second"))
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let cancelled = client
        .cancel_replay(v1::CancelReplayRequest {
            replay_id: running.replay_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(
        cancelled.state,
        i32::from(v1::ReplayState::Cancelled),
        "{cancelled:?}"
    );
    assert_eq!(cancelled.commit_number, 0);
    assert!(
        SnapshotStore::new(open_store(&s.store)?)
            .commits()
            .await?
            .is_empty(),
        "a cancelled replay commits nothing"
    );
    let unknown = client
        .get_replay(v1::GetReplayRequest {
            replay_id: "r-nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    Ok(())
}

/// A StartReplay that NATS does not answer (a stalled server, an election) is
/// refused as UNAVAILABLE with the marker that says nothing was started, so the
/// CLI sends it again; once NATS answers, it starts exactly one replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_nats_does_not_answer_is_refused_as_safe_to_send_again() -> anyhow::Result<()> {
    let mut s = stack(1).await?;
    let coordinator = s.coordinator(&[]).await?;
    let mut client = coordinator_client(&coordinator.url()).await?;
    let today = Day::of_micros(now_us());
    let request = v1::StartReplayRequest {
        // Without a cutoff the coordinator asks the stream where it ends.
        cutoff: 0,
        ..start(Day(today.0 - 1), today, "stalled NATS")
    };
    s.h.nats.pause()?;
    let refused = client.start_replay(request.clone()).await;
    s.h.nats.resume()?;
    let status = refused.expect_err("NATS answered nothing, so nothing can have started");
    anyhow::ensure!(
        status.code() == tonic::Code::Unavailable
            && payledger_cli::replay::retryable(payledger_cli::replay::Call::Start, &status)
            && status.message().contains("NATS did not answer")
            && status.message().contains("nothing was started"),
        "{status:?}"
    );
    let listed = client
        .list_replays(v1::ListReplaysRequest::default())
        .await?
        .into_inner();
    anyhow::ensure!(listed.replays.is_empty(), "a refused start left {listed:?}");
    // The Lease may have lapsed while NATS was stalled: sent again as the CLI does.
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = loop {
        match client.start_replay(request.clone()).await {
            Ok(answer) => break answer.into_inner(),
            Err(status)
                if payledger_cli::replay::retryable(
                    payledger_cli::replay::Call::Start,
                    &status,
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Err(status.into()),
        }
    };
    let listed = client
        .list_replays(v1::ListReplaysRequest::default())
        .await?
        .into_inner();
    anyhow::ensure!(
        listed.replays.len() == 1 && listed.replays[0].replay_id == started.replay_id,
        "{listed:?}"
    );
    Ok(())
}

/// A nightly replay starts each partition from the state the previous night's
/// commit wrote and reads only the archive after it; a replay from genesis at the
/// same cutoff gives the same rows and the same state bytes; a state that no
/// longer reads back as its commit recorded is skipped for the one before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_replay_equals_one_from_genesis_and_reads_only_what_came_after()
-> anyhow::Result<()> {
    let mut s = stack(2).await?;
    let coordinator = s.coordinator(&[]).await?;
    let mut client = coordinator_client(&coordinator.url()).await?;
    let snapshots = SnapshotStore::new(open_store(&s.store)?);
    let (from, to) = (s.first_day(), Day::of_micros(now_us()));
    let commit_of = |n: u64| {
        let snapshots = snapshots.clone();
        async move {
            snapshots
                .commits()
                .await?
                .into_iter()
                .find(|c| c.number == n)
                .ok_or_else(|| anyhow::anyhow!("no commit {n}"))
        }
    };

    let first = replay_to_the_end(&mut client, start(from, to, "nightly")).await?;
    let c1 = commit_of(first.commit_number).await?;
    assert_eq!(c1.draft.states.len(), 16, "a state per partition");
    assert!(
        c1.draft.states.iter().all(|l| l.started_from.is_none()),
        "nothing to start from yet"
    );
    assert!(
        c1.draft
            .states
            .iter()
            .all(|l| l.written.cutoff == first.cutoff)
    );

    s.publish_more(31, 4).await?;
    let second = replay_to_the_end(&mut client, start(from, to, "nightly")).await?;
    let c2 = commit_of(second.commit_number).await?;
    for (l1, l2) in c1.draft.states.iter().zip(&c2.draft.states) {
        assert_eq!(
            l2.started_from.as_ref(),
            Some(&l1.written),
            "partition {}",
            l2.partition
        );
    }
    // Only segments after the first cutoff were read.
    assert!(!c2.draft.segments_read.is_empty());
    let first_of = |path: &str| -> u64 {
        let name = path.rsplit('/').next().expect("a name");
        name.split('-')
            .next()
            .expect("a range")
            .parse()
            .expect("a number")
    };
    assert!(
        c2.draft
            .segments_read
            .iter()
            .all(|seg| first_of(&seg.path) > first.cutoff),
        "{:#?}",
        c2.draft.segments_read
    );
    let expected = s.expected_rows(from, to).await?;
    assert_eq!(s.snapshot_rows(&second.snapshot_id).await?, expected);
    assert_reconciled_clean(&second, expected.len());

    // The audit: from genesis at the same cutoff, every segment read again, the
    // same rows and the same state bytes (the same objects, put-if-absent).
    let audit = replay_to_the_end(
        &mut client,
        v1::StartReplayRequest {
            from_genesis: true,
            cutoff: second.cutoff,
            ..start(from, to, "audit")
        },
    )
    .await?;
    let c3 = commit_of(audit.commit_number).await?;
    assert!(c3.draft.states.iter().all(|l| l.started_from.is_none()));
    assert_eq!(
        c3.draft
            .states
            .iter()
            .map(|l| &l.written)
            .collect::<Vec<_>>(),
        c2.draft
            .states
            .iter()
            .map(|l| &l.written)
            .collect::<Vec<_>>(),
        "the same state bytes from genesis as from the previous state"
    );
    assert!(c3.draft.segments_read.len() > c2.draft.segments_read.len());
    assert_eq!(
        c3.draft.segments_read.len(),
        c1.draft.segments_read.len() + c2.draft.segments_read.len()
    );
    assert_eq!(s.snapshot_rows(&audit.snapshot_id).await?, expected);

    // A state changed under its name is skipped for the one before it.
    use object_store::ObjectStoreExt;
    let damaged = &c2.draft.states[0].written;
    open_store(&s.store)?
        .put(
            &object_store::path::Path::from(damaged.path.as_str()),
            object_store::PutPayload::from_static(b"not a state"),
        )
        .await?;
    s.publish_more(37, 2).await?;
    let third = replay_to_the_end(&mut client, start(from, to, "nightly")).await?;
    let c4 = commit_of(third.commit_number).await?;
    assert_eq!(
        c4.draft.states[0].started_from.as_ref(),
        Some(&c1.draft.states[0].written)
    );
    for l in &c4.draft.states[1..] {
        assert_eq!(
            l.started_from.as_ref(),
            Some(&c2.draft.states[l.partition as usize].written)
        );
    }
    let expected = s.expected_rows(from, to).await?;
    assert_eq!(s.snapshot_rows(&third.snapshot_id).await?, expected);
    assert_reconciled_clean(&third, expected.len());
    Ok(())
}

/// Runs the `payledger` CLI to its end (at most `within`), with its output.
async fn run_cli(args: &[&str], within: Duration) -> anyhow::Result<std::process::Output> {
    let child = tokio::process::Command::new(binary("payledger")?)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("payledger {args:?} did not end within {within:?}"))?
        .map_err(Into::into)
}

/// Read-your-writes (docs/operations.md): a replay asked for while the archive is
/// behind the stream waits for it and covers every acknowledged event, so its
/// snapshot equals the stream with no row ahead; `replay start --wait` ends once the
/// query service serves the commit, so `reconcile` right after reports it. The
/// replay spans 801 days, more than one Reconcile call takes, so the CLI's
/// `reconcile` walks it in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_right_after_a_burst_covers_it_and_reads_after_its_wait_see_the_commit()
-> anyhow::Result<()> {
    let mut s = stack(2).await?;
    let coordinator = s.coordinator(&[]).await?;
    // Reads the commit log every 5 s: a reconcile right after the commit would find
    // none but for the CLI's wait.
    let store = s.store.clone();
    let query =
        s.h.spawn(
            "payledger-query",
            &["--store", &store, "--commit-poll-interval", "5s"],
        )
        .await?;
    let mut client = coordinator_client(&coordinator.url()).await?;
    let (last, archived) = s.burst_ahead_of_the_archive(31).await?;

    let today = Day::of_micros(now_us());
    let (from, to) = (Day(today.0 - 800), today);
    let (from_text, to_text) = (from.to_string(), to.to_string());
    let coordinator_url = coordinator.url();
    let query_url = query.url();
    let start_args = [
        "replay",
        "start",
        "--from",
        &from_text,
        "--to",
        &to_text,
        "--reason",
        "right after a burst",
        "--wait",
        "--coordinator-url",
        &coordinator_url,
        "--query-url",
        &query_url,
    ];
    let started = tokio::spawn({
        let args: Vec<String> = start_args.iter().map(ToString::to_string).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_cli(&args, Duration::from_secs(240)).await
        }
    });
    // The replay waits for the archive: running, no cutoff, no shard placed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let listed = client
            .list_replays(v1::ListReplaysRequest { limit: 1 })
            .await?
            .into_inner();
        if let Some(replay) = listed.replays.into_iter().next() {
            break replay;
        }
        anyhow::ensure!(Instant::now() < deadline, "no replay started within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (waiting.state, waiting.cutoff, waiting.awaited_sequence),
        (i32::from(v1::ReplayState::Running), 0, last),
        "{waiting:?}"
    );
    assert_eq!(waiting.archive_watermark, archived);
    assert!(
        waiting
            .shards
            .iter()
            .all(|sh| sh.state == i32::from(v1::ShardState::Pending) && sh.attempts == 0)
    );
    s.ingest.resume()?;

    let output = started.await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "replay start: {:?}\n{stderr}",
        output.status
    );
    assert!(
        stderr.contains(&format!(
            "waiting for the archive to reach sequence {last} (at {archived})"
        )),
        "{stderr}"
    );
    let done = client
        .get_replay(v1::GetReplayRequest {
            replay_id: waiting.replay_id.clone(),
        })
        .await?
        .into_inner();
    succeeded(&done)?;
    assert_eq!(
        done.cutoff, last,
        "the cutoff is the stream's last sequence of the request"
    );
    let summary = done.reconciliation.clone().expect("reconciled");
    assert_eq!(
        (
            summary.rows_stream_ahead,
            summary.rows_divergent,
            summary.rows_missing
        ),
        (0, 0, 0),
        "{summary:?}"
    );
    s.cutoff = last;
    let expected = s.expected_rows(from, to).await?;
    assert_eq!(s.snapshot_rows(&done.snapshot_id).await?, expected);

    // Right after: the query service serves the commit over the whole range, in
    // chunks (one call over it is refused).
    let too_long = query_client(&query_url)
        .await?
        .reconcile(v1::ReconcileRequest {
            from_day: from_text.clone(),
            to_day: to_text.clone(),
            max_differences: 0,
        })
        .await
        .expect_err("longer than one call takes");
    assert_eq!(
        too_long.code(),
        tonic::Code::InvalidArgument,
        "{too_long:?}"
    );
    let output = run_cli(
        &[
            "--json",
            "reconcile",
            "--from",
            &from_text,
            "--to",
            &to_text,
            "--query-url",
            &query_url,
        ],
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        output.status.success(),
        "reconcile: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: v1::ReconcileReport = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report.snapshot_ids, std::slice::from_ref(&done.snapshot_id));
    assert!(
        report.uncovered_days.is_empty(),
        "{:?}",
        report.uncovered_days
    );
    assert_eq!(
        (
            report.rows_equal,
            report.rows_stream_ahead,
            report.rows_divergent,
            report.rows_missing
        ),
        (expected.len() as u64, 0, 0, 0)
    );
    Ok(())
}

/// A replay asked for while the archive stays behind the stream fails once
/// --archive-wait is over, saying what it waited for and what to do, and commits
/// nothing (docs/operations.md, "Read-your-writes").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_the_archive_does_not_catch_up_with_fails_saying_what_to_do() -> anyhow::Result<()>
{
    let mut s = stack(1).await?;
    let coordinator = s.coordinator(&["--archive-wait", "2s"]).await?;
    let mut client = coordinator_client(&coordinator.url()).await?;
    let (last, archived) = s.burst_ahead_of_the_archive(37).await?;
    let today = Day::of_micros(now_us());
    let started = client
        .start_replay(start(Day(today.0 - 1), today, "behind"))
        .await?
        .into_inner();
    assert_eq!((started.cutoff, started.awaited_sequence), (0, last));
    let done = watch_until(&mut client, &started.replay_id, ended).await?;
    s.ingest.resume()?;
    assert_eq!(done.state, i32::from(v1::ReplayState::Failed), "{done:?}");
    for says in [
        format!("did not reach sequence {last}"),
        format!("its highest watermark is {archived}"),
        "PayLedgerArchiveLag".to_string(),
        format!("--cutoff {archived}"),
    ] {
        assert!(done.error.contains(&says), "{says}: {}", done.error);
    }
    assert_eq!(done.commit_number, 0);
    assert!(
        done.shards.iter().all(|sh| sh.attempts == 0),
        "no shard ran: {done:?}"
    );
    assert!(
        SnapshotStore::new(open_store(&s.store)?)
            .commits()
            .await?
            .is_empty(),
        "a replay that never got its cutoff commits nothing"
    );
    Ok(())
}
