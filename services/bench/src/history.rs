//! `payledger bench` history section: what committed replay states save once the
//! history is much longer than the dedup horizon.
//!
//! A generated history of many days is archived straight to Parquet with a cut
//! closing at every midnight (UTC, ingest time), so each day ends at a watermark as
//! a nightly replay's cutoff does. Then, in this process:
//!
//! * the previous night's replay commits the states at the end of day N-1;
//! * one partition is bootstrapped as a stream projector without a checkpoint does,
//!   from that committed state and, as the baseline, from nothing;
//! * the nightly replay of day N starts from those states, beside a replay of the
//!   same cutoff from the beginning of history, each committing into tables of its
//!   own, alternately, three times; both must write the same parts and states;
//! * the same steps once more, called one by one, say where each replay's time goes;
//! * states of known shape are encoded to price a merchant-day and an identity.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use payledger_projector::replay::{
    ReplayRequest, ReplayStores, fold_segments, replay_and_commit, starting_state,
};
use payledger_semantics::{
    Currency, Day, EventKind, Fact, MICROS_PER_DAY, PartitionState, Record, RecordBody,
    RecordedStream, Settings,
};
use payledger_storage::{Commit, SnapshotStore, StateStore, open_store, verify_tiling};

use crate::BenchReport;
use crate::replay::{HistoryPlan, write_history_as};

#[derive(clap::Args, Debug, Clone)]
pub struct HistoryBenchArgs {
    /// Events of the generated history of the history section (resends included).
    #[arg(long, default_value_t = 1_500_000)]
    pub history_events: usize,
    /// Days that history spans, ending at the last midnight UTC (at least 2).
    #[arg(long, default_value_t = 90)]
    pub history_days: u32,
    /// Merchants trading in that history.
    #[arg(long, default_value_t = 20_000)]
    pub history_merchants: usize,
}

/// Events generated at one ingest time: fine enough that ingest times, and with
/// them event times and buckets, spread over each day.
const BATCH: usize = 100;

/// Nightly and from-genesis replays timed, alternately.
const RUNS: usize = 3;

fn median(times: &mut [f64]) -> f64 {
    times.sort_unstable_by(f64::total_cmp);
    times[times.len() / 2]
}

fn range(times: &[f64]) -> String {
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.2}–{max:.2}")
}

/// Copies the directory tree `from` into `to` (created if missing).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Size on disk of the objects `paths` of the local store at `root`.
fn stored_bytes<'a>(root: &Path, paths: impl IntoIterator<Item = &'a str>) -> anyhow::Result<u64> {
    let mut total = 0;
    for path in paths {
        total += std::fs::metadata(root.join(path))
            .with_context(|| format!("{path} in {}", root.display()))?
            .len();
    }
    Ok(total)
}

/// What a replay read and wrote, from its commit.
struct Traffic {
    segments: usize,
    archive_bytes: u64,
    records: u64,
    state_bytes_read: u64,
    state_bytes_written: u64,
}

fn traffic(commit: &Commit, root: &Path) -> anyhow::Result<Traffic> {
    let draft = &commit.draft;
    Ok(Traffic {
        segments: draft.segments_read.len(),
        archive_bytes: stored_bytes(root, draft.segments_read.iter().map(|s| s.path.as_str()))?,
        records: draft.segments_read.iter().map(|s| s.rows).sum(),
        state_bytes_read: draft
            .states
            .iter()
            .filter_map(|l| l.started_from.as_ref())
            .map(|s| s.bytes)
            .sum(),
        state_bytes_written: draft.states.iter().map(|l| l.written.bytes).sum(),
    })
}

/// Seconds spent in each step of a replay, summed over the partitions.
#[derive(Default)]
struct Split {
    start: f64,
    read: f64,
    fold: f64,
    rows: f64,
    part: f64,
    encode: f64,
    state: f64,
    /// Daily rows the states at the cutoff hold (their open days).
    state_rows: usize,
}

impl Split {
    fn total(&self) -> f64 {
        self.start + self.read + self.fold + self.rows + self.part + self.encode + self.state
    }
}

/// The steps of `run_shard` one by one, every partition in turn, reading the
/// committed states of `stores` and writing to `scratch`.
async fn split(
    stores: &ReplayStores,
    scratch: &ReplayStores,
    settings: Settings,
    cutoff: u64,
    day: Day,
    from_genesis: bool,
) -> anyhow::Result<Split> {
    let mut split = Split::default();
    let version_key = settings.version_key();
    for p in 0..settings.partitions {
        let t = Instant::now();
        let start = if from_genesis {
            None
        } else {
            starting_state(stores, &settings, p, cutoff, Some(day)).await?
        };
        let after = start.as_ref().map_or(0, |(s, _)| s.cutoff);
        let mut state = start.map_or_else(|| PartitionState::new(p, settings), |(_, s)| s);
        split.start += t.elapsed().as_secs_f64();
        let segments = stores.archive.event_segments(p).await?;
        for cut in segments
            .into_iter()
            .filter(|s| s.first > after && s.last <= cutoff)
        {
            let t = Instant::now();
            let records = stores.archive.read_events(p, cut).await?;
            split.read += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for r in &records {
                state.apply(r)?;
            }
            split.fold += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let rows = state.daily_rows_between(day, day);
        split.rows += t.elapsed().as_secs_f64();
        split.state_rows += state.daily_rows().len();
        let t = Instant::now();
        scratch.snapshots.put_part("split", p, &rows).await?;
        split.part += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let bytes = state.encode();
        split.encode += t.elapsed().as_secs_f64();
        let t = Instant::now();
        scratch
            .states
            .put(&version_key, p, cutoff, bytes.into())
            .await?;
        split.state += t.elapsed().as_secs_f64();
    }
    Ok(split)
}

/// One bootstrap of `partition` with no checkpoint, the log holding nothing the
/// archive has: start from the newest committed replay state (or from nothing)
/// and read what `bootstrap::catch_up` reads, every segment after the state's
/// cutoff, through the highest watermark. Returns the time, the
/// segments and records read, and the state.
async fn bootstrap(
    stores: &ReplayStores,
    settings: Settings,
    partition: u32,
    from_replay_state: bool,
) -> anyhow::Result<(Duration, usize, u64, PartitionState)> {
    let started = Instant::now();
    let (covered, state) = if from_replay_state {
        let (from, state) = starting_state(stores, &settings, partition, u64::MAX, None)
            .await?
            .context("the previous night committed a state")?;
        (from.cutoff, state)
    } else {
        (0, PartitionState::new(partition, settings))
    };
    let watermarks = stores.archive.watermarks().await?;
    let watermark = watermarks.last().copied().unwrap_or(0);
    let segments = stores.archive.event_segments(partition).await?;
    verify_tiling(&segments, &watermarks, watermark)
        .map_err(|e| anyhow::anyhow!("the archive of partition {partition} is not whole: {e}"))?;
    let due: Vec<_> = segments
        .into_iter()
        .filter(|s| s.last > covered && s.last <= watermark)
        .collect();
    let mut records = 0;
    let (state, read) = fold_segments(&stores.archive, state, &due, |n| records += n).await?;
    Ok((started.elapsed(), read.len(), records, state))
}

/// Median time of three bootstraps, the segments and records read, the state.
async fn bootstrap_median(
    stores: &ReplayStores,
    settings: Settings,
    partition: u32,
    from_replay_state: bool,
) -> anyhow::Result<(Duration, usize, u64, PartitionState)> {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let (time, segments, records, state) =
            bootstrap(stores, settings, partition, from_replay_state).await?;
        times.push(time);
        last = Some((segments, records, state));
    }
    times.sort_unstable();
    let (segments, records, state) = last.expect("three runs");
    Ok((times[1], segments, records, state))
}

/// The encoded size and remembered identities of one partition's state after
/// `per_day` events on each of `days` days for each of `merchants` merchants in
/// each of `currencies` currencies, all of a merchant-day-currency in one bucket.
fn shape_bytes(
    merchants: usize,
    days: i32,
    currencies: usize,
    per_day: usize,
) -> anyhow::Result<(usize, usize)> {
    let settings = Settings {
        partitions: 1,
        ..Settings::default()
    };
    let codes = ["USD", "EUR", "GBP", "JPY"];
    anyhow::ensure!(
        currencies <= codes.len(),
        "at most {} currencies",
        codes.len()
    );
    // Every identity of the shape must still be remembered at its end.
    anyhow::ensure!(
        i64::from(days) * MICROS_PER_DAY <= settings.dedup_horizon_us,
        "{days} days pass the dedup horizon"
    );
    let first = Day::from_ymd(2026, 1, 1).context("a date")?;
    let mut state = PartitionState::new(0, settings);
    let mut seq = 0;
    for d in 0..days {
        let noon = Day(first.0 + d).start_us() + MICROS_PER_DAY / 2;
        for m in 0..merchants {
            for (c, code) in codes.iter().take(currencies).enumerate() {
                for j in 0..per_day {
                    seq += 1;
                    state.apply(&Record {
                        seq,
                        ingest_time_us: noon + 1_000_000,
                        body: RecordBody::Fact(Fact {
                            event_id: format!("ev-{m}-{d}-{c}-{j}"),
                            merchant_id: format!("m-{m:05}"),
                            kind: EventKind::PaymentCaptured,
                            amount_minor: 1_000,
                            currency: Currency::parse(code)?,
                            event_time_us: noon,
                            corrects_event_id: None,
                        }),
                    })?;
                }
            }
        }
    }
    Ok((state.encode().len(), state.identities_remembered()))
}

/// Runs the section and appends it to `report`.
pub async fn run(report: &mut BenchReport, args: &HistoryBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.history_days >= 2,
        "--history-days must be at least 2: the nightly replay starts from the night before"
    );
    let settings = Settings::default();
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("store");
    let store = root.display().to_string();
    let (events, days) = (args.history_events, args.history_days);
    eprintln!("history: archiving {events} generated events over {days} days…");
    let midnight = Day::of_micros(crate::now_us()).start_us();
    let started = Instant::now();
    let history = write_history_as(
        &store,
        &HistoryPlan {
            events,
            merchants: args.history_merchants,
            start_us: midnight - i64::from(days) * MICROS_PER_DAY,
            days,
            batch: BATCH,
            cut_at_midnight: true,
        },
    )
    .await?;
    let archived = started.elapsed().as_secs_f64();
    let [.., (previous_day, previous_cutoff), (day, cutoff)] = history.day_ends[..] else {
        anyhow::bail!("the history has fewer than two days");
    };
    anyhow::ensure!(
        previous_day.0 + 1 == day.0,
        "no events were ingested on the day before {day}"
    );
    let archive =
        ReplayStores::at(open_store(&store)?, RecordedStream::new(settings.stream())).archive;
    // Each replay commits into tables and states of its own over the one archive,
    // so that none finds another's states.
    let beside = |name: &str| -> anyhow::Result<ReplayStores> {
        let objects = open_store(&dir.path().join(name).display().to_string())?;
        Ok(ReplayStores {
            archive: archive.clone(),
            snapshots: SnapshotStore::new(objects.clone()),
            states: StateStore::new(objects),
        })
    };

    eprintln!("history: the previous night's replay of {previous_day}…");
    let previous = beside("previous")?;
    let started = Instant::now();
    replay_and_commit(
        &previous,
        settings,
        &ReplayRequest {
            replay_id: "previous-night".into(),
            from_day: previous_day,
            to_day: previous_day,
            cutoff: Some(previous_cutoff),
            from_genesis: false,
        },
        |_| {},
    )
    .await?;
    let previous_night = started.elapsed().as_secs_f64();

    eprintln!("history: bootstrap of partition 0…");
    let (boot_state, boot_state_segments, boot_state_records, from_state) =
        bootstrap_median(&previous, settings, 0, true).await?;
    let (boot_genesis, boot_genesis_segments, boot_genesis_records, from_nothing) =
        bootstrap_median(&previous, settings, 0, false).await?;
    anyhow::ensure!(
        from_state.encode() == from_nothing.encode(),
        "a bootstrap from the replay state ended in another state than one from nothing"
    );
    drop((from_state, from_nothing));

    let request = |replay_id: &str, from_genesis| ReplayRequest {
        replay_id: replay_id.into(),
        from_day: day,
        to_day: day,
        cutoff: Some(cutoff),
        from_genesis,
    };
    let same = |c: &Commit| {
        (
            c.draft
                .parts
                .iter()
                .map(|p| (p.rows, p.content_hash.clone()))
                .collect::<Vec<_>>(),
            c.draft
                .states
                .iter()
                .map(|l| l.written.content_hash.clone())
                .collect::<Vec<_>>(),
        )
    };
    let (mut nightly_times, mut genesis_times) = (Vec::new(), Vec::new());
    let mut commits = None;
    for run in 0..RUNS {
        eprintln!(
            "history: the nightly replay of {day}, from the previous night's states and from the beginning of history ({}/{RUNS})…",
            run + 1
        );
        let name = format!("nightly-{run}");
        copy_dir(&dir.path().join("previous"), &dir.path().join(&name))?;
        let nightly_stores = beside(&name)?;
        let genesis_stores = beside(&format!("genesis-{run}"))?;
        let mut nightly = None;
        let mut genesis = None;
        // Alternated, so that neither side always runs on what the other left warm.
        for from_genesis in [run % 2 == 1, run % 2 == 0] {
            let (stores, into, times) = if from_genesis {
                (&genesis_stores, &mut genesis, &mut genesis_times)
            } else {
                (&nightly_stores, &mut nightly, &mut nightly_times)
            };
            let started = Instant::now();
            let commit = replay_and_commit(
                stores,
                settings,
                &request(
                    if from_genesis { "genesis" } else { "nightly" },
                    from_genesis,
                ),
                |_| {},
            )
            .await?;
            times.push(started.elapsed().as_secs_f64());
            *into = Some(commit);
        }
        let (nightly, genesis) = (nightly.expect("ran"), genesis.expect("ran"));
        anyhow::ensure!(
            same(&nightly) == same(&genesis),
            "the replay from the previous night's states wrote other parts or states than the one from genesis"
        );
        anyhow::ensure!(
            nightly
                .draft
                .states
                .iter()
                .all(|l| l.started_from.is_some()),
            "a partition of the nightly replay did not start from the previous night's state"
        );
        commits = Some((nightly, genesis));
    }
    let (nightly, genesis) = commits.expect("at least one run");
    let (ours, base) = (traffic(&nightly, &root)?, traffic(&genesis, &root)?);
    let (nightly_s, genesis_s) = (median(&mut nightly_times), median(&mut genesis_times));

    eprintln!("history: where the time goes…");
    let split_nightly = split(
        &previous,
        &beside("split-nightly")?,
        settings,
        cutoff,
        day,
        false,
    )
    .await?;
    let split_genesis = split(
        &previous,
        &beside("split-genesis")?,
        settings,
        cutoff,
        day,
        true,
    )
    .await?;

    eprintln!("history: state bytes of known shapes…");
    let (merchants, currencies) = (2_000usize, 2usize);
    let (one, one_ids) = shape_bytes(merchants, 30, currencies, 1)?;
    let (three, three_ids) = shape_bytes(merchants, 30, currencies, 3)?;
    let (half, half_ids) = shape_bytes(merchants, 15, currencies, 1)?;
    let per_identity = (three - one) as f64 / (three_ids - one_ids) as f64;
    let merchant_days = (merchants * 15) as f64;
    let per_merchant_day =
        ((one - half) as f64 - (one_ids - half_ids) as f64 * per_identity) / merchant_days;

    report.text(format!("\n## History longer than the horizon\n\n{events} generated events over {days} days ({} records with duplicates, conflicts, corrections and late events up to 20 h; {} merchants, 16 partitions, H = 35 days), archived with a cut closing at every midnight UTC of ingest time ({archived:.1} s to generate and write). Day N = {day}, closed by watermark {cutoff}; day N-1 by {previous_cutoff}. The previous night's replay (day N-1, the first, so from the beginning of history) took {previous_night:.2} s and committed the states at {previous_cutoff}. Replays in this process (`replay_and_commit`: every partition folded, its part and its state written, the commit published), one partition at a time.\n", history.last_seq, args.history_merchants));
    report.table([
        format!("nightly replay of day N through {cutoff}"),
        String::from("from the previous night's states"),
        String::from("from the beginning of history"),
        String::from("ratio"),
        String::from("target"),
    ]);
    report.row([
        format!("wall time s, median of {RUNS} (range)"),
        format!("{nightly_s:.2} ({})", range(&nightly_times)),
        format!("{genesis_s:.2} ({})", range(&genesis_times)),
        format!("{:.3}", nightly_s / genesis_s),
        String::from("≤ 0.10"),
    ]);
    let row = |report: &mut BenchReport, what: &str, a: u64, b: u64| {
        let ratio = if b == 0 {
            String::new()
        } else {
            format!("{:.3}", a as f64 / b as f64)
        };
        report.row([
            what.to_string(),
            format!("{a}"),
            format!("{b}"),
            ratio,
            String::new(),
        ]);
    };
    row(
        report,
        "archive segments read",
        ours.segments as u64,
        base.segments as u64,
    );
    row(
        report,
        "archive bytes read",
        ours.archive_bytes,
        base.archive_bytes,
    );
    row(report, "archive records read", ours.records, base.records);
    row(
        report,
        "state bytes read (16 partitions)",
        ours.state_bytes_read,
        base.state_bytes_read,
    );
    row(
        report,
        "state bytes written (16 partitions)",
        ours.state_bytes_written,
        base.state_bytes_written,
    );
    report.text(format!("\nBoth wrote the same parts and the same states (row counts and content hashes compared). The states at the cutoff hold {} daily rows in memory (the open merchant-day-currencies; final days are only a carried balance, docs/semantics.md R11): {:.1} state bytes per such row, identities included.\n", split_nightly.state_rows, ours.state_bytes_written as f64 / split_nightly.state_rows.max(1) as f64));
    report.text("Where the time goes: the same steps called one by one, partitions in turn, on one thread, s:\n");
    report.table([
        String::from("step"),
        String::from("from the states"),
        String::from("from genesis"),
    ]);
    for (what, a, b) in [
        (
            "start: list the commits, read and decode the state",
            split_nightly.start,
            split_genesis.start,
        ),
        (
            "read and decode the archive segments",
            split_nightly.read,
            split_genesis.read,
        ),
        ("fold", split_nightly.fold, split_genesis.fold),
        (
            "build the day's rows",
            split_nightly.rows,
            split_genesis.rows,
        ),
        ("write the part", split_nightly.part, split_genesis.part),
        (
            "encode the state",
            split_nightly.encode,
            split_genesis.encode,
        ),
        ("write the state", split_nightly.state, split_genesis.state),
        ("total", split_nightly.total(), split_genesis.total()),
    ] {
        report.row([what.to_string(), format!("{a:.3}"), format!("{b:.3}")]);
    }
    report.text(String::new());
    report.table([format!("bootstrap of partition 0 through {cutoff}, no checkpoint, the log holding nothing the archive has"), format!("from the committed replay state at {previous_cutoff}"), String::from("from nothing"), String::from("ratio")]);
    report.row([
        String::from("time ms (median of 3)"),
        format!("{:.1}", boot_state.as_secs_f64() * 1e3),
        format!("{:.1}", boot_genesis.as_secs_f64() * 1e3),
        format!(
            "{:.3}",
            boot_state.as_secs_f64() / boot_genesis.as_secs_f64()
        ),
    ]);
    report.row([
        String::from("archive segments read"),
        format!("{boot_state_segments}"),
        format!("{boot_genesis_segments}"),
        format!(
            "{:.3}",
            boot_state_segments as f64 / boot_genesis_segments.max(1) as f64
        ),
    ]);
    report.row([
        String::from("archive records read"),
        format!("{boot_state_records}"),
        format!("{boot_genesis_records}"),
        format!(
            "{:.3}",
            boot_state_records as f64 / boot_genesis_records.max(1) as f64
        ),
    ]);
    report.text("\nBoth bootstraps ended in the same state (encodings compared).\n");
    report.table([
        String::from("encoded state"),
        String::from("bytes"),
        String::from("baseline"),
        String::from("ratio"),
    ]);
    report.row([format!("per remembered identity ({merchants} merchants × 30 days × {currencies} currencies, 3 events a merchant-day-currency against 1: {} identities more, {three} − {one} bytes)", three_ids - one_ids), format!("{per_identity:.1}"), String::from("32 (the entry's fixed width: id hash, content hash, event time)"), format!("{:.2}", per_identity / 32.0)]);
    report.row([format!("per merchant-day ({currencies} currencies, one bucket each; {merchants} merchants × 30 days against × 15, {one} − {half} bytes, less the identities)"), format!("{per_merchant_day:.1} ({:.1} per currency)", per_merchant_day / currencies as f64), String::new(), String::new()]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_history_replays_the_same_from_the_previous_night_as_from_genesis() {
        let mut report = BenchReport::default();
        run(
            &mut report,
            &HistoryBenchArgs {
                history_events: 20_000,
                history_days: 3,
                history_merchants: 200,
            },
        )
        .await
        .unwrap();
        let report = report.markdown();
        // Each day is one cut of 16 partitions; the nightly replay reads only the last.
        assert!(
            report.contains("| archive segments read | 16 | 48 |"),
            "{report}"
        );
        // The bootstrap from nothing reads every day of partition 0.
        let bootstrap = report
            .lines()
            .filter(|l| l.starts_with("| archive segments read |"))
            .nth(1)
            .expect("the bootstrap's row");
        assert_eq!(
            bootstrap.split('|').nth(3).map(str::trim),
            Some("3"),
            "{report}"
        );
    }
}
