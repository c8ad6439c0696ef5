//! The stream's retention as the archiver sees it: how many records of the log no
//! cut holds yet and how old the oldest of them is, and the stream's `max_age`,
//! which on an existing stream only the archiver changes (docs/operations.md,
//! "Retention").
//!
//! Whatever the log has dropped, projectors and query read from the archive, so
//! `max_age` bounds only how long a projector may be down and still resume from its
//! own checkpoint alone, and how far the archiver may fall behind before records are
//! lost for good. The archiver is the one process that knows the archive's
//! watermark, so the one that can tell whether a shorter `max_age` would delete
//! records no cut holds yet; and as exactly one runs per stream, ingest replicas
//! restarted in any order during a rollout never set the value back and forth.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use payledger_proto::v1;
use payledger_server_common::clock::now_us;
use payledger_server_common::config::format_duration;
use payledger_server_common::topology::{STREAM, set_stream_max_age};
use prost::Message;
use tokio::sync::watch;

use crate::metrics::ArchiverMetrics;

/// How often the lag is read from the stream when no cut moves the watermark: an
/// idle or stuck archiver must show its lag too.
const REFRESH: Duration = Duration::from_secs(2);

/// A shorter `max_age` waits until the oldest unarchived record is at least this
/// much younger than it. It covers the archiver's next cut after the check and
/// ingest's clock (which stamps ingest_time) running behind NATS's (which ages
/// records).
const SHRINK_MARGIN: Duration = Duration::from_secs(600);

/// Failures are retried every [`REFRESH`] but logged at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// The stream already keeps records for the wanted time.
    Keep,
    Apply,
    /// Shorter, and it would delete a record no cut holds yet.
    Defer,
}

/// Stands for the age of the oldest unarchived record while the archive's
/// watermark is not known: any record may be unarchived.
const UNKNOWN: Duration = Duration::MAX;

/// What to do with a stream that keeps records for `current` when `wanted` is
/// asked for (zero keeps them for ever), the oldest record the archive lacks being
/// `oldest_unarchived` old ([`UNKNOWN`] when that is not known).
pub(crate) fn decide(
    current: Duration,
    wanted: Duration,
    oldest_unarchived: Option<Duration>,
) -> Change {
    if current == wanted {
        return Change::Keep;
    }
    match oldest_unarchived {
        Some(age) if !longer(current, wanted) && age.saturating_add(SHRINK_MARGIN) >= wanted => {
            Change::Defer
        }
        _ => Change::Apply,
    }
}

/// Whether `wanted` keeps records longer than `current` (zero: for ever).
fn longer(current: Duration, wanted: Duration) -> bool {
    wanted.is_zero() || (!current.is_zero() && wanted > current)
}

fn shown(max_age: Duration) -> String {
    if max_age.is_zero() {
        "0s (for ever)".to_string()
    } else {
        format_duration(max_age)
    }
}

/// The `max_age` still to be given to the stream.
struct Pending {
    wanted: Option<Duration>,
    deferral_logged: bool,
}

impl Pending {
    async fn settle(
        &mut self,
        js: &jetstream::Context,
        current: Duration,
        oldest_unarchived: Option<Duration>,
    ) -> anyhow::Result<()> {
        let Some(wanted) = self.wanted else {
            return Ok(());
        };
        match decide(current, wanted, oldest_unarchived) {
            Change::Keep => self.wanted = None,
            Change::Defer => {
                if !self.deferral_logged {
                    self.deferral_logged = true;
                    let why = match oldest_unarchived {
                        Some(UNKNOWN) | None => {
                            "the archive's watermark is not known yet".to_string()
                        }
                        Some(age) => format!(
                            "the oldest record not archived is {} old",
                            format_duration(Duration::from_secs(age.as_secs()))
                        ),
                    };
                    tracing::warn!(
                        stream = STREAM,
                        "the stream keeps records for {}; --stream-max-age {} waits until the archive holds every record it would delete ({why})",
                        shown(current),
                        shown(wanted),
                    );
                }
            }
            Change::Apply => {
                set_stream_max_age(js, wanted).await?;
                self.wanted = None;
                if longer(current, wanted) {
                    tracing::info!(
                        stream = STREAM,
                        old = %shown(current),
                        new = %shown(wanted),
                        "changed the stream's max_age"
                    );
                } else {
                    tracing::warn!(
                        stream = STREAM,
                        old = %shown(current),
                        new = %shown(wanted),
                        "changed the stream's max_age: JetStream now deletes the records older than the new one, all of them archived"
                    );
                }
            }
        }
        Ok(())
    }
}

/// Keeps the lag metrics current, after every cut and every [`REFRESH`], and gives
/// the stream `wanted` as its `max_age` once that deletes nothing unarchived; ends
/// with `stop`. A longer `max_age` is given at once, even while the archive cannot
/// be read: that is what buys a stuck archiver time.
pub(crate) async fn watch(
    js: jetstream::Context,
    metrics: Arc<ArchiverMetrics>,
    mut watermark: watch::Receiver<Option<u64>>,
    wanted: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending = Pending {
        wanted: Some(wanted),
        deferral_logged: false,
    };
    let mut archiver_running = true;
    let mut error_logged: Option<Instant> = None;
    loop {
        let known = *watermark.borrow_and_update();
        if let Err(e) = refresh(&js, &metrics, known, &mut pending).await
            && error_logged.is_none_or(|at| at.elapsed() >= ERROR_LOG_INTERVAL)
        {
            error_logged = Some(Instant::now());
            tracing::warn!(error = %e, "could not refresh the archive's lag or the stream's max_age; retrying");
        }
        tokio::select! {
            _ = stop.changed() => return,
            changed = watermark.changed(), if archiver_running => archiver_running = changed.is_ok(),
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}

async fn refresh(
    js: &jetstream::Context,
    metrics: &ArchiverMetrics,
    watermark: Option<u64>,
    pending: &mut Pending,
) -> anyhow::Result<()> {
    let stream = js.get_stream(STREAM).await?;
    let info = stream.cached_info();
    let Some(watermark) = watermark else {
        return pending.settle(js, info.config.max_age, Some(UNKNOWN)).await;
    };
    let lag = info.state.last_sequence.saturating_sub(watermark);
    let oldest_age = match oldest_unarchived_age(&stream, watermark).await {
        Ok(age) => age,
        Err(e) => {
            metrics.lag(lag);
            return Err(e);
        }
    };
    // The age first: whoever reads a new lag reads the age that goes with it.
    metrics.oldest_unarchived(oldest_age);
    metrics.lag(lag);
    pending.settle(js, info.config.max_age, oldest_age).await
}

/// How long ago the oldest record after `watermark` still in the stream was
/// ingested: the next one `max_age` deletes, as records below the stream's first
/// sequence are gone already. None when the archive holds every record.
async fn oldest_unarchived_age(
    stream: &jetstream::stream::Stream,
    watermark: u64,
) -> anyhow::Result<Option<Duration>> {
    let state = &stream.cached_info().state;
    let oldest = (watermark + 1).max(state.first_sequence);
    if state.messages == 0 || oldest > state.last_sequence {
        return Ok(None);
    }
    let message = stream
        .direct_get_next_for_subject(">", Some(oldest))
        .await
        .map_err(|e| {
            anyhow::anyhow!("reading the first record after watermark {watermark}: {e}")
        })?;
    let ingest_time_us = v1::LogRecord::decode(message.payload.as_ref())
        .map(|r| r.ingest_time_us)
        .map_err(|e| anyhow::anyhow!("sequence {} is not a LogRecord: {e}", message.sequence))?;
    let age_us = now_us().saturating_sub(ingest_time_us).max(0);
    Ok(Some(Duration::from_micros(age_us as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_longer_max_age_is_applied_whatever_the_lag() {
        let lagging = Some(30 * DAY);
        assert_eq!(decide(7 * DAY, 14 * DAY, lagging), Change::Apply);
        assert_eq!(decide(7 * DAY, Duration::ZERO, lagging), Change::Apply);
        assert_eq!(decide(7 * DAY, 7 * DAY, lagging), Change::Keep);
    }

    #[test]
    fn a_shorter_max_age_waits_for_the_archive() {
        assert_eq!(decide(36 * DAY, 7 * DAY, None), Change::Apply);
        assert_eq!(decide(36 * DAY, 7 * DAY, Some(DAY)), Change::Apply);
        assert_eq!(decide(36 * DAY, 7 * DAY, Some(7 * DAY)), Change::Defer);
        // Within the margin of being deleted.
        assert_eq!(
            decide(36 * DAY, 7 * DAY, Some(7 * DAY - SHRINK_MARGIN / 2)),
            Change::Defer
        );
        // Keeping records for ever is longer than anything.
        assert_eq!(
            decide(Duration::ZERO, 7 * DAY, Some(8 * DAY)),
            Change::Defer
        );
        assert_eq!(decide(Duration::ZERO, 7 * DAY, None), Change::Apply);
    }

    #[test]
    fn without_the_watermark_only_a_longer_max_age_is_applied() {
        assert_eq!(decide(7 * DAY, 30 * DAY, Some(UNKNOWN)), Change::Apply);
        assert_eq!(decide(7 * DAY, 2 * DAY, Some(UNKNOWN)), Change::Defer);
    }
}
