//! ADR-50 atomic batch publishing: up to 1000 messages stored all-or-nothing and
//! contiguously, acknowledged once. With `sync_interval: always` this is what makes
//! durable writes fast (docs/failure-contract.md): one fsync covers the whole batch.
//!
//! Every message but the last is sent without a reply subject; the last carries
//! `Nats-Batch-Commit: 1` and is a request. NATS keeps the order of one
//! connection, so the commit arrives after the rest. The ack names the last
//! sequence and the count, so message i (1-based) of n got `last - n + i`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;

use crate::connection::{ConnectionLosses, LossWatch};

/// The server's ceiling for one batch (`jetstream.limits.batch.max_msgs`).
pub const MAX_BATCH_MESSAGES: usize = 1000;

/// JetStream's err_code when a batch holds a Nats-Msg-Id inside the duplicate window.
pub const ERR_DUPLICATE_MSG_ID: u64 = 10201;
/// JetStream's err_code when Nats-Expected-Last-Subject-Sequence does not hold.
pub const ERR_WRONG_LAST_SEQUENCE: u64 = 10071;

pub struct BatchMessage {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchAck {
    pub last_sequence: u64,
    pub count: u64,
}

impl BatchAck {
    /// The sequence of the message at 0-based `index` in the batch.
    pub fn sequence_of(&self, index: usize) -> u64 {
        self.last_sequence + 1 - self.count + index as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("the batch is empty")]
    Empty,
    #[error("the batch has {0} messages; JetStream takes at most {MAX_BATCH_MESSAGES}")]
    TooLarge(usize),
    #[error("jetstream rejected the batch: {description} (err_code {err_code})")]
    Rejected { err_code: u64, description: String },
    #[error("no acknowledgement from jetstream: {0}")]
    NoAck(String),
    /// Nothing listens on the subject: no stream takes it, so nothing was stored.
    #[error("no stream takes subject {0}")]
    NoStream(String),
    #[error("jetstream acknowledged {got} messages of a batch of {sent}")]
    Mismatch { sent: usize, got: u64 },
    /// The connection to NATS was lost before the ack came: it never will (its
    /// reply was due on that connection). The batch may or may not be stored.
    #[error("the connection to NATS was lost before jetstream acknowledged the batch")]
    ConnectionLost,
}

impl BatchError {
    pub fn err_code(&self) -> Option<u64> {
        match self {
            BatchError::Rejected { err_code, .. } => Some(*err_code),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct Ack {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: u64,
}

fn batch_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Publishes `messages` as one atomic batch and waits for the commit's ack, at
/// most `timeout`.
pub async fn publish_atomic(
    client: &async_nats::Client,
    messages: Vec<BatchMessage>,
    timeout: Duration,
) -> Result<BatchAck, BatchError> {
    publish_atomic_watched(
        client,
        messages,
        timeout,
        &mut ConnectionLosses::none().since_now(),
    )
    .await
}

/// [`publish_atomic`], answering [`BatchError::ConnectionLost`] as soon as
/// `lost` sees the connection go (made before the call, so that a loss while
/// the batch's first messages are sent counts too), instead of waiting out
/// `timeout` for an ack that cannot come.
pub async fn publish_atomic_watched(
    client: &async_nats::Client,
    messages: Vec<BatchMessage>,
    timeout: Duration,
    lost: &mut LossWatch,
) -> Result<BatchAck, BatchError> {
    let sent = messages.len();
    if sent == 0 {
        return Err(BatchError::Empty);
    }
    if sent > MAX_BATCH_MESSAGES {
        return Err(BatchError::TooLarge(sent));
    }
    let id = batch_id();
    let mut commit = None;
    for (i, mut message) in messages.into_iter().enumerate() {
        message.headers.insert("Nats-Batch-Id", id.as_str());
        message
            .headers
            .insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        if i + 1 == sent {
            message.headers.insert("Nats-Batch-Commit", "1");
            commit = Some(message);
        } else {
            client
                .publish_with_headers(message.subject, message.headers, message.payload)
                .await
                .map_err(|e| BatchError::NoAck(e.to_string()))?;
        }
    }
    let commit = commit.expect("a non-empty batch has a last message");
    let subject = commit.subject.clone();
    // The request's own timeout is the client's (10 s by default); `timeout` bounds it instead.
    let request = async_nats::Request::new()
        .headers(commit.headers)
        .payload(commit.payload)
        .timeout(Some(timeout));
    let reply = lost
        .or_lost(tokio::time::timeout(
            timeout,
            client.send_request(commit.subject, request),
        ))
        .await
        .map_err(|_| BatchError::ConnectionLost)?
        .map_err(|_| BatchError::NoAck(format!("no ack within {timeout:?}")))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => BatchError::NoStream(subject),
            async_nats::RequestErrorKind::TimedOut => {
                BatchError::NoAck(format!("no ack within {timeout:?}"))
            }
            _ => BatchError::NoAck(e.to_string()),
        })?;
    let ack: Ack = serde_json::from_slice(&reply.payload)
        .map_err(|e| BatchError::NoAck(format!("unreadable ack: {e}")))?;
    if let Some(error) = ack.error {
        return Err(BatchError::Rejected {
            err_code: error.err_code,
            description: error.description,
        });
    }
    if ack.count != sent as u64 {
        return Err(BatchError::Mismatch {
            sent,
            got: ack.count,
        });
    }
    Ok(BatchAck {
        last_sequence: ack.seq,
        count: ack.count,
    })
}
