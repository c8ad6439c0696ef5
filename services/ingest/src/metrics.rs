//! Ingest's Prometheus metrics: events by outcome, and how long Publish takes.

use std::sync::Arc;

use payledger_server_common::metrics::{
    Counter, Family, Histogram, Labels, Registry, latency_histogram,
};

pub(crate) struct IngestMetrics {
    events: Family<Labels, Counter>,
    publish: Histogram,
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
        Arc::new(Self { events, publish })
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
