//! The product's promise: the stream path and a replay of the archive give the same
//! rows for the same log prefix, field for field (on the local filesystem; `s3.rs`
//! runs the same scenario against a real S3 server).

use payledger_e2e::Archive;
use payledger_e2e::convergence;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_archive_equals_the_stream_rows() -> anyhow::Result<()> {
    let (_stack, outcome) =
        convergence::replay_of_the_archive_equals_the_stream_rows(Archive::Fs, 40).await?;
    assert_eq!(outcome.commit.number, 1);
    Ok(())
}
