//! Readiness: whether a service can do its job right now, as its gRPC health
//! service (the name the readiness probe asks for) reports it. Liveness — the
//! server as a whole, "" — stays SERVING throughout: a service that cannot write
//! because NATS cannot is not helped by a restart (docs/operations.md
//! "JetStream cannot write").
//!
//! A probe task checks what the service depends on every `--readiness-interval`:
//! the NATS connection, and for services that write, one small JetStream write
//! to a stream of its own (`PAYLEDGER_PROBE`, one message per writer).
//!
//! The condition `jetstream_write` follows the service's own writes too (ingest's
//! event batches, the projector's rows, leases and progress, and the lease reads
//! a lease write needs first): each reports its
//! outcome — stored, or not stored because JetStream cannot store right now
//! ([`cannot_store`]: out of storage or resources, no leader, JetStream
//! unavailable, no acknowledgement; never a client's bad input, a duplicate or a
//! write fence). The probe's stream is not the service's: nats-server may refuse
//! event batches on a full store while it still takes the probe's tiny writes,
//! and once space is freed it may leave only one stream unable to write. So:
//!
//! - An own write's outcome decides at once.
//! - Own writes take precedence over the probe for [`OWN_WRITES_PRECEDENCE`]
//!   readiness intervals: the condition fails while, among the streams the
//!   service wrote to within that time, the latest outcome of any one is a
//!   failure, and holds while every one's is a success.
//! - With no own write that recent (an idle service, or one the load balancer
//!   took out of rotation), the probe's latest outcome decides.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// How often readiness is checked (the NATS connection, and a probe write
    /// to JetStream for services that write). The service's own JetStream
    /// writes count at once and outweigh the probe for 10 intervals.
    #[arg(
        long = "readiness-interval",
        env = "PAYLEDGER_READINESS_INTERVAL",
        default_value = READINESS_INTERVAL,
        value_parser = parse_duration
    )]
    pub interval: Duration,
}

const READINESS_INTERVAL: &str = "1s";

/// For how many readiness intervals an own write's outcome outweighs the probe's
/// (10 s by default): longer than an operation that keeps failing takes to fail
/// again (a KV read or write JetStream does not answer times out after 5 s and
/// is retried a second later), so that the probe's success in between does not
/// flip readiness back, and longer than the projector's lease renewals (a
/// quarter of its 10 s TTL), so that an idle projector is judged by its renewals.
pub const OWN_WRITES_PRECEDENCE: u32 = 10;

/// The `jetstream_write` condition, as the evidence says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Holds,
    Fails(String),
    /// Nothing written yet: leave the condition as it is.
    Unknown,
}

/// What the service's own writes and its probes said of JetStream, and when.
#[derive(Debug)]
pub struct WriteEvidence {
    /// Per stream the service wrote to: when, and the failure (None: stored).
    own: BTreeMap<String, (Instant, Option<String>)>,
    probe: Option<(Instant, Option<String>)>,
    precedence: Duration,
    /// The verdict last applied, so that a write that changes nothing costs
    /// no update of the condition and its gauges.
    applied: Verdict,
}

impl WriteEvidence {
    /// Own writes outweigh the probe for `precedence` after they were made.
    pub fn new(precedence: Duration) -> Self {
        Self {
            own: BTreeMap::new(),
            probe: None,
            precedence,
            applied: Verdict::Unknown,
        }
    }

    /// An own write to `stream` at `at`: stored (`failure` None), or not stored
    /// because JetStream cannot store.
    pub fn own_write(&mut self, stream: &str, at: Instant, failure: Option<String>) {
        match self.own.get_mut(stream) {
            Some(entry) => *entry = (at, failure),
            None => {
                self.own.insert(stream.to_string(), (at, failure));
            }
        }
    }

    pub fn probe(&mut self, at: Instant, failure: Option<String>) {
        self.probe = Some((at, failure));
    }

    /// The rule of the module doc, as of `now`.
    pub fn verdict(&self, now: Instant) -> Verdict {
        let recent = |at: &Instant| now.saturating_duration_since(*at) < self.precedence;
        let mut any_recent = false;
        for (stream, (at, failure)) in &self.own {
            if !recent(at) {
                continue;
            }
            any_recent = true;
            if let Some(reason) = failure {
                return Verdict::Fails(format!(
                    "a write to stream {stream} was not stored: {reason}"
                ));
            }
        }
        if any_recent {
            return Verdict::Holds;
        }
        match &self.probe {
            Some((_, None)) => Verdict::Holds,
            Some((_, Some(reason))) => Verdict::Fails(reason.clone()),
            None => Verdict::Unknown,
        }
    }
}

/// JetStream err_codes that mean it cannot store a write right now, whoever
/// sends it: out of storage, memory or resources, a store failure, no leader or
/// no JetStream. On a full store nats-server answers atomic batches "batch is
/// incomplete" (10176): the staged batch could not be written.
pub const CANNOT_STORE_CODES: &[u64] = &[
    10002, // account resources exceeded
    10008, // JetStream system temporarily unavailable
    10009, // not the leader
    10023, // insufficient resources
    10028, // insufficient memory resources
    10039, // JetStream not enabled for the account
    10047, // insufficient storage resources
    10053, // stream limits
    10072, // temporary storage failed
    10076, // JetStream not enabled
    10077, // stream store failed
    10176, // atomic publish batch is incomplete
];

/// Whether a failed JetStream write, given as the chain of its errors, means
/// JetStream cannot store right now (see [`CANNOT_STORE_CODES`]); also no
/// acknowledgement and no responders (a replica group without a leader). A
/// duplicate, a write fence, a too-large message or too many in flight are not.
pub fn cannot_store(error: &(dyn std::error::Error + 'static)) -> bool {
    use crate::atomic_batch::BatchError;
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::kv::{EntryErrorKind, PutErrorKind, UpdateErrorKind};
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(batch) = e.downcast_ref::<BatchError>() {
            return match batch {
                BatchError::Rejected { err_code, .. } => CANNOT_STORE_CODES.contains(err_code),
                BatchError::NoAck(_) | BatchError::NoStream(_) => true,
                _ => false,
            };
        }
        if let Some(api) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return CANNOT_STORE_CODES.contains(&api.error_code().0);
        }
        if let Some(publish) = e.downcast_ref::<async_nats::jetstream::context::PublishError>() {
            match publish.kind() {
                PublishErrorKind::TimedOut
                | PublishErrorKind::StreamNotFound
                | PublishErrorKind::BrokenPipe => return true,
                PublishErrorKind::Other => {}
                _ => return false,
            }
        }
        if let Some(update) = e.downcast_ref::<async_nats::jetstream::kv::UpdateError>() {
            match update.kind() {
                UpdateErrorKind::TimedOut => return true,
                UpdateErrorKind::InvalidKey | UpdateErrorKind::WrongLastRevision => return false,
                UpdateErrorKind::Other => {}
            }
        }
        // A key's read that JetStream does not answer (the lease read before a
        // lease write).
        if let Some(entry) = e.downcast_ref::<async_nats::jetstream::kv::EntryError>() {
            match entry.kind() {
                EntryErrorKind::TimedOut => return true,
                EntryErrorKind::InvalidKey => return false,
                EntryErrorKind::Other => {}
            }
        }
        if let Some(put) = e.downcast_ref::<async_nats::jetstream::kv::PutError>()
            && put.kind() == PutErrorKind::InvalidKey
        {
            return false;
        }
        next = e.source();
    }
    false
}

/// The conditions a service is not ready for, each with its reason.
#[derive(Clone)]
pub struct Readiness {
    ready: Arc<watch::Sender<bool>>,
    problems: Arc<Mutex<BTreeMap<&'static str, String>>>,
    gauge: Gauge,
    failing: Family<Vec<(&'static str, String)>, Gauge>,
    writes: Arc<Mutex<WriteEvidence>>,
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
            writes: Arc::new(Mutex::new(WriteEvidence::new(
                parse_duration(READINESS_INTERVAL).expect("the default interval parses")
                    * OWN_WRITES_PRECEDENCE,
            ))),
        }
    }

    /// The readiness of a service checked every `args.interval`: own writes
    /// outweigh the probe for [`OWN_WRITES_PRECEDENCE`] of those.
    pub fn with_interval(args: &ReadinessArgs) -> Self {
        let readiness = Self::new();
        readiness.writes.lock().expect("readiness lock").precedence =
            args.interval.max(Duration::from_millis(1)) * OWN_WRITES_PRECEDENCE;
        readiness
    }

    /// One of the service's own writes to `stream` was stored.
    pub fn write_stored(&self, stream: &str) {
        self.own_write(stream, None);
    }

    /// One of the service's own writes to `stream` failed with `error`: counts
    /// against `jetstream_write` when it means JetStream cannot store
    /// ([`cannot_store`]), and is ignored otherwise.
    pub fn write_failed(&self, stream: &str, error: &(dyn std::error::Error + 'static)) {
        if cannot_store(error) {
            self.write_not_stored(stream, error_chain(error));
        }
    }

    /// One of the service's own writes to `stream` was not stored because
    /// JetStream cannot store (the caller classified it), for `reason`.
    pub fn write_not_stored(&self, stream: &str, reason: impl std::fmt::Display) {
        self.own_write(stream, Some(reason.to_string()));
    }

    fn own_write(&self, stream: &str, failure: Option<String>) {
        let mut writes = self.writes.lock().expect("readiness lock");
        writes.own_write(stream, Instant::now(), failure);
        self.apply(&mut writes);
    }

    fn probed(&self, failure: Option<String>) {
        let mut writes = self.writes.lock().expect("readiness lock");
        writes.probe(Instant::now(), failure);
        self.apply(&mut writes);
    }

    fn apply(&self, writes: &mut WriteEvidence) {
        let verdict = writes.verdict(Instant::now());
        if verdict == writes.applied {
            return;
        }
        writes.applied = verdict.clone();
        match verdict {
            Verdict::Holds => self.clear("jetstream_write"),
            Verdict::Fails(reason) => self.fail("jetstream_write", reason),
            Verdict::Unknown => {}
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
                        Ok(Ok(())) => readiness.probed(None),
                        Ok(Err(e)) => readiness.probed(Some(format!("{e:#}"))),
                        Err(_) => readiness.probed(Some(
                            "a probe write got no acknowledgement in time".to_string(),
                        )),
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

/// `error` and its sources, as one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = e.source();
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atomic_batch::BatchError;

    const INTERVAL: Duration = Duration::from_secs(1);

    fn evidence() -> (WriteEvidence, Instant) {
        (
            WriteEvidence::new(INTERVAL * OWN_WRITES_PRECEDENCE),
            Instant::now(),
        )
    }

    fn fails(verdict: &Verdict, part: &str) -> bool {
        matches!(verdict, Verdict::Fails(reason) if reason.contains(part))
    }

    #[test]
    fn nothing_written_decides_nothing() {
        let (e, t) = evidence();
        assert_eq!(e.verdict(t), Verdict::Unknown);
    }

    #[test]
    fn an_own_failure_outweighs_a_later_successful_probe_while_it_is_recent() {
        // The full store that still takes the probe's tiny writes.
        let (mut e, t) = evidence();
        e.own_write("PAYLEDGER_EVENTS", t, Some("batch is incomplete".into()));
        e.probe(t + INTERVAL, None);
        assert!(fails(&e.verdict(t + INTERVAL), "PAYLEDGER_EVENTS"));
        assert!(fails(&e.verdict(t + INTERVAL * 2), "batch is incomplete"));
        // No own write since: the probe decides again.
        assert_eq!(
            e.verdict(t + INTERVAL * OWN_WRITES_PRECEDENCE),
            Verdict::Holds
        );
    }

    #[test]
    fn an_own_success_outweighs_a_failing_probe_while_it_is_recent() {
        // The freed store that left only the probe's stream unable to write.
        let (mut e, t) = evidence();
        e.probe(t, Some("probe write: insufficient resources".into()));
        assert!(fails(&e.verdict(t), "probe write"));
        e.own_write("PAYLEDGER_EVENTS", t + INTERVAL / 2, None);
        e.probe(
            t + INTERVAL,
            Some("probe write: insufficient resources".into()),
        );
        assert_eq!(e.verdict(t + INTERVAL), Verdict::Holds);
        // An idle service is judged by its probe again.
        assert!(fails(
            &e.verdict(t + INTERVAL / 2 + INTERVAL * OWN_WRITES_PRECEDENCE),
            "probe write"
        ));
    }

    #[test]
    fn the_latest_own_outcome_of_each_stream_counts_and_any_failing_stream_fails() {
        let (mut e, t) = evidence();
        e.own_write("KV_exposure_daily", t, Some("no ack".into()));
        e.own_write("KV_projector_leases", t, None);
        assert!(fails(&e.verdict(t), "KV_exposure_daily"));
        // The same stream stored a later write: it holds again.
        e.own_write("KV_exposure_daily", t + INTERVAL / 2, None);
        assert_eq!(e.verdict(t + INTERVAL / 2), Verdict::Holds);
        // Another stream fails while one succeeds: not ready.
        e.own_write("KV_projector_leases", t + INTERVAL, Some("full".into()));
        e.own_write("KV_exposure_daily", t + INTERVAL, None);
        assert!(fails(&e.verdict(t + INTERVAL), "KV_projector_leases"));
    }

    #[test]
    fn an_own_outcome_decides_at_once_over_an_earlier_probe() {
        let (mut e, t) = evidence();
        e.probe(t, None);
        e.own_write("PAYLEDGER_EVENTS", t, Some("insufficient storage".into()));
        assert!(fails(&e.verdict(t), "insufficient storage"));
        e.own_write("PAYLEDGER_EVENTS", t + INTERVAL / 10, None);
        assert_eq!(e.verdict(t + INTERVAL / 10), Verdict::Holds);
    }

    #[test]
    fn storage_failures_count_and_bad_input_duplicates_and_fences_do_not() {
        for code in [10047, 10023, 10176, 10008, 10077] {
            let e = BatchError::Rejected {
                err_code: code,
                description: "x".into(),
            };
            assert!(cannot_store(&e), "{code}");
        }
        for code in [10201, 10071, 10158, 10210, 10054] {
            let e = BatchError::Rejected {
                err_code: code,
                description: "x".into(),
            };
            assert!(!cannot_store(&e), "{code}");
        }
        assert!(cannot_store(&BatchError::NoAck("no ack within 10s".into())));
        assert!(cannot_store(&BatchError::NoStream(
            "payledger.events.p1".into()
        )));
        assert!(!cannot_store(&BatchError::TooLarge(1001)));
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        assert!(cannot_store(&PublishError::new(PublishErrorKind::TimedOut)));
        assert!(!cannot_store(&PublishError::new(
            PublishErrorKind::WrongLastSequence
        )));
        assert!(!cannot_store(&PublishError::new(
            PublishErrorKind::MaxPayloadExceeded
        )));
        let api: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 500, "err_code": 10047, "description": "insufficient storage resources available"
        }))
        .unwrap();
        let wrapped = PublishError::with_source(PublishErrorKind::Other, api);
        assert!(cannot_store(&wrapped));
        use async_nats::jetstream::kv::{EntryError, EntryErrorKind};
        assert!(cannot_store(&EntryError::new(EntryErrorKind::TimedOut)));
        assert!(!cannot_store(&EntryError::new(EntryErrorKind::InvalidKey)));
        // Found through anyhow's chain as well.
        let any = anyhow::Error::new(wrapped).context("writing rows");
        assert!(cannot_store(&*any));
    }

    #[test]
    fn the_gauges_follow_own_writes() {
        let r = Readiness::new();
        r.write_not_stored("PAYLEDGER_EVENTS", "insufficient storage");
        assert!(!r.is_ready());
        assert_eq!(r.gauge.get(), 0);
        r.write_stored("PAYLEDGER_EVENTS");
        assert!(r.is_ready());
        assert_eq!(r.gauge.get(), 1);
        // A failure that is not JetStream's is not counted.
        r.write_failed(
            "PAYLEDGER_EVENTS",
            &BatchError::Rejected {
                err_code: 10201,
                description: "duplicate".into(),
            },
        );
        assert!(r.is_ready());
    }
}
