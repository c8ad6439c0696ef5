//! The dimension records already in the log, so that `PublishDimension` can tell a
//! re-published key with other content from a resend (docs/failure-contract.md,
//! dimension records).
//!
//! A (key, effective date, version) is never replaced: the first record in the log
//! stays in force (docs/semantics.md R8). Dimension records are few and every
//! reader holds them all, so ingest holds them too, in the same `DimensionBook`:
//! the archive's through its highest watermark (when ingest archives), then the
//! log's after it. Before each answer it reads what the log gained since the last,
//! so a record another ingest process appended counts as well.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    stream::LastRawMessageErrorKind,
};
use futures::StreamExt;
use payledger_proto::{fx_from_proto, risk_from_proto, v1};
use payledger_semantics::DimensionBook;
use payledger_server_common::topology::{DIMS_SUBJECTS, FX_SUBJECT, RISK_SUBJECT, STREAM};
use payledger_storage::{ArchiveStore, DimRecord, verify_tiling};
use prost::Message;
use tokio::sync::{Mutex, MutexGuard};
use tonic::Status;

pub(crate) struct DimensionIndex {
    js: jetstream::Context,
    archive: Option<ArchiveStore>,
    read_timeout: Duration,
    indexed: Mutex<Indexed>,
}

/// The records read so far.
pub(crate) struct Indexed {
    pub book: DimensionBook,
    /// Every dimension record at or below this sequence is in the book.
    through: u64,
    archive_read: bool,
}

impl DimensionIndex {
    pub fn new(
        js: jetstream::Context,
        archive: Option<ArchiveStore>,
        read_timeout: Duration,
    ) -> Self {
        Self {
            js,
            archive,
            read_timeout,
            indexed: Mutex::new(Indexed {
                book: DimensionBook::default(),
                through: 0,
                archive_read: false,
            }),
        }
    }

    /// Every dimension record the log holds now. The caller keeps the guard until
    /// its own record is appended, so that the calls of one process are checked and
    /// appended one at a time; two processes may still append records of one key at
    /// once, and then the first in the log stays in force, as for any reader.
    pub async fn caught_up(&self) -> Result<MutexGuard<'_, Indexed>, Status> {
        let mut indexed = self.indexed.lock().await;
        self.catch_up(&mut indexed).await?;
        Ok(indexed)
    }

    async fn catch_up(&self, indexed: &mut Indexed) -> Result<(), Status> {
        if !indexed.archive_read {
            if let Some(archive) = &self.archive {
                self.read_archive(archive, indexed).await?;
            }
            indexed.archive_read = true;
        }
        let stream = self.js.get_stream(STREAM).await.map_err(unavailable)?;
        let target = last_dimension_seq(&stream).await?;
        if target <= indexed.through {
            return Ok(());
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: DIMS_SUBJECTS.to_string(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: indexed.through + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        while indexed.through < target {
            let message = tokio::time::timeout(self.read_timeout, messages.next())
                .await
                .map_err(|_| {
                    Status::unavailable(format!(
                        "the log's dimension records were not read through sequence {target} within {:?} (--ack-timeout); retry",
                        self.read_timeout
                    ))
                })?
                .ok_or_else(|| Status::unavailable("the dimension consumer ended; retry"))?
                .map_err(unavailable)?;
            let seq = message.info().map_err(unavailable)?.stream_sequence;
            // Read with the readers' decoding, so ingest holds what they hold.
            match v1::LogRecord::decode(message.payload.as_ref()).map(|r| r.body) {
                Ok(Some(v1::log_record::Body::Fx(fx))) => {
                    if let Ok(fx) = fx_from_proto(&fx) {
                        indexed.book.apply_fx(seq, &fx);
                    }
                }
                Ok(Some(v1::log_record::Body::Risk(risk))) => {
                    if let Ok(risk) = risk_from_proto(&risk) {
                        indexed.book.apply_risk(seq, &risk);
                    }
                }
                _ => {}
            }
            indexed.through = seq;
        }
        Ok(())
    }

    /// The archived records through the highest watermark: the log may have
    /// dropped them (`max_age`).
    async fn read_archive(
        &self,
        archive: &ArchiveStore,
        indexed: &mut Indexed,
    ) -> Result<(), Status> {
        let watermarks = archive.watermarks().await.map_err(unavailable)?;
        let Some(&highest) = watermarks.iter().max() else {
            return Ok(());
        };
        let segments = archive.dim_segments().await.map_err(unavailable)?;
        verify_tiling(&segments, &watermarks, highest).map_err(|e| {
            Status::internal(format!(
                "the archived dimension records are not whole ({e}); check the archive's dims segments and watermarks"
            ))
        })?;
        let mut segments: Vec<_> = segments.into_iter().filter(|s| s.last <= highest).collect();
        segments.sort_by_key(|s| s.first);
        for segment in segments {
            for dim in archive.read_dims(segment).await.map_err(unavailable)? {
                match &dim.record {
                    DimRecord::Fx(fx) => indexed.book.apply_fx(dim.seq, fx),
                    DimRecord::Risk(risk) => indexed.book.apply_risk(dim.seq, risk),
                };
            }
        }
        indexed.through = highest;
        Ok(())
    }
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!(
        "reading the dimension records already logged: {e}; retry"
    ))
}

/// The highest sequence of a dimension record in the log, 0 if there is none.
async fn last_dimension_seq(stream: &jetstream::stream::Stream) -> Result<u64, Status> {
    let mut last = 0;
    for subject in [FX_SUBJECT, RISK_SUBJECT] {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => last = last.max(message.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(unavailable(format!("the last record of {subject}: {e}"))),
        }
    }
    Ok(last)
}
