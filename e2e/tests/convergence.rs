//! The product's promise: the stream path and a replay of the archive give the same
//! rows for the same log prefix, field for field, on the local filesystem and on a
//! real S3-compatible server (SeaweedFS, see `payledger_e2e::seaweed`) with the
//! archive, the tables and the checkpoints all there.

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use payledger_e2e::Archive;
use payledger_e2e::convergence;
use payledger_storage::SnapshotStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_archive_equals_the_stream_rows() -> anyhow::Result<()> {
    let (_stack, outcome) =
        convergence::replay_of_the_archive_equals_the_stream_rows(Archive::Fs, 40).await?;
    assert_eq!(outcome.commit.number, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_archive_on_s3_equals_the_stream_rows() -> anyhow::Result<()> {
    let (stack, outcome) =
        convergence::replay_of_the_archive_equals_the_stream_rows(Archive::S3, 10).await?;
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
