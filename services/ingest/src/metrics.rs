//! Ingest's Prometheus metrics: events by outcome, and how long Publish takes;
//! in the archiver, how far the archive trails the log.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use payledger_server_common::metrics::{
    Counter, Family, Gauge, Histogram, Labels, Registry, latency_histogram,
};

pub(crate) struct IngestMetrics {
    events: Family<Labels, Counter>,
    publish: Histogram,
    /// Writes sent to JetStream whose ack is awaited.
    pub awaiting_ack: Gauge,
}

impl IngestMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let events = Family::<Labels, Counter>::default();
        registry.register(
            "payledger_ingest_events",
            "Events answered by Publish, by outcome (accepted, duplicate, rejected)",
            events.clone(),
        );
        let publish = latency_histogram();
        registry.register(
            "payledger_ingest_publish_seconds",
            "Time to answer a Publish call, JetStream's acknowledgement included",
            publish.clone(),
        );
        let awaiting_ack = Gauge::default();
        registry.register(
            "payledger_ingest_writes_awaiting_ack",
            "Writes (atomic batches, groups of single publishes, dimension records) sent to \
             JetStream whose acknowledgement is awaited",
            awaiting_ack.clone(),
        );
        Arc::new(Self {
            events,
            publish,
            awaiting_ack,
        })
    }

    pub fn answered(&self, outcome: &'static str, events: u64) {
        if events > 0 {
            self.events
                .get_or_create(&vec![("outcome", outcome.to_string())])
                .inc_by(events);
        }
    }

    pub fn published(&self, started: std::time::Instant) {
        self.publish.observe(started.elapsed().as_secs_f64());
    }
}

/// Registered only where the archiver runs: an ingest that does not archive
/// knows nothing of the archive, and a zero lag from it would hide the real one.
pub(crate) struct ArchiverMetrics {
    watermark: Gauge,
    lag: Gauge,
    last_cut: Gauge<f64, AtomicU64>,
    oldest_unarchived_age: Gauge<f64, AtomicU64>,
    lost: Counter,
}

impl ArchiverMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            watermark: Gauge::default(),
            lag: Gauge::default(),
            last_cut: Gauge::default(),
            oldest_unarchived_age: Gauge::default(),
            lost: Counter::default(),
        };
        registry.register(
            "payledger_archive_watermark_sequence",
            "Highest archive watermark: every record of the stream up to it is archived",
            m.watermark.clone(),
        );
        registry.register(
            "payledger_archive_lag_records",
            "Records in the stream after the highest watermark, not yet archived",
            m.lag.clone(),
        );
        registry.register(
            "payledger_archive_last_cut_timestamp_seconds",
            "When the last cut was completed (Unix time; 0 while the archive has none)",
            m.last_cut.clone(),
        );
        registry.register(
            "payledger_archive_oldest_unarchived_age_seconds",
            "Age, by its ingest_time, of the oldest record in the stream not yet archived (0 when none)",
            m.oldest_unarchived_age.clone(),
        );
        registry.register(
            "payledger_archive_lost_records",
            "Records deleted from the stream (max_age, a purge) before the archiver read them: lost for good",
            m.lost.clone(),
        );
        Arc::new(m)
    }

    pub fn lost(&self, records: u64) {
        self.lost.inc_by(records);
    }

    pub fn watermark(&self, watermark: u64) {
        self.watermark
            .set(i64::try_from(watermark).unwrap_or(i64::MAX));
    }

    pub fn cut_completed_at(&self, at: SystemTime) {
        let seconds = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_cut.set(seconds);
    }

    pub fn lag(&self, records: u64) {
        self.lag.set(i64::try_from(records).unwrap_or(i64::MAX));
    }

    pub fn oldest_unarchived(&self, age: Option<Duration>) {
        self.oldest_unarchived_age
            .set(age.map_or(0.0, |d| d.as_secs_f64()));
    }
}
