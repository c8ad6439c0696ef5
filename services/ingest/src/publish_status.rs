//! The one map from JetStream's answer to a write to the gRPC status of the call.
//!
//! What the caller does next depends on the code alone: gRPC clients retry
//! UNAVAILABLE by themselves, back off on RESOURCE_EXHAUSTED, and give up on
//! INTERNAL. So a transient refusal must never be INTERNAL, and a permanent one
//! never UNAVAILABLE. Retrying a call is always safe for the log: every event
//! carries a `Nats-Msg-Id`, so what JetStream did store is answered as a
//! duplicate.

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use payledger_server_common::atomic_batch::BatchError;
use payledger_server_common::readiness::CANNOT_STORE_CODES;
use payledger_server_common::topology::STREAM;
use tonic::Status;

/// What a refusal means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Passes by itself (a batch cut short, a server busy or restarting, an ack
    /// that did not come): UNAVAILABLE.
    Transient,
    /// JetStream is out of room: RESOURCE_EXHAUSTED, until an operator frees
    /// space or raises a limit.
    Exhausted,
    /// A retry gets the same answer: INTERNAL, with the reason.
    Permanent,
}

/// Every JetStream err_code ingest gives a meaning of its own, with a hint for the
/// operator where one helps; codes not listed are [`Class::Permanent`].
pub(crate) const TABLE: &[(ErrorCode, Class, &str)] = &[
    // The server dropped part of the batch (a slow consumer, a reconnect mid-batch)
    // and stored none of it.
    (
        ErrorCode::ATOMIC_PUBLISH_INCOMPLETE_BATCH,
        Class::Transient,
        "",
    ),
    (
        ErrorCode::ATOMIC_PUBLISH_TOO_MANY_INFLIGHT,
        Class::Transient,
        "",
    ),
    // The same Nats-Msg-Id is being stored by another call right now: a retry is
    // answered as its duplicate.
    (
        ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT,
        Class::Transient,
        "",
    ),
    (ErrorCode::STREAM_TOO_MANY_REQUESTS, Class::Transient, ""),
    (ErrorCode::CLUSTER_NOT_AVAILABLE, Class::Transient, ""),
    (
        ErrorCode::CLUSTER_SERVER_MEMBER_CHANGE_INFLIGHT,
        Class::Transient,
        "",
    ),
    (ErrorCode::STORAGE_RESOURCES_EXCEEDED, Class::Exhausted, ""),
    (ErrorCode::MEMORY_RESOURCES_EXCEEDED, Class::Exhausted, ""),
    (ErrorCode::ACCOUNT_RESOURCES_EXCEEDED, Class::Exhausted, ""),
    (ErrorCode::INSUFFICIENT_RESOURCES, Class::Exhausted, ""),
    (ErrorCode::STREAM_LIMITS, Class::Exhausted, ""),
    (
        ErrorCode::STREAM_NOT_FOUND,
        Class::Permanent,
        "the stream is missing: restart ingest, which creates it",
    ),
    (
        ErrorCode::ATOMIC_PUBLISH_DISABLED,
        Class::Permanent,
        "the stream does not allow atomic batches (allow_atomic): restart ingest, which sets it",
    ),
];

/// The reason given when the connection to NATS was lost during a write.
pub(crate) const CONNECTION_LOST: &str = "the connection to NATS was lost before JetStream \
    acknowledged the write, which may or may not be stored";

/// A failed write, as far as the caller is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// JetStream answered with an err_code.
    Refused { err_code: u64, description: String },
    /// No answer, or none that could be read: the write may or may not be stored.
    NoAck(String),
    /// The connection to NATS was lost while the ack was awaited: it cannot come
    /// (it was due on that connection), so the call is answered at once. The write
    /// may or may not be stored.
    ConnectionLost,
    /// Nothing listens on the subject (what was sent where): no stream takes it.
    NoStream(String),
    /// Nothing listened on the subject although the stream exists: its replica
    /// group has no leader for the moment (a cluster electing one after losing
    /// a node), so nothing was stored.
    Leaderless(String),
    /// Refused before reaching JetStream, for a reason a retry does not change.
    Broken(String),
}

impl Failure {
    /// A [`Failure::NoStream`] once JetStream said the stream exists (or could
    /// not say: its API waits for the same election), else `self`. Only a
    /// stream JetStream reports missing makes the write's refusal permanent.
    pub(crate) fn given_stream_exists(self, exists: Option<bool>) -> Self {
        match (self, exists) {
            (Failure::NoStream(what), Some(true) | None) => Failure::Leaderless(what),
            (failure, _) => failure,
        }
    }

    pub(crate) fn of_batch(e: &BatchError) -> Self {
        match e {
            BatchError::Rejected {
                err_code,
                description,
            } => Failure::Refused {
                err_code: *err_code,
                description: description.clone(),
            },
            BatchError::NoAck(reason) => Failure::NoAck(reason.clone()),
            BatchError::ConnectionLost => Failure::ConnectionLost,
            BatchError::NoStream(subject) => {
                Failure::NoStream(format!("nothing listens on subject {subject}"))
            }
            BatchError::Empty | BatchError::TooLarge(_) | BatchError::Mismatch { .. } => {
                Failure::Broken(e.to_string())
            }
        }
    }

    pub(crate) fn of_publish(e: &PublishError) -> Self {
        let api_error = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
        if let Some(api) = api_error {
            // Its display appends "(code …, error code …)", said once below.
            let text = api.to_string();
            let description = text
                .rsplit_once(" (code ")
                .map_or(text.as_str(), |(d, _)| d);
            return Failure::Refused {
                err_code: api.error_code().0,
                description: description.to_string(),
            };
        }
        match e.kind() {
            PublishErrorKind::StreamNotFound => {
                Failure::NoStream("nothing listens on the subject".to_string())
            }
            PublishErrorKind::MaxPayloadExceeded => Failure::Broken(format!(
                "{e}: a record is larger than the NATS server's max_payload; lower \
                 --max-request-bytes below it or raise max_payload"
            )),
            // Timeouts, a connection lost, the client's own limit of acks in flight,
            // an ack that could not be read: whether the write was stored is unknown.
            _ => Failure::NoAck(e.to_string()),
        }
    }

    /// Whether the write was not stored because JetStream cannot store right now
    /// (out of room, no leader, no acknowledgement): what readiness counts.
    /// Bad input, a duplicate in process, too many in flight or a missing stream
    /// are not.
    pub(crate) fn means_cannot_store(&self) -> bool {
        match self {
            Failure::Refused { err_code, .. } => CANNOT_STORE_CODES.contains(err_code),
            Failure::NoAck(_) | Failure::Leaderless(_) => true,
            // The connection's own readiness condition says so.
            Failure::ConnectionLost | Failure::NoStream(_) | Failure::Broken(_) => false,
        }
    }

    pub(crate) fn class(&self) -> Class {
        match self {
            Failure::Refused { err_code, .. } => row(*err_code).map_or(Class::Permanent, |r| r.1),
            Failure::NoAck(_) | Failure::ConnectionLost | Failure::Leaderless(_) => {
                Class::Transient
            }
            Failure::NoStream(_) | Failure::Broken(_) => Class::Permanent,
        }
    }

    pub(crate) fn to_status(&self) -> Status {
        let reason = match self {
            Failure::Refused {
                err_code,
                description,
            } => format!("{description} (err_code {err_code})"),
            Failure::NoAck(reason) => format!("no acknowledgement: {reason}"),
            Failure::ConnectionLost => CONNECTION_LOST.to_string(),
            Failure::NoStream(what) => {
                format!("{what}: the stream {STREAM} is missing or does not take it")
            }
            Failure::Leaderless(what) => format!(
                "{what}: the stream {STREAM} exists but has no leader right now, as while a \
                 cluster elects one after losing a node"
            ),
            Failure::Broken(reason) => reason.clone(),
        };
        let hint = match self {
            Failure::Refused { err_code, .. } => row(*err_code).map_or("", |r| r.2),
            Failure::NoStream(_) => "restart ingest, which creates the stream",
            _ => "",
        };
        match self.class() {
            Class::Transient => Status::unavailable(format!(
                "JetStream did not take the write ({reason}); it is safe to retry the same \
                 call with the same event ids: events it did store are answered as duplicates \
                 (JetStream deduplicates them by Nats-Msg-Id)"
            )),
            Class::Exhausted => Status::resource_exhausted(format!(
                "JetStream has no room for the write ({reason}); retry with backoff once an \
                 operator has freed space or raised the stream's or account's limits"
            )),
            Class::Permanent => Status::internal(format!(
                "JetStream refused the write ({reason}); retrying will not help: {}",
                if hint.is_empty() {
                    "see ingest's log and the stream's configuration"
                } else {
                    hint
                }
            )),
        }
    }
}

fn row(err_code: u64) -> Option<&'static (ErrorCode, Class, &'static str)> {
    TABLE.iter().find(|(code, _, _)| code.0 == err_code)
}

#[cfg(test)]
fn of_batch(e: &BatchError) -> Status {
    Failure::of_batch(e).to_status()
}

#[cfg(test)]
fn of_publish(e: &PublishError) -> Status {
    Failure::of_publish(e).to_status()
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn code_of(class: Class) -> Code {
        match class {
            Class::Transient => Code::Unavailable,
            Class::Exhausted => Code::ResourceExhausted,
            Class::Permanent => Code::Internal,
        }
    }

    fn says(class: Class) -> &'static str {
        match class {
            Class::Transient => "safe to retry",
            Class::Exhausted => "retry with backoff",
            Class::Permanent => "retrying will not help",
        }
    }

    /// An API error as JetStream sends it in an ack.
    fn api_error(err_code: u64, description: &str) -> async_nats::jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": err_code, "description": description
        }))
        .unwrap()
    }

    #[test]
    fn every_row_of_the_table_gives_its_code_for_batches_and_single_publishes() {
        for &(code, class, hint) in TABLE {
            let description = format!("refusal {}", code.0);
            let batch = BatchError::Rejected {
                err_code: code.0,
                description: description.clone(),
            };
            let single =
                PublishError::with_source(PublishErrorKind::Other, api_error(code.0, &description));
            for status in [of_batch(&batch), of_publish(&single)] {
                assert_eq!(
                    status.code(),
                    code_of(class),
                    "err_code {}: {status:?}",
                    code.0
                );
                for part in [description.as_str(), says(class), hint] {
                    assert!(
                        status.message().contains(part),
                        "err_code {}: {part:?} missing from {status:?}",
                        code.0
                    );
                }
                assert!(
                    status.message().contains(&format!("err_code {}", code.0)),
                    "{status:?}"
                );
            }
        }
    }

    #[test]
    fn the_rows_are_the_codes_nats_server_sends() {
        let codes: Vec<(u64, Class)> = TABLE.iter().map(|(c, k, _)| (c.0, *k)).collect();
        for expected in [
            (10176, Class::Transient), // atomic publish batch is incomplete
            (10210, Class::Transient), // atomic publish too many inflight
            (10158, Class::Transient), // duplicate message id is in process
            (10047, Class::Exhausted), // insufficient storage resources available
            (10028, Class::Exhausted), // insufficient memory resources available
            (10023, Class::Exhausted), // insufficient resources
            (10059, Class::Permanent), // stream not found
        ] {
            assert!(codes.contains(&expected), "{expected:?} not in {codes:?}");
        }
        let mut unique: Vec<u64> = codes.iter().map(|(c, _)| *c).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len(), "an err_code listed twice");
    }

    #[test]
    fn codes_outside_the_table_are_internal_with_the_reason() {
        // wrong last sequence: ingest sets no expectations, so it is a bug here.
        let status = of_batch(&BatchError::Rejected {
            err_code: 10071,
            description: "wrong last sequence: 7".into(),
        });
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(
            status.message().contains("wrong last sequence: 7"),
            "{status:?}"
        );
        assert!(status.message().contains("see ingest's log"), "{status:?}");
    }

    #[test]
    fn no_ack_is_unavailable_and_safe_to_retry() {
        for status in [
            of_batch(&BatchError::NoAck("no ack within 5s".into())),
            of_publish(&PublishError::new(PublishErrorKind::TimedOut)),
            of_publish(&PublishError::new(PublishErrorKind::BrokenPipe)),
            of_publish(&PublishError::new(PublishErrorKind::MaxAckPending)),
            of_publish(&PublishError::with_source(
                PublishErrorKind::Other,
                std::io::Error::other("connection closed"),
            )),
        ] {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("safe to retry"), "{status:?}");
        }
    }

    #[test]
    fn a_lost_connection_is_unavailable_and_says_so() {
        let status = of_batch(&BatchError::ConnectionLost);
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        for part in [
            "connection to NATS was lost",
            "safe to retry the same call with the same event ids",
            "Nats-Msg-Id",
        ] {
            assert!(
                status.message().contains(part),
                "{part:?} missing: {status:?}"
            );
        }
        assert!(!status.message().contains("no ack"), "{status:?}");
    }

    #[test]
    fn no_stream_is_unavailable_unless_jetstream_says_the_stream_is_missing() {
        let no_stream = || Failure::of_batch(&BatchError::NoStream("payledger.events.p3".into()));
        for (exists, code) in [
            (Some(true), Code::Unavailable),
            (None, Code::Unavailable),
            (Some(false), Code::Internal),
        ] {
            let status = no_stream().given_stream_exists(exists).to_status();
            assert_eq!(status.code(), code, "stream exists: {exists:?}: {status:?}");
        }
        let leaderless = no_stream().given_stream_exists(Some(true)).to_status();
        assert!(
            leaderless.message().contains("no leader")
                && leaderless.message().contains("safe to retry"),
            "{leaderless:?}"
        );
        // Other failures keep their class whatever is known of the stream.
        let busy = Failure::NoAck("timed out".into()).given_stream_exists(Some(false));
        assert_eq!(busy.to_status().code(), Code::Unavailable);
    }

    #[test]
    fn storage_refusals_no_ack_and_no_leader_count_against_readiness_and_bad_input_does_not() {
        for code in [10047, 10023, 10176] {
            let f = Failure::of_batch(&BatchError::Rejected {
                err_code: code,
                description: "full".into(),
            });
            assert!(f.means_cannot_store(), "{code}");
        }
        assert!(Failure::NoAck("no ack".into()).means_cannot_store());
        let leaderless = Failure::of_batch(&BatchError::NoStream("payledger.events.p3".into()))
            .given_stream_exists(Some(true));
        assert!(leaderless.means_cannot_store());
        for not in [
            Failure::of_batch(&BatchError::Rejected {
                err_code: 10158,
                description: "duplicate message id is in process".into(),
            }),
            Failure::of_batch(&BatchError::Rejected {
                err_code: 10210,
                description: "too many inflight".into(),
            }),
            Failure::of_batch(&BatchError::TooLarge(1001)),
            Failure::of_publish(&PublishError::new(PublishErrorKind::MaxPayloadExceeded)),
            Failure::of_batch(&BatchError::NoStream("payledger.events.p3".into()))
                .given_stream_exists(Some(false)),
        ] {
            assert!(!not.means_cannot_store(), "{not:?}");
        }
    }

    #[test]
    fn no_stream_and_broken_batches_are_internal() {
        for status in [
            of_batch(&BatchError::NoStream("payledger.events.p3".into())),
            of_publish(&PublishError::new(PublishErrorKind::StreamNotFound)),
        ] {
            assert_eq!(status.code(), Code::Internal, "{status:?}");
            assert!(
                status.message().contains(STREAM) && status.message().contains("restart ingest"),
                "{status:?}"
            );
        }
        for status in [
            of_batch(&BatchError::Mismatch { sent: 20, got: 19 }),
            of_batch(&BatchError::TooLarge(1001)),
            of_publish(&PublishError::new(PublishErrorKind::MaxPayloadExceeded)),
        ] {
            assert_eq!(status.code(), Code::Internal, "{status:?}");
        }
        let payload = of_publish(&PublishError::new(PublishErrorKind::MaxPayloadExceeded));
        assert!(
            payload.message().contains("--max-request-bytes"),
            "{payload:?}"
        );
    }
}
