//! Data written by the first release — a stream whose metadata names all five
//! settings, archive segments with the settings fingerprint in their footers,
//! format-1 checkpoints, KV rows of semantics 1 and a commit naming its settings
//! fingerprint — keeps working under this release (`fixtures/v1-stack`, made by running that release's
//! `payledger dev`, `gen --send --events 3000` and a committed replay).

use std::path::Path;
use std::time::Duration;

use payledger_cli::generate::{GenConfig, Generator};
use payledger_e2e::{
    Archive, Stack, assert_converges, ingest_client, now_us, query_client, stream_messages,
    wait_until_archived,
};
use payledger_projector::replay::{
    ReplayRequest, fold_partitions, latest_cutoff, replay_and_commit,
};
use payledger_proto::v1;
use payledger_semantics::{Day, Settings};
use payledger_server_common::topology::read_stream;
use payledger_storage::{ArchiveStore, SnapshotStore, open_store};

#[tokio::test]
async fn a_first_release_stack_keeps_working_and_converges() -> anyhow::Result<()> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1-stack");
    // The first release's retention: the fixture's records were written on a fixed
    // day, and a shorter max_age would delete them once that day is far enough
    // behind, while this test reads the whole log.
    let mut stack = Stack::builder()
        .fixture(fixture)
        .archive(Archive::Fs)
        .ingest(&["--stream-max-age", "36d"])
        .projector(&[])
        .query(&["--commit-poll-interval", "100ms"])
        .start()
        .await?;
    let projector = stack.projector.take().expect("a projector");
    let query = stack.query.take().expect("query");
    let (h, store, ingest) = (&stack.h, stack.store.clone(), &mut stack.ingest);
    let before = stream_messages(&h.nats.url()).await?;
    assert_eq!(before, 2988, "the fixture's log");

    // The first release's commit still answers for its day, from its snapshot.
    let snapshots = SnapshotStore::new(open_store(&store)?);
    let old = snapshots.commits().await?.remove(0);
    assert_eq!(
        old.draft.version_key,
        Settings::default().legacy_fingerprint()
    );
    let mut old_rows = Vec::new();
    for p in 0..16 {
        old_rows.extend(snapshots.read_part(&old.draft.snapshot_id, p).await?);
    }
    let sample = old_rows.first().expect("the fixture's snapshot has rows");
    let mut query_client = query_client(&query.url()).await?;
    let answer = query_client
        .get_daily_exposure(v1::GetDailyExposureRequest {
            merchant_id: sample.merchant_id.clone(),
            day: sample.day.to_string(),
            consistency: v1::Consistency::Authoritative as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let provenance = answer.provenance.expect("provenance");
    assert_eq!(provenance.snapshot_id, old.draft.snapshot_id);
    assert_eq!(provenance.version_key, old.draft.version_key);

    // More traffic under this release: the archive gets segments with the new footers.
    let mut client = ingest_client(&ingest.url()).await?;
    let mut traffic = Generator::new(GenConfig {
        seed: 21,
        merchants: 20,
        ..GenConfig::default()
    });
    let mut accepted = payledger_e2e::AcceptedLog::default();
    for _ in 0..3 {
        accepted
            .publish(&mut client, traffic.batch(300, now_us()))
            .await?;
    }
    assert!(
        accepted.records.len() > 800,
        "{} accepted, {} rejected",
        accepted.records.len(),
        accepted.rejected
    );
    // A stopping archiver writes what it has read, not what was acknowledged after.
    let last_accepted = *accepted.records.keys().last().expect("accepted records");
    let js = async_nats::jetstream::new(async_nats::connect(h.nats.url()).await?);
    let archive = ArchiveStore::new(open_store(&store)?, read_stream(&js).await?);
    wait_until_archived(&archive, last_accepted).await?;
    ingest.terminate().await?;

    let recorded = read_stream(&js).await?;
    assert_eq!(
        recorded.legacy,
        Some(Settings::default()),
        "the stream's metadata is as the first release wrote it"
    );
    let archive = ArchiveStore::new(open_store(&store)?, recorded);
    let cutoff = latest_cutoff(&archive).await?;
    assert_eq!(
        cutoff,
        stream_messages(&h.nats.url()).await?,
        "the archive holds the whole log"
    );
    assert!(cutoff > before);
    let partitions: Vec<u32> = (0..16).collect();
    let whole = fold_partitions(&archive, Settings::default(), &partitions, cutoff).await?;
    assert_converges(&mut query_client, &whole, Duration::from_secs(60)).await?;
    // Its checkpoints were folded under semantics 1 (R11 changed the meaning):
    // read, refused with the reason, and the rows rebuilt under this version, the
    // first release's rows in the buckets replaced.
    let log = projector.log();
    assert!(
        log.contains("checkpoint not usable")
            && log.contains("checkpoints/projector/p")
            && log.contains("written under semantics 1"),
        "{log}"
    );

    // A replay under this release over both kinds of segment equals the stream.
    let today = Day::of_micros(now_us());
    let commit = replay_and_commit(
        &payledger_projector::replay::ReplayStores::beside(archive.clone()),
        Settings::default(),
        &ReplayRequest {
            replay_id: "after-upgrade".into(),
            from_day: Day(today.0 - 2),
            to_day: today,
            cutoff: None,
            from_genesis: false,
        },
        |_| {},
    )
    .await?;
    assert_eq!(commit.number, 2);
    assert_eq!(commit.draft.version_key, Settings::default().version_key());
    let mut replayed = Vec::new();
    for p in 0..16 {
        replayed.extend(snapshots.read_part(&commit.draft.snapshot_id, p).await?);
    }
    replayed.sort_by(|a, b| {
        (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
    });
    let expected: Vec<_> = whole
        .daily_rows()
        .into_iter()
        .filter(|r| r.day.0 >= today.0 - 2)
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(replayed, expected);
    Ok(())
}
