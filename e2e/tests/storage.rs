//! One conformance suite for the object-storage layer (docs/storage.md), run
//! against every backend the services open by URL: the local filesystem and S3
//! (a real SeaweedFS, see `payledger_e2e::seaweed`). Each check is a function of a
//! [`Backend`]; `conformance!` makes one test per check and backend, so that a
//! contract holds on both or the failing backend is named.
//!
//! What the stores promise rests on a few properties of the backend: put-if-absent
//! is atomic (one of racing creates wins, the others are told), a write is read
//! back at once, listing a prefix returns exactly the objects under it, a missing
//! object is `NotFound`. The stores' own contracts are checked on top: rewrites
//! match or are refused, listings come back in order, checkpoints keep the newest,
//! states are pruned only when no commit lists them, and the table is the union of
//! the commits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use payledger_e2e::seaweed::SeaweedFs;
use payledger_semantics::{
    Currency, DailyRow, Day, EventKind, Fact, FxRecord, Rate, Record, RecordBody, RecordedStream,
    RiskRecord, StreamSettings,
};
use payledger_storage::{
    ArchiveStore, ArchivedDim, CheckpointStore, CommitDraft, CutRange, DimRecord, SnapshotStore,
    StateRef, StateStore, StorageError, commit_for_day, open_store, open_store_with_env,
};

/// A store of one backend, opened as the services open it, and what keeps it alive.
struct Backend {
    store: Arc<dyn ObjectStore>,
    _dir: Option<tempfile::TempDir>,
    _s3: Option<SeaweedFs>,
}

impl Backend {
    fn local_filesystem() -> anyhow::Result<Backend> {
        let dir = tempfile::tempdir()?;
        let store = open_store(&dir.path().join("store").display().to_string())?;
        Ok(Backend {
            store,
            _dir: Some(dir),
            _s3: None,
        })
    }

    /// Under a prefix of the bucket, as `s3://bucket/prefix` locations are.
    async fn seaweedfs() -> anyhow::Result<Backend> {
        let s3 = SeaweedFs::start().await?;
        let store = open_store_with_env(&s3.s3_url("conformance"), s3.envs())?;
        Ok(Backend {
            store,
            _dir: None,
            _s3: Some(s3),
        })
    }

    fn archive(&self) -> ArchiveStore {
        ArchiveStore::new(
            self.store.clone(),
            RecordedStream::new(StreamSettings::default()),
        )
    }
}

/// One test per check and backend: `local_filesystem::check` and `seaweedfs::check`.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod local_filesystem {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() -> anyhow::Result<()> {
                    super::$check(super::Backend::local_filesystem()?).await
                }
            )*
        }
        mod seaweedfs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() -> anyhow::Result<()> {
                    super::$check(super::Backend::seaweedfs().await?).await
                }
            )*
        }
    };
}

conformance!(
    put_if_absent_keeps_the_first_object,
    racing_creates_have_one_winner,
    a_write_is_read_back_at_once,
    missing_objects_are_not_found,
    listing_a_prefix_returns_exactly_its_objects,
    the_stores_list_in_order_whatever_the_write_order,
    large_objects_round_trip,
    rewrites_must_match_or_are_refused,
    archive_segments_round_trip,
    snapshot_parts_round_trip_sorted_with_exact_decimals,
    checkpoints_keep_the_newest,
    a_first_release_checkpoint_is_found_until_the_version_key_has_its_own,
    states_read_back_only_as_recorded,
    pruning_keeps_every_listed_state_and_those_above,
    racing_commits_take_contiguous_numbers_once_each,
    the_table_is_the_union_of_commits_highest_cutoff_per_day,
    reconciliation_reports_are_replaced,
);

fn create() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    }
}

async fn read(store: &Arc<dyn ObjectStore>, key: &str) -> anyhow::Result<Bytes> {
    Ok(store.get(&Path::from(key)).await?.bytes().await?)
}

async fn listed(store: &Arc<dyn ObjectStore>, prefix: &str) -> anyhow::Result<BTreeSet<String>> {
    let objects: Vec<_> = store.list(Some(&Path::from(prefix))).try_collect().await?;
    Ok(objects.iter().map(|o| o.location.to_string()).collect())
}

fn fact(seq: u64, id: &str, amount: i64, corrects: Option<&str>) -> Record {
    Record {
        seq,
        ingest_time_us: 1_700_000_000_000_000 + seq as i64,
        body: RecordBody::Fact(Fact {
            event_id: id.to_string(),
            merchant_id: "m:1".to_string(),
            kind: if corrects.is_some() {
                EventKind::Correction
            } else {
                EventKind::PaymentCaptured
            },
            amount_minor: amount,
            currency: Currency::parse("EUR").expect("EUR"),
            event_time_us: 1_699_999_000_000_000,
            corrects_event_id: corrects.map(str::to_string),
        }),
    }
}

fn row(merchant: &str, day: i32, currency: &str, closing: i128) -> DailyRow {
    DailyRow {
        merchant_id: merchant.to_string(),
        day: Day(day),
        currency: Currency::parse(currency).expect("currency"),
        closing_minor: closing,
        peak_minor: closing.max(0),
        peak_bucket_start_us: i64::from(day) * 86_400_000_000,
        applied: 3,
        duplicates: 1,
        conflicts: 0,
        late: 1,
        restated: day % 2 == 0,
        log_position: 77,
        semantics_version: 1,
    }
}

fn draft(snapshot: &str, from: i32, to: i32, cutoff: u64) -> CommitDraft {
    CommitDraft {
        snapshot_id: snapshot.to_string(),
        replay_id: format!("replay-{snapshot}"),
        from_day: Day(from),
        to_day: Day(to),
        log_cutoff: cutoff,
        semantics_version: 1,
        version_key: "f".into(),
        partitions: 16,
        parts: Vec::new(),
        segments_read: Vec::new(),
        states: Vec::new(),
    }
}

/// The primitive every store's "written once" rests on.
async fn put_if_absent_keeps_the_first_object(b: Backend) -> anyhow::Result<()> {
    let key = Path::from("once/object.bin");
    b.store
        .put_opts(&key, PutPayload::from_static(b"first"), create())
        .await?;
    let second = b
        .store
        .put_opts(&key, PutPayload::from_static(b"second"), create())
        .await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "second create of {key}: {second:?}"
    );
    assert_eq!(read(&b.store, "once/object.bin").await?.as_ref(), b"first");
    Ok(())
}

/// Creates of one key released at once: exactly one succeeds, every other is told
/// the object exists, and the object holds the winner's body.
async fn racing_creates_have_one_winner(b: Backend) -> anyhow::Result<()> {
    const RACERS: usize = 8;
    let start = Arc::new(tokio::sync::Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for racer in 0..RACERS {
        let (store, start) = (b.store.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let body = PutPayload::from(format!("racer {racer}"));
            let put = store
                .put_opts(&Path::from("race/object.bin"), body, create())
                .await;
            (racer, put)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await? {
            (racer, Ok(_)) => winners.push(racer),
            (_, Err(object_store::Error::AlreadyExists { .. })) => {}
            (racer, Err(e)) => anyhow::bail!("racer {racer}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        read(&b.store, "race/object.bin").await?,
        Bytes::from(format!("racer {}", winners[0]))
    );
    Ok(())
}

async fn a_write_is_read_back_at_once(b: Backend) -> anyhow::Result<()> {
    for i in 0..20 {
        let key = format!("raw/{i:03}.bin");
        let body = Bytes::from(format!("body {i}").repeat(i + 1));
        b.store
            .put(&Path::from(key.as_str()), PutPayload::from(body.clone()))
            .await?;
        assert_eq!(read(&b.store, &key).await?, body, "{key}");
        let meta = b.store.head(&Path::from(key.as_str())).await?;
        assert_eq!(meta.size, body.len() as u64, "{key}");
        assert!(listed(&b.store, "raw").await?.contains(&key), "{key}");
    }
    Ok(())
}

async fn missing_objects_are_not_found(b: Backend) -> anyhow::Result<()> {
    let missing = Path::from("nowhere/object.bin");
    let get = b.store.get(&missing).await;
    assert!(
        matches!(get, Err(object_store::Error::NotFound { .. })),
        "get: {:?}",
        get.map(|_| ())
    );
    let head = b.store.head(&missing).await;
    assert!(
        matches!(head, Err(object_store::Error::NotFound { .. })),
        "head: {head:?}"
    );
    // Listing what does not exist is empty, not an error.
    assert!(listed(&b.store, "nowhere").await?.is_empty());

    // The stores: an empty store has no watermarks, segments, checkpoints, states,
    // commits or reports, and reading a named object that is not there says so.
    let archive = b.archive();
    assert!(archive.watermarks().await?.is_empty());
    assert!(archive.gaps().await?.is_empty());
    assert!(archive.event_segments(0).await?.is_empty());
    assert!(archive.dim_segments().await?.is_empty());
    let cut = CutRange { first: 1, last: 9 };
    let events = archive.read_events(0, cut).await;
    assert!(
        matches!(
            events,
            Err(StorageError::ObjectStore(
                object_store::Error::NotFound { .. }
            ))
        ),
        "{events:?}"
    );
    let checkpoints = CheckpointStore::new(b.store.clone(), 2, "v-test");
    assert!(checkpoints.latest(0).await?.is_none());
    let snapshots = SnapshotStore::new(b.store.clone());
    assert!(snapshots.commits().await?.is_empty());
    assert_eq!(snapshots.reconciliation(1).await?, None);
    let part = snapshots.read_part("no-such-snapshot", 0).await;
    assert!(
        matches!(
            part,
            Err(StorageError::ObjectStore(
                object_store::Error::NotFound { .. }
            ))
        ),
        "{part:?}"
    );
    let states = StateStore::new(b.store.clone());
    assert!(states.cutoffs("k", 0).await?.is_empty());
    let state = states
        .read(&StateRef {
            path: "state/k/p0/00000000000000000009.bin".into(),
            partition: 0,
            cutoff: 9,
            bytes: 1,
            content_hash: "0".repeat(32),
        })
        .await;
    assert!(
        matches!(
            state,
            Err(StorageError::ObjectStore(
                object_store::Error::NotFound { .. }
            ))
        ),
        "{state:?}"
    );
    Ok(())
}

/// A prefix is a path: `list/a` holds `list/a/…`, not `list/ab/…`; the delimited
/// listing names the directories and the objects of one level.
async fn listing_a_prefix_returns_exactly_its_objects(b: Backend) -> anyhow::Result<()> {
    for key in [
        "list/a/2",
        "list/ab/1",
        "list/a/10",
        "list/b",
        "list/a/1",
        "lists/a/1",
    ] {
        b.store
            .put(&Path::from(key), PutPayload::from_static(b"x"))
            .await?;
    }
    let set = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        listed(&b.store, "list/a").await?,
        set(&["list/a/1", "list/a/10", "list/a/2"])
    );
    assert_eq!(
        listed(&b.store, "list").await?,
        set(&["list/a/1", "list/a/10", "list/a/2", "list/ab/1", "list/b"])
    );
    let level = b
        .store
        .list_with_delimiter(Some(&Path::from("list")))
        .await?;
    let prefixes: BTreeSet<String> = level.common_prefixes.iter().map(Path::to_string).collect();
    assert_eq!(prefixes, set(&["list/a", "list/ab"]));
    let objects: BTreeSet<String> = level
        .objects
        .iter()
        .map(|o| o.location.to_string())
        .collect();
    assert_eq!(objects, set(&["list/b"]));
    Ok(())
}

/// The backends list in no promised order; the stores sort what they list.
async fn the_stores_list_in_order_whatever_the_write_order(b: Backend) -> anyhow::Result<()> {
    let archive = b.archive();
    for w in [40, 7, 1000, 40, 123_456_789_012] {
        archive.put_watermark(w).await?;
    }
    assert_eq!(
        archive.watermarks().await?,
        vec![7, 40, 1000, 123_456_789_012]
    );
    for (first, last) in [(501, 900), (1, 10), (11, 500)] {
        archive.put_gap(CutRange { first, last }).await?;
        archive
            .put_events(2, CutRange { first, last }, &[fact(first, "e", 1, None)])
            .await?;
    }
    let cuts = vec![
        CutRange { first: 1, last: 10 },
        CutRange {
            first: 11,
            last: 500,
        },
        CutRange {
            first: 501,
            last: 900,
        },
    ];
    assert_eq!(archive.gaps().await?, cuts);
    assert_eq!(archive.event_segments(2).await?, cuts);
    assert_eq!(
        archive.gap_within(10, 20).await?,
        Some(CutRange {
            first: 11,
            last: 500
        })
    );

    let states = StateStore::new(b.store.clone());
    for cutoff in [300, 20, 1000, 4] {
        states
            .put("k", 1, cutoff, Bytes::from(format!("s{cutoff}")))
            .await?;
    }
    assert_eq!(states.cutoffs("k", 1).await?, vec![4, 20, 300, 1000]);

    let checkpoints = CheckpointStore::new(b.store.clone(), 10, "v-test");
    for seq in [90, 9, 900] {
        checkpoints
            .put(0, seq, Bytes::from(format!("state@{seq}")))
            .await?;
    }
    let latest = checkpoints.latest(0).await?.expect("a checkpoint");
    assert_eq!(
        latest.seq, 900,
        "the highest sequence, not the last written"
    );
    Ok(())
}

/// Bigger than one request body of most clients, written whole and in parts.
async fn large_objects_round_trip(b: Backend) -> anyhow::Result<()> {
    const SIZE: usize = 24 * 1024 * 1024;
    let body: Bytes = (0..SIZE)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    b.store
        .put(
            &Path::from("large/whole.bin"),
            PutPayload::from(body.clone()),
        )
        .await?;
    assert!(read(&b.store, "large/whole.bin").await? == body, "whole");
    let mut upload = WriteMultipart::new_with_chunk_size(
        b.store
            .put_multipart(&Path::from("large/parts.bin"))
            .await?,
        6 * 1024 * 1024,
    );
    upload.write(&body);
    upload.finish().await?;
    assert!(read(&b.store, "large/parts.bin").await? == body, "in parts");
    let range = b
        .store
        .get_range(&Path::from("large/parts.bin"), 10_000_000..10_000_100)
        .await?;
    assert_eq!(range, body.slice(10_000_000..10_000_100));

    // A snapshot part and an archive segment of many rows.
    let rows: Vec<DailyRow> = (0..20_000)
        .map(|i| {
            row(
                &format!("m:{i:05}"),
                20_000 + i % 30,
                "EUR",
                i128::from(i) * 7,
            )
        })
        .collect();
    let snapshots = SnapshotStore::new(b.store.clone());
    let info = snapshots.put_part("large", 0, &rows).await?;
    assert_eq!(info.rows, 20_000);
    let mut sorted = rows.clone();
    sorted.sort_by(|a, b| {
        (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
    });
    assert!(snapshots.read_part("large", 0).await? == sorted);
    let records: Vec<Record> = (1..=20_000)
        .map(|seq| fact(seq, &format!("e{seq}"), seq as i64, None))
        .collect();
    let cut = CutRange {
        first: 1,
        last: 20_000,
    };
    let archive = b.archive();
    archive.put_events(5, cut, &records).await?;
    assert!(archive.read_events(5, cut).await? == records);
    Ok(())
}

/// Every store's objects are named by their content's place: a rewrite with the
/// same content is harmless, with other content it is refused and the first stays.
async fn rewrites_must_match_or_are_refused(b: Backend) -> anyhow::Result<()> {
    let archive = b.archive();
    let cut = CutRange { first: 1, last: 4 };
    let records = vec![fact(1, "a", 100, None), fact(4, "b", 5, None)];
    let first = archive.put_events(0, cut, &records).await?;
    assert_eq!(archive.put_events(0, cut, &records).await?, first);
    let other = vec![fact(1, "a", 101, None), fact(4, "b", 5, None)];
    match archive.put_events(0, cut, &other).await {
        Err(StorageError::Corrupt { message, .. }) => {
            assert!(message.contains("already holds 2 rows"), "{message}")
        }
        other => panic!("expected a refused rewrite, got {other:?}"),
    }
    assert_eq!(archive.read_events(0, cut).await?, records);

    let snapshots = SnapshotStore::new(b.store.clone());
    let rows = vec![row("m:1", 20_000, "EUR", 10), row("m:2", 20_000, "EUR", -5)];
    let written = snapshots.put_part("s1", 3, &rows).await?;
    assert_eq!(snapshots.put_part("s1", 3, &rows).await?, written);
    let other = snapshots
        .put_part("s1", 3, &[row("m:1", 20_000, "EUR", 11)])
        .await;
    assert!(
        matches!(other, Err(StorageError::Corrupt { .. })),
        "rewrite with other rows: {other:?}"
    );
    assert_eq!(snapshots.read_part("s1", 3).await?, rows);

    let states = StateStore::new(b.store.clone());
    let state = states.put("k", 2, 40, Bytes::from_static(b"state")).await?;
    assert_eq!(
        states.put("k", 2, 40, Bytes::from_static(b"state")).await?,
        state
    );
    let other = states.put("k", 2, 40, Bytes::from_static(b"other")).await;
    assert!(
        matches!(other, Err(StorageError::Corrupt { .. })),
        "{other:?}"
    );
    assert_eq!(states.read(&state).await?.as_ref(), b"state");

    // A checkpoint at a sequence already checkpointed keeps the first.
    let checkpoints = CheckpointStore::new(b.store.clone(), 2, "v-test");
    checkpoints.put(5, 100, Bytes::from("state@100")).await?;
    checkpoints.put(5, 100, Bytes::from("other@100")).await?;
    let latest = checkpoints.latest(5).await?.expect("a checkpoint");
    assert_eq!(
        (latest.seq, latest.bytes.as_ref()),
        (100, b"state@100".as_ref())
    );

    // Markers: a watermark or gap written again is one object.
    archive.put_watermark(4).await?;
    archive.put_watermark(4).await?;
    archive.put_gap(cut).await?;
    archive.put_gap(cut).await?;
    assert_eq!(archive.watermarks().await?, vec![4]);
    assert_eq!(archive.gaps().await?, vec![cut]);
    Ok(())
}

async fn archive_segments_round_trip(b: Backend) -> anyhow::Result<()> {
    let archive = b.archive();
    let cut = CutRange { first: 1, last: 10 };
    let records = vec![
        fact(2, "a", 100, None),
        Record {
            seq: 5,
            ingest_time_us: 1_700_000_000_000_005,
            body: RecordBody::Heartbeat,
        },
        fact(9, "b", -40, Some("a")),
    ];
    let info = archive.put_events(3, cut, &records).await?;
    assert_eq!(info.rows, 3);
    assert_eq!(
        info.path,
        "archive/events/p3/00000000000000000001-00000000000000000010.parquet"
    );
    assert_eq!(archive.read_events(3, cut).await?, records);
    assert_eq!(archive.event_segments(3).await?, vec![cut]);
    assert!(archive.event_segments(4).await?.is_empty());

    let dims_cut = CutRange {
        first: 11,
        last: 20,
    };
    let dims = vec![
        ArchivedDim {
            seq: 12,
            ingest_time_us: 7,
            record: DimRecord::Fx(FxRecord {
                currency: Currency::parse("JPY").expect("JPY"),
                rate: Rate::parse("0.006712").expect("rate"),
                effective_day: Day(19_700),
                version: 2,
            }),
        },
        ArchivedDim {
            seq: 15,
            ingest_time_us: 8,
            record: DimRecord::Risk(RiskRecord {
                merchant_id: "m:1".into(),
                tier: "high".into(),
                reserve_bps: 2500,
                effective_day: Day(19_701),
                version: 1,
            }),
        },
    ];
    archive.put_dims(dims_cut, &dims).await?;
    assert_eq!(archive.read_dims(dims_cut).await?, dims);
    assert_eq!(archive.dim_segments().await?, vec![dims_cut]);

    // The watermark's object carries the time the backend wrote it.
    archive.put_watermark(20).await?;
    let written = archive.watermark_written(20).await?;
    let age = std::time::SystemTime::now()
        .duration_since(written)
        .unwrap_or_default();
    assert!(age.as_secs() < 3600, "written {age:?} ago");
    Ok(())
}

async fn snapshot_parts_round_trip_sorted_with_exact_decimals(b: Backend) -> anyhow::Result<()> {
    let snapshots = SnapshotStore::new(b.store.clone());
    // Beyond i64: DECIMAL(38,0) keeps it exact.
    let big = 10_i128.pow(30) + 7;
    let rows = vec![
        row("m:2", 20_000, "EUR", -5),
        row("m:1", 20_001, "USD", big),
        row("m:1", 20_000, "USD", 10),
        row("m:1", 20_000, "EUR", -big),
    ];
    let info = snapshots.put_part("s1", 4, &rows).await?;
    assert_eq!(
        info.path,
        "tables/merchant_exposure_daily/snapshots/s1/p4.parquet"
    );
    let mut sorted = rows.clone();
    sorted.sort_by(|a, b| {
        (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
    });
    assert_eq!(snapshots.read_part("s1", 4).await?, sorted);
    Ok(())
}

async fn checkpoints_keep_the_newest(b: Backend) -> anyhow::Result<()> {
    let checkpoints = CheckpointStore::new(b.store.clone(), 2, "v1-test");
    assert!(checkpoints.latest(3).await?.is_none());
    for seq in [5, 17, 120] {
        checkpoints
            .put(3, seq, Bytes::from(format!("state@{seq}")))
            .await?;
    }
    let latest = checkpoints.latest(3).await?.expect("a checkpoint");
    assert_eq!(
        (latest.seq, latest.bytes.as_ref()),
        (120, b"state@120".as_ref())
    );
    assert_eq!(
        latest.path,
        "checkpoints/v1-test/p3/00000000000000000120.bin"
    );
    // Two kept, the oldest pruned once the third landed.
    assert_eq!(
        listed(&b.store, "checkpoints/v1-test/p3").await?,
        [17, 120]
            .map(|seq| format!("checkpoints/v1-test/p3/{seq:020}.bin"))
            .into_iter()
            .collect()
    );
    assert!(checkpoints.latest(4).await?.is_none());
    // Another version key's checkpoints are its own.
    let other = CheckpointStore::new(b.store.clone(), 2, "v2-test");
    assert!(other.latest(3).await?.is_none());
    Ok(())
}

async fn a_first_release_checkpoint_is_found_until_the_version_key_has_its_own(
    b: Backend,
) -> anyhow::Result<()> {
    b.store
        .put(
            &Path::from("checkpoints/projector/p1/00000000000000000009.bin"),
            PutPayload::from_static(b"old"),
        )
        .await?;
    let checkpoints = CheckpointStore::new(b.store.clone(), 2, "v1-test");
    let found = checkpoints.latest(1).await?.expect("the old checkpoint");
    assert_eq!((found.seq, found.bytes.as_ref()), (9, b"old".as_ref()));
    assert_eq!(
        found.path,
        "checkpoints/projector/p1/00000000000000000009.bin"
    );
    checkpoints.put(1, 5, Bytes::from_static(b"new")).await?;
    let found = checkpoints.latest(1).await?.expect("the new checkpoint");
    assert_eq!((found.seq, found.bytes.as_ref()), (5, b"new".as_ref()));
    Ok(())
}

async fn states_read_back_only_as_recorded(b: Backend) -> anyhow::Result<()> {
    let states = StateStore::new(b.store.clone());
    let written = states
        .put("v9-k", 2, 40, Bytes::from_static(b"state at 40"))
        .await?;
    assert_eq!(written.path, "state/v9-k/p2/00000000000000000040.bin");
    assert_eq!(states.read(&written).await?.as_ref(), b"state at 40");
    // A state changed under its name is refused on read.
    b.store
        .put(
            &Path::from(written.path.as_str()),
            PutPayload::from_static(b"state at 41"),
        )
        .await?;
    let err = states.read(&written).await.unwrap_err().to_string();
    assert!(err.contains("the commit recorded"), "{err}");
    Ok(())
}

async fn pruning_keeps_every_listed_state_and_those_above(b: Backend) -> anyhow::Result<()> {
    let states = StateStore::new(b.store.clone());
    for cutoff in [10, 20, 30, 40] {
        states
            .put("k", 0, cutoff, Bytes::from(format!("s{cutoff}")))
            .await?;
    }
    states.put("other", 0, 10, Bytes::from("s10")).await?;
    assert_eq!(states.prune_unlisted("k", 0, &[20], 40).await?, 2);
    assert_eq!(states.cutoffs("k", 0).await?, vec![20, 40]);
    assert_eq!(states.cutoffs("other", 0).await?, vec![10]);
    // Pruning again finds nothing more.
    assert_eq!(states.prune_unlisted("k", 0, &[20], 40).await?, 0);
    Ok(())
}

/// Every draft submitted twice at once (a replay and its retry after a lost
/// response, say): each is committed once, the numbers are 1..=n without a hole,
/// both submitters are told the same commit, and a later retry writes nothing.
async fn racing_commits_take_contiguous_numbers_once_each(b: Backend) -> anyhow::Result<()> {
    const DRAFTS: usize = 6;
    const TASKS_PER_DRAFT: usize = 2;
    let snapshots = SnapshotStore::new(b.store.clone());
    let start = Arc::new(tokio::sync::Barrier::new(DRAFTS * TASKS_PER_DRAFT));
    let mut tasks = Vec::new();
    for d in 0..DRAFTS {
        for _ in 0..TASKS_PER_DRAFT {
            let (snapshots, start) = (snapshots.clone(), start.clone());
            let draft = draft(&format!("snapshot-{d}"), 20_000, 20_010, 1000);
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                snapshots.commit(draft).await
            }));
        }
    }
    let mut answered: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for task in tasks {
        let commit = task.await??;
        answered
            .entry(commit.draft.snapshot_id.clone())
            .or_default()
            .insert(commit.number);
    }
    assert_eq!(answered.len(), DRAFTS, "{answered:?}");
    for (snapshot, numbers) in &answered {
        assert_eq!(
            numbers.len(),
            1,
            "{snapshot} answered as commits {numbers:?}"
        );
    }
    let commits = snapshots.commits().await?;
    let numbers: Vec<u64> = commits.iter().map(|c| c.number).collect();
    assert_eq!(numbers, (1..=DRAFTS as u64).collect::<Vec<_>>());
    let committed: BTreeMap<String, BTreeSet<u64>> =
        commits.iter().fold(BTreeMap::new(), |mut by_snapshot, c| {
            by_snapshot
                .entry(c.draft.snapshot_id.clone())
                .or_default()
                .insert(c.number);
            by_snapshot
        });
    assert_eq!(committed, answered);

    let first = commits[0].clone();
    assert_eq!(snapshots.commit(first.draft.clone()).await?, first);
    let next = snapshots
        .commit(draft("snapshot-late", 20_000, 20_010, 1000))
        .await?;
    assert_eq!(next.number, DRAFTS as u64 + 1);
    assert_eq!(snapshots.commits().await?.len(), DRAFTS + 1);
    Ok(())
}

async fn the_table_is_the_union_of_commits_highest_cutoff_per_day(
    b: Backend,
) -> anyhow::Result<()> {
    let snapshots = SnapshotStore::new(b.store.clone());
    let full = snapshots.commit(draft("full", 0, 29, 500)).await?;
    // The nightly replay of one day, later in the log, wins that day only.
    let nightly = snapshots.commit(draft("nightly", 29, 29, 900)).await?;
    // An older cutoff committed later does not win.
    let stale = snapshots.commit(draft("stale", 10, 10, 100)).await?;
    let commits = snapshots.commits().await?;
    assert_eq!(commit_for_day(&commits, Day(29)), Some(&nightly));
    assert_eq!(commit_for_day(&commits, Day(28)), Some(&full));
    assert_eq!(commit_for_day(&commits, Day(10)), Some(&full));
    assert_eq!(commit_for_day(&commits, Day(30)), None);
    // Equal cutoffs: the higher commit number wins.
    let again = snapshots.commit(draft("again", 10, 10, 500)).await?;
    let commits = snapshots.commits().await?;
    assert_eq!(commit_for_day(&commits, Day(10)), Some(&again));
    assert_ne!(stale.number, again.number);
    Ok(())
}

async fn reconciliation_reports_are_replaced(b: Backend) -> anyhow::Result<()> {
    let snapshots = SnapshotStore::new(b.store.clone());
    let first = snapshots
        .put_reconciliation(3, b"{\"a\":1}".to_vec())
        .await?;
    let second = snapshots
        .put_reconciliation(3, b"{\"a\":2}".to_vec())
        .await?;
    assert_eq!(first, second);
    assert_eq!(
        snapshots.reconciliation(3).await?.as_deref(),
        Some(b"{\"a\":2}".as_ref())
    );
    assert_eq!(snapshots.reconciliation(4).await?, None);
    Ok(())
}
