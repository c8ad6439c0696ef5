//! The object-store layer against a real S3-compatible server (SeaweedFS, see
//! `payledger_e2e::seaweed`), opened by URL the way the services open it.
//!
//! Everything the commit log and the archive promise rests on put-if-absent being
//! atomic on the server: these tests race it, then run the convergence scenario with
//! the archive, the tables and the checkpoints all on S3.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use payledger_e2e::Archive;
use payledger_e2e::convergence::replay_of_the_archive_equals_the_stream_rows;
use payledger_e2e::seaweed::SeaweedFs;
use payledger_semantics::{Currency, DailyRow, Day};
use payledger_storage::{
    CheckpointStore, CommitDraft, SnapshotStore, StorageError, open_store_with_env,
};

fn open(s3: &SeaweedFs, prefix: &str) -> anyhow::Result<Arc<dyn ObjectStore>> {
    Ok(open_store_with_env(&s3.s3_url(prefix), s3.envs())?)
}

fn draft(snapshot: &str) -> CommitDraft {
    CommitDraft {
        snapshot_id: snapshot.to_string(),
        replay_id: format!("replay-{snapshot}"),
        from_day: Day(20_000),
        to_day: Day(20_010),
        log_cutoff: 1000,
        semantics_version: 1,
        version_key: "f".into(),
        partitions: 16,
        parts: Vec::new(),
        segments_read: Vec::new(),
        states: Vec::new(),
    }
}

fn row(merchant: &str, closing: i128) -> DailyRow {
    DailyRow {
        merchant_id: merchant.to_string(),
        day: Day(20_000),
        currency: Currency::parse("EUR").unwrap(),
        closing_minor: closing,
        peak_minor: closing.max(0),
        peak_bucket_start_us: 20_000 * 86_400_000_000,
        applied: 1,
        duplicates: 0,
        conflicts: 0,
        late: 0,
        restated: false,
        log_position: 7,
        semantics_version: 1,
    }
}

fn create() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_if_absent_keeps_the_first_object() -> anyhow::Result<()> {
    let s3 = SeaweedFs::start().await?;
    let store = open(&s3, "put-if-absent")?;

    // The primitive: the second create of a key is refused, the first body stays.
    let key = Path::from("once/object.bin");
    store
        .put_opts(&key, PutPayload::from_static(b"first"), create())
        .await?;
    let second = store
        .put_opts(&key, PutPayload::from_static(b"second"), create())
        .await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "second create of {key}: {second:?}"
    );
    assert_eq!(store.get(&key).await?.bytes().await?.as_ref(), b"first");
    // It went to the server, under the URL's prefix.
    let raw = s3
        .bucket()?
        .get(&Path::from("put-if-absent/once/object.bin"))
        .await?;
    assert_eq!(raw.bytes().await?.as_ref(), b"first");

    // Snapshot parts: a rewrite with the same rows is a no-op, with other rows it is
    // refused as corruption and the first rows stay.
    let snapshots = SnapshotStore::new(store.clone());
    let rows = vec![row("m:1", 10), row("m:2", -5)];
    let written = snapshots.put_part("s1", 3, &rows).await?;
    assert_eq!(snapshots.put_part("s1", 3, &rows).await?, written);
    let other = snapshots.put_part("s1", 3, &[row("m:1", 11)]).await;
    assert!(
        matches!(other, Err(StorageError::Corrupt { .. })),
        "rewrite with other rows: {other:?}"
    );
    assert_eq!(snapshots.read_part("s1", 3).await?, rows);

    // Checkpoints: one at a sequence already checkpointed keeps the first.
    let checkpoints = CheckpointStore::new(store.clone(), 2, "v-test");
    checkpoints.put(5, 100, Bytes::from("state@100")).await?;
    checkpoints.put(5, 100, Bytes::from("other@100")).await?;
    let latest = checkpoints.latest(5).await?.expect("a checkpoint");
    assert_eq!(
        (latest.seq, latest.bytes.as_ref()),
        (100, b"state@100".as_ref())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_commits_take_contiguous_numbers_once_each() -> anyhow::Result<()> {
    const DRAFTS: usize = 6;
    const TASKS_PER_DRAFT: usize = 2;
    let s3 = SeaweedFs::start().await?;
    let snapshots = SnapshotStore::new(open(&s3, "race")?);

    // Every draft twice (a replay and its retry after a lost response, say), all
    // released at once.
    let start = Arc::new(tokio::sync::Barrier::new(DRAFTS * TASKS_PER_DRAFT));
    let mut tasks = Vec::new();
    for d in 0..DRAFTS {
        for _ in 0..TASKS_PER_DRAFT {
            let (snapshots, start) = (snapshots.clone(), start.clone());
            let draft = draft(&format!("snapshot-{d}"));
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
    // Both submissions of a draft were answered with the same commit.
    assert_eq!(answered.len(), DRAFTS, "{answered:?}");
    for (snapshot, numbers) in &answered {
        assert_eq!(
            numbers.len(),
            1,
            "{snapshot} answered as commits {numbers:?}"
        );
    }

    // The log: commits 1..=DRAFTS, one per number, each draft exactly once, and the
    // number each submitter was told.
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

    // A later retry of a committed draft gets that commit back and writes nothing.
    let first = commits[0].clone();
    assert_eq!(snapshots.commit(first.draft.clone()).await?, first);
    let next = snapshots.commit(draft("snapshot-late")).await?;
    assert_eq!(next.number, DRAFTS as u64 + 1);
    assert_eq!(snapshots.commits().await?.len(), DRAFTS + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_archive_on_s3_equals_the_stream_rows() -> anyhow::Result<()> {
    let (stack, outcome) = replay_of_the_archive_equals_the_stream_rows(Archive::S3, 10).await?;
    let s3 = stack.s3().expect("an S3 stack");

    // The commit reads back from S3, parts and all.
    let snapshots = SnapshotStore::new(stack.object_store()?);
    assert_eq!(snapshots.commits().await?, vec![outcome.commit.clone()]);
    let draft = &outcome.commit.draft;
    assert_eq!(draft.log_cutoff, outcome.cutoff);
    assert_eq!(draft.parts.len(), 16);
    let mut rows = 0;
    for partition in 0..draft.partitions {
        rows += snapshots
            .read_part(&draft.snapshot_id, partition)
            .await?
            .len();
    }
    assert_eq!(rows, outcome.rows);

    // And it is in the bucket, under the URL's prefix, with the archive it was
    // replayed from.
    let bucket = s3.bucket()?;
    let listed = |prefix: &'static str| {
        let bucket = bucket.clone();
        async move {
            let objects: Vec<_> = bucket.list(Some(&Path::from(prefix))).try_collect().await?;
            anyhow::Ok(objects.len())
        }
    };
    assert_eq!(
        listed("lake/tables/merchant_exposure_daily/_commits").await?,
        1
    );
    assert!(listed("lake/archive/_watermarks").await? > 0);
    assert_eq!(
        listed("lake/archive/events").await?,
        draft.segments_read.len(),
        "every event segment was read by the replay"
    );
    Ok(())
}
