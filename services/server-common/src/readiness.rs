//! Readiness: whether a service can do its job right now, as its gRPC health
//! service (the name the readiness probe asks for) reports it. Liveness — the
//! server as a whole, "" — stays SERVING throughout: a service that cannot write
//! because NATS cannot is not helped by a restart (docs/operations.md
//! "JetStream cannot write").
//!
//! A probe task checks what the service depends on every `--readiness-interval`:
//! the NATS connection, and for services that write, one small JetStream write
//! to a stream of its own (`PAYLEDGER_PROBE`, one message per writer), which
//! fails exactly when the service's own writes would (a full store, JetStream
//! disabled, no leader).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::config::parse_duration;

/// The stream the write probe appends to; kept apart from the log, so that
/// probes never reach the projection.
pub const PROBE_STREAM: &str = "PAYLEDGER_PROBE";
const PROBE_SUBJECTS: &str = "payledger.probe.>";

#[derive(clap::Args, Clone, Debug)]
pub struct ReadinessArgs {
    /// How often readiness is checked (the NATS connection, and a JetStream
    /// write for services that write). Readiness follows within about this long.
    #[arg(
        long = "readiness-interval",
        env = "PAYLEDGER_READINESS_INTERVAL",
        default_value = READINESS_INTERVAL,
        value_parser = parse_duration
    )]
    pub interval: Duration,
}

const READINESS_INTERVAL: &str = "1s";

/// The conditions a service is not ready for, each with its reason.
#[derive(Clone)]
pub struct Readiness {
    ready: Arc<watch::Sender<bool>>,
    problems: Arc<Mutex<BTreeMap<&'static str, String>>>,
    gauge: Gauge,
    failing: Family<Vec<(&'static str, String)>, Gauge>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    pub fn new() -> Self {
        let gauge = Gauge::default();
        gauge.set(1);
        Self {
            ready: Arc::new(watch::channel(true).0),
            problems: Arc::default(),
            gauge,
            failing: Family::default(),
        }
    }

    /// Registers `payledger_ready` (1 ready, 0 not) in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            crate::metrics::READY,
            "1 while the service can do its job (its readiness probe answers SERVING), 0 while not",
            self.gauge.clone(),
        );
        registry.register(
            crate::metrics::READINESS_FAILING,
            "1 while the readiness condition fails (nats_connection, jetstream_write), 0 once it holds",
            self.failing.clone(),
        );
    }

    /// Follows readiness, for [`crate::serve::ServerOptions::serving_while`].
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// `condition` fails for `reason` (logged once when it starts failing).
    pub fn fail(&self, condition: &'static str, reason: impl std::fmt::Display) {
        let mut problems = self.problems.lock().expect("readiness lock");
        if problems.insert(condition, reason.to_string()).is_none() {
            tracing::warn!(condition, %reason, "not ready");
        }
        self.failing
            .get_or_create(&vec![("condition", condition.to_string())])
            .set(1);
        self.publish(&problems);
    }

    /// `condition` holds again.
    pub fn clear(&self, condition: &'static str) {
        let mut problems = self.problems.lock().expect("readiness lock");
        if problems.remove(condition).is_some() {
            tracing::info!(condition, "condition holds again");
        }
        self.failing
            .get_or_create(&vec![("condition", condition.to_string())])
            .set(0);
        self.publish(&problems);
    }

    fn publish(&self, problems: &BTreeMap<&'static str, String>) {
        let ready = problems.is_empty();
        self.gauge.set(i64::from(ready));
        self.ready.send_if_modified(|now| {
            let changed = *now != ready;
            *now = ready;
            changed
        });
    }

    /// Checks every `args.interval` until `stopped`: the connection of `client`,
    /// and with `writer` a JetStream write as `writer` (its subject and the probe
    /// stream's replicas).
    pub fn spawn_probe(
        &self,
        client: async_nats::Client,
        writer: Option<ProbeWriter>,
        args: &ReadinessArgs,
        mut stopped: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let readiness = self.clone();
        let interval = args.interval;
        tokio::spawn(async move {
            let js = jetstream::new(client.clone());
            let mut stream_ready = false;
            loop {
                match client.connection_state() {
                    async_nats::connection::State::Connected => readiness.clear("nats_connection"),
                    state => readiness.fail(
                        "nats_connection",
                        format!("not connected to any NATS server ({state:?}); reconnecting"),
                    ),
                }
                if let Some(writer) = &writer {
                    let probe = async {
                        if !stream_ready {
                            writer.ensure_stream(&js).await?;
                            stream_ready = true;
                        }
                        writer.write(&js).await
                    };
                    match tokio::time::timeout(interval.max(Duration::from_secs(1)), probe).await {
                        Ok(Ok(())) => readiness.clear("jetstream_write"),
                        Ok(Err(e)) => readiness.fail("jetstream_write", format!("{e:#}")),
                        Err(_) => readiness.fail(
                            "jetstream_write",
                            "a probe write got no acknowledgement in time",
                        ),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stopped.changed() => return,
                }
            }
        })
    }
}

/// Who writes the probe, and with how many replicas the probe stream is made.
#[derive(Clone, Debug)]
pub struct ProbeWriter {
    /// Unique per process: one probe message each, replaced by the next.
    pub subject: String,
    pub replicas: usize,
}

impl ProbeWriter {
    /// A writer named after `component` and this process.
    pub fn new(component: &str, replicas: usize) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        let clean: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            subject: format!("payledger.probe.{component}.{clean}.{}", std::process::id()),
            replicas: replicas.max(1),
        }
    }

    async fn ensure_stream(&self, js: &jetstream::Context) -> anyhow::Result<()> {
        js.get_or_create_stream(jetstream::stream::Config {
            name: PROBE_STREAM.to_string(),
            subjects: vec![PROBE_SUBJECTS.to_string()],
            max_messages_per_subject: 1,
            max_age: Duration::from_secs(3600),
            num_replicas: self.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the probe stream {PROBE_STREAM}: {e}"))?;
        Ok(())
    }

    async fn write(&self, js: &jetstream::Context) -> anyhow::Result<()> {
        js.publish(self.subject.clone(), bytes::Bytes::from_static(b"probe"))
            .await
            .map_err(|e| anyhow::anyhow!("probe write: {e}"))?
            .await
            .map_err(|e| anyhow::anyhow!("probe write: {e}"))?;
        Ok(())
    }
}
