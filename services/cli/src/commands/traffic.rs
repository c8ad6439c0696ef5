//! `payledger gen`: generated traffic, to a JSON-lines file or straight to ingest.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use payledger_proto::v1::{self, ingest_service_client::IngestServiceClient};
use payledger_semantics::Day;

use super::{Endpoints, now_us, status_error};
use crate::generate::{GenConfig, Generator};
use crate::render::{Exit, Output, Report};

#[derive(clap::Args, Debug)]
pub struct GenArgs {
    #[command(flatten)]
    config: GenConfig,
    /// Write events as JSON lines to this file ("-" for stdout).
    #[arg(long, conflicts_with = "send")]
    out: Option<PathBuf>,
    /// Send to the ingest service instead of writing a file.
    #[arg(long)]
    send: bool,
    /// Events per Publish call.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Events per second at most (0: as fast as ingest answers).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[command(flatten)]
    endpoints: Endpoints,
}

pub async fn run(args: GenArgs, out: &Output) -> anyhow::Result<Exit> {
    let count = args.config.events;
    let mut generator = Generator::new(args.config);
    if args.send {
        let tally = send_generated(
            &mut generator,
            count,
            args.batch,
            args.rate,
            &args.endpoints.ingest_url,
        )
        .await?;
        return out.emit(&tally);
    }
    // The events are the output, JSON lines either way.
    let mut writer: Box<dyn Write> = match args.out.as_deref() {
        None => Box::new(std::io::stdout().lock()),
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdout().lock()),
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
    };
    let now = now_us();
    for _ in 0..count {
        let event = generator.next_event(now);
        writeln!(writer, "{}", payledger_proto::lines::event_to_json(&event))?;
    }
    writer.flush()?;
    Ok(Exit::Success)
}

/// What ingest answered for generated events.
#[derive(Default, Debug)]
pub struct Tally {
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: u64,
    /// Highest accepted sequence per merchant, to know when rows have caught up.
    pub last_seq: HashMap<String, u64>,
}

impl Report for Tally {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{} accepted, {} duplicate, {} rejected",
            self.accepted, self.duplicate, self.rejected
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "accepted": self.accepted, "duplicate": self.duplicate, "rejected": self.rejected,
        })
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Sends the generator's FX rates and risk tiers, then `count` events in calls of
/// `batch`, at most `rate` a second.
pub async fn send_generated(
    generator: &mut Generator,
    count: usize,
    batch: usize,
    rate: u64,
    ingest_url: &str,
) -> anyhow::Result<Tally> {
    let mut client = IngestServiceClient::new(crate::connect::connect(ingest_url, "ingest").await?);
    let today = Day::of_micros(now_us());
    let yesterday = Day(today.0 - 1).to_string();
    for fx in generator.fx_records(&yesterday) {
        client
            .publish_dimension(v1::PublishDimensionRequest {
                record: Some(v1::publish_dimension_request::Record::Fx(fx)),
            })
            .await
            .map_err(status_error)?;
    }
    for risk in generator.risk_records(&today.to_string()) {
        client
            .publish_dimension(v1::PublishDimensionRequest {
                record: Some(v1::publish_dimension_request::Record::Risk(risk)),
            })
            .await
            .map_err(status_error)?;
    }
    let bar = progress(count as u64, "sending");
    let mut tally = Tally::default();
    let started = std::time::Instant::now();
    let mut sent = 0usize;
    while sent < count {
        let n = batch.max(1).min(count - sent);
        let events = generator.batch(n, now_us());
        let response = client
            .publish(v1::PublishRequest {
                events: events.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for (event, result) in events.iter().zip(response.results) {
            match result.outcome {
                Some(v1::publish_result::Outcome::Accepted(a)) => {
                    tally.accepted += 1;
                    let seq = tally.last_seq.entry(event.merchant_id.clone()).or_default();
                    *seq = (*seq).max(a.sequence);
                }
                Some(v1::publish_result::Outcome::Duplicate(_)) => tally.duplicate += 1,
                Some(v1::publish_result::Outcome::Rejected(r)) => {
                    tally.rejected += 1;
                    bar.suspend(|| eprintln!("rejected {}: {}", event.event_id, r.message));
                }
                None => anyhow::bail!("ingest answered an event without an outcome"),
            }
        }
        sent += n;
        bar.set_position(sent as u64);
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    bar.finish_and_clear();
    Ok(tally)
}
