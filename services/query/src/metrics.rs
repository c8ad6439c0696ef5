//! The query service's Prometheus metrics: latency by method and by the source
//! that answered, and the snapshot part cache's reads by tier.

use std::sync::Arc;
use std::time::Instant;

use payledger_server_common::metrics::{Family, Histogram, Labels, Registry, latency_histogram};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use crate::part_cache::PartCacheCounters;

pub(crate) struct QueryMetrics {
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

impl QueryMetrics {
    pub fn register(registry: &mut Registry, counters: Arc<PartCacheCounters>) -> Arc<Self> {
        let latency = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "payledger_query_seconds",
            "Time to answer a call, by method and by the source that answered (stream, replay, none)",
            latency.clone(),
        );
        registry.register_collector(Box::new(CacheReads(counters)));
        Arc::new(Self { latency })
    }

    pub fn observe(&self, method: &'static str, source: &'static str, started: Instant) {
        self.latency
            .get_or_create(&vec![
                ("method", method.to_string()),
                ("source", source.to_string()),
            ])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The part cache's counters, read at each scrape.
struct CacheReads(Arc<PartCacheCounters>);

impl std::fmt::Debug for CacheReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheReads")
    }
}

impl Collector for CacheReads {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.cache_stats();
        let mut family = encoder.encode_descriptor(
            "payledger_query_part_cache_reads",
            "Snapshot part reads by where they were answered: memory, local disk, or object storage (a miss); the hit ratio is (memory + disk) / all",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (tier, reads) in [
            ("memory", stats.memory_hits),
            ("disk", stats.disk_hits),
            ("object_store", stats.misses),
        ] {
            let labels = [("tier", tier)];
            ConstCounter::new(reads).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
