//! `payledger ingest FILE`: events, FX rates or risk tiers from CSV or JSON lines.
//!
//! The file is read one line at a time (at most `--max-line-bytes` held) and events
//! are sent as soon as a batch is full, or once the input pauses for
//! `--flush-after`, so memory does not grow with the file and a pipe is sent while
//! it is written. A line that does not decode is rejected on its own, with its
//! number, and the others go on; so does a record ingest rejects. With
//! `--all-or-nothing` the whole file is checked first and nothing is sent unless
//! every line decodes. The line formats are `payledger_proto::lines`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use payledger_proto::lines::{Decoder, Format, Kind, Line, LineError};
use payledger_proto::v1::{self, ingest_service_client::IngestServiceClient};
use payledger_server_common::config::parse_duration;

use super::{Endpoints, status_error};
use crate::connect::Conn;
use crate::render::{Exit, Output, Report};

pub const AFTER_HELP: &str = "Formats: JSON lines (one object per line) or CSV (a header row naming the \
columns, then one record per line); see the README's \"Files for payledger ingest\". \
Exit status: 0 every record accepted or a duplicate; 4 at least one line or record \
rejected (each is reported on stderr with its line number, field and reason, the \
others were sent; with --all-or-nothing none was); 1 the file could not be read or \
ingest could not be reached (what was sent before stays sent).";

#[derive(ValueEnum, Clone, Copy, Debug)]
enum KindArg {
    Events,
    Fx,
    Risk,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum FormatArg {
    Csv,
    Jsonl,
}

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    /// The file ("-" for stdin; a pipe is sent as it is written).
    file: PathBuf,
    /// What the file holds.
    #[arg(long, value_enum, default_value_t = KindArg::Events)]
    kind: KindArg,
    /// How its lines are written; by default JSON lines when the first line that
    /// is not blank starts with '{', CSV otherwise.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Events per Publish call, at most ingest's PAYLEDGER_MAX_BATCH_EVENTS (1000 by
    /// default); a batch is sent as soon as it is full.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Send a batch that is not full once no line has come for this long (a pipe
    /// or stdin that pauses).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    flush_after: std::time::Duration,
    /// Longest line accepted, in bytes; a longer line is rejected (and skipped
    /// without being held in memory).
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    max_line_bytes: u32,
    /// Read the whole file first and send nothing unless every line decodes (a
    /// regular file only, since it is read twice). Ingest may still reject a
    /// record for what only it knows, such as an event beyond the horizon.
    #[arg(long)]
    all_or_nothing: bool,
    /// Rejections listed in the summary (each is reported on stderr as it happens;
    /// the count is always complete).
    #[arg(long, default_value_t = 100)]
    list_rejections: usize,
    #[command(flatten)]
    endpoints: Endpoints,
}

/// One rejected line or record.
struct Rejection {
    line: u64,
    field: Option<String>,
    message: String,
    /// Ingest refused it (the line itself decoded).
    by_ingest: bool,
}

impl Rejection {
    fn of_line(line: u64, e: LineError) -> Self {
        Self {
            line,
            field: e.field,
            message: e.message,
            by_ingest: false,
        }
    }
}

/// What `payledger ingest` did with a file.
#[derive(Default)]
struct Summary {
    file: String,
    kind: &'static str,
    lines: u64,
    sent: u64,
    accepted: u64,
    duplicate: u64,
    rejected: u64,
    rejections: Vec<Rejection>,
    /// Most rejections kept for the summary (all are reported on stderr).
    listed: usize,
    /// `--all-or-nothing` found bad lines: nothing was sent.
    refused_whole_file: bool,
}

impl Summary {
    fn reject(&mut self, rejection: Rejection, bar: &ProgressBar) {
        bar.suspend(|| {
            eprintln!(
                "line {}: {}{}",
                rejection.line,
                if rejection.by_ingest {
                    "rejected by ingest: "
                } else {
                    ""
                },
                rejection.message
            )
        });
        self.rejected += 1;
        if self.rejections.len() < self.listed {
            self.rejections.push(rejection);
        }
    }
}

impl Report for Summary {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{}: {} lines, {} {} sent: {} accepted, {} duplicate, {} rejected{}",
            self.file,
            self.lines,
            self.sent,
            self.kind,
            self.accepted,
            self.duplicate,
            self.rejected,
            if self.refused_whole_file {
                " (--all-or-nothing: nothing sent)"
            } else {
                ""
            }
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "file": self.file, "kind": self.kind, "lines": self.lines, "sent": self.sent,
            "accepted": self.accepted, "duplicate": self.duplicate, "rejected": self.rejected,
            "all_or_nothing_refused": self.refused_whole_file,
            "rejections": self.rejections.iter().map(|r| serde_json::json!({
                "line": r.line, "field": r.field, "message": r.message, "by_ingest": r.by_ingest,
            })).collect::<Vec<_>>(),
            "rejections_listed": self.rejections.len(),
        })
    }

    fn exit(&self) -> Exit {
        if self.rejected > 0 {
            Exit::Rejected
        } else {
            Exit::Success
        }
    }
}

/// The lines of a file, each at most `max` bytes kept.
struct Lines {
    reader: Box<dyn BufRead + Send>,
    max: usize,
    number: u64,
    buffer: Vec<u8>,
}

/// One line read: its text, or why it cannot be.
enum Read<'a> {
    Text(&'a str),
    Bad(LineError),
}

impl Read<'_> {
    fn decode(self, decoder: &mut Decoder) -> Result<Option<Line>, LineError> {
        match self {
            Read::Text(text) => decoder.decode(text),
            Read::Bad(e) => Err(e),
        }
    }
}

impl Lines {
    fn open(file: &Path, max: usize) -> anyhow::Result<Lines> {
        let reader: Box<dyn BufRead + Send> = if file.as_os_str() == "-" {
            Box::new(std::io::BufReader::with_capacity(
                64 * 1024,
                std::io::stdin(),
            ))
        } else {
            let opened =
                std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            Box::new(std::io::BufReader::with_capacity(64 * 1024, opened))
        };
        Ok(Lines {
            reader,
            max,
            number: 0,
            buffer: Vec::new(),
        })
    }

    /// The next line and its number; None at the end of the file.
    fn next(&mut self) -> std::io::Result<Option<(u64, Read<'_>)>> {
        self.buffer.clear();
        let mut too_long = false;
        let mut read_any = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                if !read_any {
                    return Ok(None);
                }
                break;
            }
            read_any = true;
            let (chunk, ends) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            let used = chunk.len();
            if !too_long {
                if self.buffer.len() + used > self.max + 2 {
                    too_long = true;
                    self.buffer.clear();
                } else {
                    self.buffer.extend_from_slice(chunk);
                }
            }
            self.reader.consume(used);
            if ends {
                break;
            }
        }
        self.number += 1;
        let line = self.buffer.strip_suffix(b"\n").unwrap_or(&self.buffer);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let bad = |message: String| {
            Read::Bad(LineError {
                field: None,
                message,
                header: false,
            })
        };
        let text = if too_long || line.len() > self.max {
            bad(format!("longer than --max-line-bytes {}", self.max))
        } else {
            match std::str::from_utf8(line) {
                Ok(text) => Read::Text(text),
                Err(e) => bad(format!("not UTF-8 (byte {})", e.valid_up_to() + 1)),
            }
        };
        Ok(Some((self.number, text)))
    }
}

/// Ingest's client and the events waiting for a full batch, with their line numbers.
struct Sender {
    client: IngestServiceClient<Conn>,
    batch: usize,
    events: Vec<(u64, v1::Event)>,
}

impl Sender {
    async fn flush(&mut self, summary: &mut Summary, bar: &ProgressBar) -> anyhow::Result<()> {
        if self.events.is_empty() {
            return Ok(());
        }
        let (numbers, events): (Vec<u64>, Vec<v1::Event>) = self.events.drain(..).unzip();
        let response = self
            .client
            .publish(v1::PublishRequest { events })
            .await
            .map_err(status_error)?
            .into_inner();
        anyhow::ensure!(
            response.results.len() == numbers.len(),
            "ingest answered {} results for {} events",
            response.results.len(),
            numbers.len()
        );
        summary.sent += numbers.len() as u64;
        for (line, result) in numbers.into_iter().zip(response.results) {
            match result.outcome {
                Some(v1::publish_result::Outcome::Accepted(_)) => summary.accepted += 1,
                Some(v1::publish_result::Outcome::Duplicate(_)) => summary.duplicate += 1,
                Some(v1::publish_result::Outcome::Rejected(r)) => summary.reject(
                    Rejection {
                        line,
                        field: (!r.field.is_empty()).then_some(r.field),
                        message: r.message,
                        by_ingest: true,
                    },
                    bar,
                ),
                None => anyhow::bail!("ingest answered line {line} without an outcome"),
            }
        }
        bar.set_position(summary.sent);
        Ok(())
    }

    async fn send(
        &mut self,
        number: u64,
        line: Line,
        summary: &mut Summary,
        bar: &ProgressBar,
    ) -> anyhow::Result<()> {
        let record = match line {
            Line::Event(event) => {
                self.events.push((number, event));
                if self.events.len() >= self.batch {
                    self.flush(summary, bar).await?;
                }
                return Ok(());
            }
            Line::Fx(fx) => v1::publish_dimension_request::Record::Fx(fx),
            Line::Risk(risk) => v1::publish_dimension_request::Record::Risk(risk),
        };
        summary.sent += 1;
        bar.set_position(summary.sent);
        match self
            .client
            .publish_dimension(v1::PublishDimensionRequest {
                record: Some(record),
            })
            .await
        {
            Ok(answer) if answer.get_ref().duplicate => summary.duplicate += 1,
            Ok(_) => summary.accepted += 1,
            // The record's own fault: the next line may be fine.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::OutOfRange
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::AlreadyExists
                ) =>
            {
                summary.reject(
                    Rejection {
                        line: number,
                        field: None,
                        message: status.message().to_string(),
                        by_ingest: true,
                    },
                    bar,
                )
            }
            Err(status) => return Err(status_error(status)),
        }
        Ok(())
    }
}

fn decoder(args: &IngestArgs) -> Decoder {
    let kind = match args.kind {
        KindArg::Events => Kind::Events,
        KindArg::Fx => Kind::Fx,
        KindArg::Risk => Kind::Risk,
    };
    let format = args.format.map(|f| match f {
        FormatArg::Csv => Format::Csv,
        FormatArg::Jsonl => Format::JsonLines,
    });
    Decoder::new(kind, format)
}

/// A refused CSV header ends the file: no later line can be read.
fn header_error(number: u64, error: &LineError) -> anyhow::Error {
    anyhow::anyhow!("line {number}: the CSV header: {error}; nothing after it was sent")
}

/// Every line decoded, nothing sent: the rejections, if any.
fn check_whole_file(args: &IngestArgs, summary: &mut Summary) -> anyhow::Result<()> {
    let mut lines = Lines::open(&args.file, args.max_line_bytes as usize)?;
    let mut decoder = decoder(args);
    let bar = ProgressBar::hidden();
    while let Some((number, read)) = lines.next()? {
        match read.decode(&mut decoder) {
            Ok(_) => {}
            Err(e) if e.header => return Err(header_error(number, &e)),
            Err(e) => summary.reject(Rejection::of_line(number, e), &bar),
        }
    }
    summary.lines = lines.number;
    Ok(())
}

/// A record decoded from line `number`, or why that line was refused.
struct Decoded {
    number: u64,
    result: Result<Line, LineError>,
}

/// Reads and decodes the file on a thread of its own, so that a read that blocks
/// (a pipe, stdin) holds up neither the calls in flight nor the flush of a batch
/// that waits; at most `ahead` decoded lines wait to be sent. The thread returns
/// the number of lines read. It is not joined on an error: the process ends with
/// it even while it waits for input.
fn spawn_reader(
    args: &IngestArgs,
    ahead: usize,
) -> anyhow::Result<(
    tokio::sync::mpsc::Receiver<Decoded>,
    std::thread::JoinHandle<anyhow::Result<u64>>,
)> {
    let mut lines = Lines::open(&args.file, args.max_line_bytes as usize)?;
    let mut decoder = decoder(args);
    let (send, receive) = tokio::sync::mpsc::channel(ahead.max(1));
    let reader = std::thread::Builder::new()
        .name("ingest-file".into())
        .spawn(move || {
            while let Some((number, read)) = lines.next()? {
                let result = match read.decode(&mut decoder) {
                    Ok(None) => continue,
                    Ok(Some(line)) => Ok(line),
                    Err(e) => Err(e),
                };
                if send.blocking_send(Decoded { number, result }).is_err() {
                    // The sending side stopped (an error it reports itself).
                    break;
                }
            }
            Ok(lines.number)
        })?;
    Ok((receive, reader))
}

pub async fn run(args: IngestArgs, out: &Output) -> anyhow::Result<Exit> {
    let mut summary = Summary {
        file: args.file.display().to_string(),
        kind: match args.kind {
            KindArg::Events => "events",
            KindArg::Fx => "FX rates",
            KindArg::Risk => "risk tiers",
        },
        listed: args.list_rejections,
        ..Summary::default()
    };
    if args.all_or_nothing {
        let regular = args.file.as_os_str() != "-"
            && std::fs::metadata(&args.file)
                .with_context(|| format!("reading {}", args.file.display()))?
                .is_file();
        anyhow::ensure!(
            regular,
            "--all-or-nothing reads the file twice, so it needs a regular file, not {}",
            args.file.display()
        );
        check_whole_file(&args, &mut summary)?;
        if summary.rejected > 0 {
            summary.refused_whole_file = true;
            return out.emit(&summary);
        }
    }
    // Only the batch not yet sent and the lines the reader has decoded ahead (at
    // most a batch) are held; what ingest answered is counted, so memory does not
    // grow with the file.
    let (mut decoded, reader) = spawn_reader(&args, args.batch as usize)?;
    let mut sender = Sender {
        client: IngestServiceClient::new(
            crate::connect::connect(&args.endpoints.ingest_url, "ingest").await?,
        ),
        batch: args.batch as usize,
        events: Vec::with_capacity(args.batch as usize),
    };
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} ingesting: {pos} records sent ({per_sec})")
            .expect("valid template"),
    );
    loop {
        let next = if sender.events.is_empty() {
            decoded.recv().await
        } else {
            // A pipe that goes quiet still gets its last lines sent.
            match tokio::time::timeout(args.flush_after, decoded.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    sender.flush(&mut summary, &bar).await?;
                    continue;
                }
            }
        };
        let Some(Decoded { number, result }) = next else {
            break;
        };
        match result {
            Ok(line) => sender.send(number, line, &mut summary, &bar).await?,
            Err(e) if e.header => return Err(header_error(number, &e)),
            Err(e) => summary.reject(Rejection::of_line(number, e), &bar),
        }
    }
    sender.flush(&mut summary, &bar).await?;
    bar.finish_and_clear();
    summary.lines = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the file's reader panicked"))??;
    out.emit(&summary)
}
