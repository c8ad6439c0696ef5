//! Ingest's side of the failure contract (docs/failure-contract.md), against the real
//! binary: a retry after the client gave up changes nothing, and bad input gets a
//! precise status, per event or for the whole call, and is never half applied.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use payledger_cli::generate::{GenConfig, Generator};
use payledger_e2e::{
    AcceptedLog, Stack, assert_converges, ingest_client, now_us, query_client, read_log,
    stream_messages,
};
use payledger_ingest::message_id;
use payledger_proto::fact_from_event;
use payledger_proto::v1::{
    self, EventKind, publish_dimension_request::Record as DimRecord, publish_result::Outcome,
};
use payledger_semantics::{MICROS_PER_DAY, Settings};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const MINUTE_US: i64 = 60_000_000;

/// Ingest with `ingest_args`, projector and query, heartbeats off so that the log
/// holds only what the test sends.
async fn stack(ingest_args: &[&str]) -> anyhow::Result<Stack> {
    Stack::builder()
        .ingest(ingest_args)
        .projector(&["--checkpoint-interval", "500ms"])
        .query(&[])
        .start()
        .await
}

fn sequence_of(outcome: &Outcome) -> Option<u64> {
    match outcome {
        Outcome::Accepted(a) => Some(a.sequence),
        Outcome::Duplicate(d) => Some(d.sequence),
        Outcome::Rejected(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_retry_after_timeout_changes_nothing() -> anyhow::Result<()> {
    let stack = stack(&[]).await?;
    let (h, ingest, query) = (&stack.h, &stack.ingest, stack.query());
    let mut client = ingest_client(&ingest.url()).await?;

    let mut traffic = Generator::new(GenConfig {
        seed: 11,
        merchants: 20,
        events: 200,
        duplicate_pct: 5.0,
        conflict_pct: 3.0,
        late_pct: 10.0,
        correction_pct: 3.0,
        ..GenConfig::default()
    });
    let events = traffic.batch(200, now_us());
    let request = v1::PublishRequest {
        events: events.clone(),
    };
    // Distinct (identity, content) among the events: what the log must hold.
    let distinct: BTreeSet<String> = events
        .iter()
        .map(|e| fact_from_event(e).map(|f| message_id(&f)))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("the generator made an invalid event: {e}"))?;
    assert!(
        distinct.len() < events.len(),
        "the batch holds exact resends"
    );

    // The client gives up at once: a 1 µs deadline, enforced by the server...
    let mut hurried = Request::new(request.clone());
    hurried.set_timeout(Duration::from_micros(1));
    match client.publish(hurried).await {
        Ok(_) => anyhow::bail!("a call with a 1 µs deadline was answered OK"),
        Err(s) => assert!(
            matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled),
            "a 1 µs deadline ends the call with DEADLINE_EXCEEDED or CANCELLED, got {s:?}"
        ),
    }
    // ...then dropped by the client after a few milliseconds, longer each time,
    // until an abandoned call had its batch stored: the answer was lost, the
    // events were not. (A call that completes in time ends the search.)
    let mut answer_lost = false;
    for deadline_ms in [1, 2, 3, 5, 8, 13, 21, 34, 55, 89] {
        let completed = tokio::time::timeout(
            Duration::from_millis(deadline_ms),
            client.publish(Request::new(request.clone())),
        )
        .await
        .is_ok();
        // Let whatever the server still does with the abandoned call settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stored = stream_messages(&h.nats.url()).await?;
        eprintln!(
            "client deadline {deadline_ms} ms: {}; messages in the stream: {stored}",
            if completed { "answered" } else { "gave up" }
        );
        assert!(
            stored == 0 || stored == distinct.len() as u64,
            "{stored} messages stored: an atomic batch is stored whole or not at all ({} distinct events)",
            distinct.len()
        );
        if completed || stored > 0 {
            answer_lost = !completed;
            break;
        }
    }
    eprintln!(
        "retrying after {}",
        if answer_lost {
            "calls given up on whose batch was stored: the answer was lost, the events were not"
        } else {
            "calls that stored nothing or were answered"
        }
    );

    // Two retries of the identical request with a normal deadline.
    let mut retries = Vec::new();
    for attempt in 1..=2 {
        let started = std::time::Instant::now();
        let mut normal = Request::new(request.clone());
        normal.set_timeout(Duration::from_secs(30));
        let results = client.publish(normal).await?.into_inner().results;
        assert_eq!(
            results.len(),
            events.len(),
            "retry {attempt}: one result per event"
        );
        let outcomes: Vec<Outcome> = results
            .into_iter()
            .map(|r| r.outcome.expect("an outcome"))
            .collect();
        for (i, o) in outcomes.iter().enumerate() {
            assert!(
                sequence_of(o).is_some(),
                "retry {attempt}, event {i}: Accepted or Duplicate expected, got {o:?}"
            );
        }
        eprintln!("retry {attempt} answered in {:?}", started.elapsed());
        retries.push(outcomes);
    }
    let first: Vec<u64> = retries[0].iter().filter_map(sequence_of).collect();
    let second: Vec<u64> = retries[1].iter().filter_map(sequence_of).collect();
    assert_eq!(
        first, second,
        "both retries answer every event with the same sequence"
    );
    assert!(
        retries[1]
            .iter()
            .all(|o| matches!(o, Outcome::Duplicate(_))),
        "the second retry finds every event in the log"
    );
    let sequences: BTreeSet<u64> = first.iter().copied().collect();
    assert_eq!(
        sequences.len(),
        distinct.len(),
        "one sequence per distinct event"
    );
    let log = read_log(&h.nats.url()).await?;
    assert_eq!(
        stream_messages(&h.nats.url()).await?,
        distinct.len() as u64,
        "the stream holds each distinct event exactly once"
    );
    assert_eq!(
        log.iter().map(|e| e.seq).collect::<BTreeSet<_>>(),
        sequences,
        "the log holds exactly the answered sequences"
    );

    // Each answered sequence holds the event it answers for; Accepted answers carry
    // the ingest_time stored with it.
    let by_seq: BTreeMap<u64, &payledger_e2e::LogEntry> = log.iter().map(|e| (e.seq, e)).collect();
    let mut accepted = AcceptedLog::default();
    for (i, (event, outcome)) in events.iter().zip(&retries[0]).enumerate() {
        let seq = sequence_of(outcome).expect("checked above");
        let entry = by_seq[&seq];
        let stored = match &entry.record.body {
            Some(v1::log_record::Body::Fact(f)) => f,
            other => anyhow::bail!("sequence {seq} holds {other:?}, not event {i}"),
        };
        let want = message_id(&fact_from_event(event).map_err(|e| anyhow::anyhow!("{e}"))?);
        let got = message_id(&fact_from_event(stored).map_err(|e| anyhow::anyhow!("{e}"))?);
        assert_eq!(
            got, want,
            "event {i} answered with sequence {seq}, which holds {stored:?}"
        );
        if let Outcome::Accepted(a) = outcome {
            assert_eq!(
                a.ingest_time_us, entry.record.ingest_time_us,
                "event {i}: the ingest_time answered is the one stored"
            );
        }
        let record = entry.to_record()?;
        accepted.records.entry(seq).or_insert(record);
    }
    let oracle = accepted.fold(Settings::default())?;
    assert!(
        oracle.daily_rows().iter().map(|r| r.conflicts).sum::<u64>() > 0,
        "the batch holds conflicting events"
    );
    let mut q = query_client(&query.url()).await?;
    let started = std::time::Instant::now();
    assert_converges(&mut q, &oracle, Duration::from_secs(30)).await?;
    eprintln!("converged in {:?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------------------
// Bad input.

/// A gRPC codec that sends and receives raw bytes, to put a body that is no
/// protobuf on the wire.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Calls IngestService/Publish with `body` as the request message, verbatim.
async fn raw_publish(url: &str, body: Bytes) -> anyhow::Result<Result<Bytes, Status>> {
    let channel = Channel::from_shared(url.to_string())?.connect().await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    Ok(grpc
        .unary(
            Request::new(body),
            PathAndQuery::from_static("/payledger.v1.IngestService/Publish"),
            RawCodec,
        )
        .await
        .map(tonic::Response::into_inner))
}

fn valid(id: &str, now: i64) -> v1::Event {
    v1::Event {
        event_id: id.to_string(),
        merchant_id: "m-bad:1".to_string(),
        kind: EventKind::PaymentCaptured as i32,
        amount_minor: 1_000,
        currency: "EUR".to_string(),
        event_time_us: now - MINUTE_US,
        corrects_event_id: String::new(),
    }
}

/// One bad event and the rejection it must get.
struct Bad {
    what: &'static str,
    event: v1::Event,
    code: Code,
    field: &'static str,
    /// A piece of the message that must appear in it.
    says: &'static str,
}

/// Every class of bad event, each with the rejection it must get.
#[rustfmt::skip]
fn bad_events(now: i64) -> Vec<Bad> {
    let with = |what: &'static str, f: &dyn Fn(&mut v1::Event), code: Code, field: &'static str, says: &'static str| {
        let mut event = valid(&format!("ev-bad-{}", what.replace(' ', "-")), now);
        f(&mut event);
        Bad { what, event, code, field, says }
    };
    let invalid = Code::InvalidArgument;
    vec![
        with("empty event_id", &|e| e.event_id.clear(), invalid, "event_id", "required"),
        with("kind unspecified", &|e| e.kind = EventKind::Unspecified as i32, invalid, "kind", "required"),
        with("kind unknown", &|e| e.kind = 42, invalid, "kind", "unknown value 42"),
        with("empty merchant_id", &|e| e.merchant_id.clear(), invalid, "merchant_id", "required"),
        with("space in event_id", &|e| e.event_id = "ev 1".into(), invalid, "event_id", "' '"),
        with("slash in event_id", &|e| e.event_id = "ev/1".into(), invalid, "event_id", "'/'"),
        with("unicode in merchant_id", &|e| e.merchant_id = "m-é".into(), invalid, "merchant_id", "[A-Za-z0-9._:-]"),
        with("event_id of 129 bytes", &|e| e.event_id = "e".repeat(129), invalid, "event_id", "1-128 bytes"),
        with("merchant_id of 65 bytes", &|e| e.merchant_id = "m".repeat(65), invalid, "merchant_id", "1-64 bytes"),
        with("lowercase currency", &|e| e.currency = "usd".into(), invalid, "currency", "three capital letters"),
        with("four-letter currency", &|e| e.currency = "EURO".into(), invalid, "currency", "three capital letters"),
        with("unknown currency", &|e| e.currency = "XYZ".into(), invalid, "currency", "not an active ISO 4217"),
        with("empty currency", &|e| e.currency.clear(), invalid, "currency", "required"),
        with("zero amount", &|e| e.amount_minor = 0, invalid, "amount_minor", "must be > 0"),
        with("negative amount", &|e| { e.kind = EventKind::RefundIssued as i32; e.amount_minor = -5 }, invalid, "amount_minor", "must be > 0"),
        with("correction without target", &|e| { e.kind = EventKind::Correction as i32; e.amount_minor = -5 }, invalid, "corrects_event_id", "must name the event"),
        with("zero correction", &|e| { e.kind = EventKind::Correction as i32; e.amount_minor = 0; e.corrects_event_id = "ev-x".into() }, invalid, "amount_minor", "non-zero"),
        with("target on a payment", &|e| e.corrects_event_id = "ev-x".into(), invalid, "corrects_event_id", "only a CORRECTION"),
        with("bad correction target", &|e| { e.kind = EventKind::Correction as i32; e.corrects_event_id = "ev x".into() }, invalid, "corrects_event_id", "' '"),
        with("correction of itself", &|e| { e.kind = EventKind::Correction as i32; e.corrects_event_id = e.event_id.clone() }, invalid, "corrects_event_id", "cannot correct itself"),
        with("missing event_time", &|e| e.event_time_us = 0, invalid, "event_time_us", "required"),
        with("event_time 10 min ahead", &|e| e.event_time_us = now + 10 * MINUTE_US, invalid, "event_time_us", "ahead of ingest's clock"),
        with("event_time beyond the horizon", &|e| e.event_time_us = now - 36 * MICROS_PER_DAY, Code::OutOfRange, "event_time_us", "CORRECTION"),
    ]
}

/// Every class of bad dimension record: (what, record, the field its message names).
#[rustfmt::skip]
fn bad_dimensions() -> Vec<(&'static str, Option<DimRecord>, &'static str)> {
    let fx = |currency: &str, rate: &str, date: &str, version: i32| {
        Some(DimRecord::Fx(v1::FxRate { currency: currency.into(), rate: rate.into(), effective_date: date.into(), version }))
    };
    let risk = |merchant: &str, bps: i32, version: i32| {
        Some(DimRecord::Risk(v1::RiskTier { merchant_id: merchant.into(), tier: "high".into(), reserve_bps: bps, effective_date: "2026-01-01".into(), version }))
    };
    vec![
        ("no record", None, "record"),
        ("rate not a number", fx("EUR", "abc", "2026-01-01", 1), "rate"),
        ("negative rate", fx("EUR", "-1.08", "2026-01-01", 1), "rate"),
        ("zero rate", fx("EUR", "0.000", "2026-01-01", 1), "rate"),
        ("rate with a comma", fx("EUR", "1,08", "2026-01-01", 1), "rate"),
        ("rate ending in a point", fx("EUR", "1.", "2026-01-01", 1), "rate"),
        ("rate of 19 decimals", fx("EUR", "1.0000000000000000001", "2026-01-01", 1), "rate"),
        ("empty rate", fx("EUR", "", "2026-01-01", 1), "rate"),
        ("fx currency lowercase", fx("eur", "1.08", "2026-01-01", 1), "currency"),
        ("fx date", fx("EUR", "1.08", "2026-13-01", 1), "effective_date"),
        ("fx version 0", fx("EUR", "1.08", "2026-01-01", 0), "version"),
        ("fx for the reporting currency", fx("USD", "1", "2026-01-01", 1), "currency"),
        ("fx in year 0000", fx("EUR", "1.08", "0000-01-01", 1), "effective_date"),
        ("fx in year 9999", fx("EUR", "1.08", "9999-12-31", 1), "effective_date"),
        ("reserve_bps 10001", risk("m-bad:1", 10_001, 1), "reserve_bps"),
        ("reserve_bps -1", risk("m-bad:1", -1, 1), "reserve_bps"),
        ("risk merchant", risk("m bad", 100, 1), "merchant_id"),
        ("risk version 0", risk("m-bad:1", 100, 0), "version"),
    ]
}

fn check_rejected(what: &str, result: &v1::PublishResult, code: Code, field: &str, says: &str) {
    match &result.outcome {
        Some(Outcome::Rejected(r)) => {
            assert_eq!(
                r.code,
                code as i32,
                "{what}: code {} ({:?}), expected {code:?}; message: {}",
                r.code,
                Code::from_i32(r.code),
                r.message
            );
            assert_eq!(r.field, field, "{what}: field; message: {}", r.message);
            assert!(
                r.message.starts_with(&format!("{field}:")),
                "{what}: the message {:?} does not start with the field {field}",
                r.message
            );
            assert!(
                r.message.contains(says),
                "{what}: the message {:?} does not say {says:?}",
                r.message
            );
        }
        other => panic!("{what}: expected Rejected({code:?}, {field}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_status_and_changes_nothing() -> anyhow::Result<()> {
    const MAX_REQUEST_BYTES: usize = 16 * 1024;
    let stack = stack(&[
        "--max-batch-events",
        "10",
        "--max-request-bytes",
        &MAX_REQUEST_BYTES.to_string(),
    ])
    .await?;
    let (h, ingest, query) = (&stack.h, &stack.ingest, stack.query());
    let mut client = ingest_client(&ingest.url()).await?;
    let now = now_us();

    // Each class alone, one call each...
    let bad = bad_events(now);
    for b in &bad {
        let results = client
            .publish(v1::PublishRequest {
                events: vec![b.event.clone()],
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}: the call failed whole: {s:?}", b.what))?
            .into_inner()
            .results;
        assert_eq!(results.len(), 1, "{}", b.what);
        check_rejected(b.what, &results[0], b.code, b.field, b.says);
    }
    // ...and all of them in calls of ten, answered in request order.
    for chunk in bad.chunks(10) {
        let results = client
            .publish(v1::PublishRequest {
                events: chunk.iter().map(|b| b.event.clone()).collect(),
            })
            .await?
            .into_inner()
            .results;
        assert_eq!(results.len(), chunk.len());
        for (b, r) in chunk.iter().zip(&results) {
            check_rejected(b.what, r, b.code, b.field, b.says);
        }
    }

    // An event of 10 KB, under --max-request-bytes: decoded, then rejected for its id.
    let mut long = valid("x", now);
    long.event_id = "e".repeat(10 * 1024);
    let results = client
        .publish(v1::PublishRequest { events: vec![long] })
        .await?
        .into_inner()
        .results;
    check_rejected(
        "event_id of 10 KB",
        &results[0],
        Code::InvalidArgument,
        "event_id",
        "1-128 bytes",
    );

    // Whole-call refusals. More than --max-batch-events (valid events, even):
    let eleven: Vec<v1::Event> = (0..11).map(|i| valid(&format!("ev-ok-{i}"), now)).collect();
    let status = client
        .publish(v1::PublishRequest { events: eleven })
        .await
        .expect_err("11 events with --max-batch-events 10 are refused whole");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("11") && status.message().contains("--max-batch-events"),
        "the message names the count and the flag: {status:?}"
    );

    // A request larger than --max-request-bytes (one valid-looking event of 20 KB).
    let mut huge = valid("x", now);
    huge.merchant_id = "m".repeat(20 * 1024);
    let request = v1::PublishRequest { events: vec![huge] };
    assert!(request.encoded_len() > MAX_REQUEST_BYTES);
    let status = client
        .publish(request)
        .await
        .expect_err("a request over --max-request-bytes is refused whole");
    // INVALID_ARGUMENT, as ingest.proto promises for a call over a limit, naming
    // the limit and the setting that raises it.
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&MAX_REQUEST_BYTES.to_string())
            && status.message().contains("--max-request-bytes"),
        "the message names the limit and the setting: {status:?}"
    );

    // Bodies that are no PublishRequest, through a raw bytes codec. First, the
    // codec itself works: an empty request is a valid (empty) PublishRequest.
    let empty = raw_publish(&ingest.url(), Bytes::new())
        .await?
        .map_err(|s| anyhow::anyhow!("an empty PublishRequest sent raw: {s:?}"))?;
    assert_eq!(
        v1::PublishResponse::decode(empty)?,
        v1::PublishResponse::default(),
        "no events, no results"
    );
    for (what, garbage) in [
        ("truncated length", &b"\x0a\xff"[..]),
        (
            "over-long varint",
            &b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"[..],
        ),
        ("text", &b"this is not a protobuf message"[..]),
        ("events as a varint", &b"\x08\x01"[..]),
        ("event with a broken field", &b"\x0a\x03\x0a\x05ab"[..]),
    ] {
        match raw_publish(&ingest.url(), Bytes::from_static(garbage)).await? {
            Ok(body) => panic!("{what}: garbage was answered OK: {body:?}"),
            // The client sent it wrong: INVALID_ARGUMENT, not the server's fault.
            Err(s) => {
                assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
                assert!(
                    s.message().contains("payledger.v1.IngestService/Publish"),
                    "{what}: the message names the method: {s:?}"
                );
            }
        }
    }

    // Dimension records: refused whole with INVALID_ARGUMENT naming the field.
    let bad_dims = bad_dimensions();
    for (what, record, field) in bad_dims {
        let status = client
            .publish_dimension(v1::PublishDimensionRequest { record })
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(field),
            "{what}: the message does not name {field}: {status:?}"
        );
    }

    // Nothing of it reached the log, and no rows exist.
    assert_eq!(
        stream_messages(&h.nats.url()).await?,
        0,
        "bad input left messages in the stream: {:?}",
        read_log(&h.nats.url()).await?
    );
    let mut q = query_client(&query.url()).await?;

    // The pipeline was live all along: one valid event, of the merchant the bad
    // input named, sent after it. Once it is served the projector has read past
    // everything before it, and every row served (daily and that merchant's
    // current) must be the fold of that one event alone.
    let mut log = AcceptedLog::default();
    log.publish(&mut client, vec![valid("ev-ok", now)]).await?;
    assert_eq!(log.records.len(), 1);
    assert_converges(
        &mut q,
        &log.fold(Settings::default())?,
        Duration::from_secs(20),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_accepts_the_valid_and_rejects_the_invalid_in_request_order()
-> anyhow::Result<()> {
    let stack = stack(&[]).await?;
    let (h, ingest, query) = (&stack.h, &stack.ingest, stack.query());
    let mut client = ingest_client(&ingest.url()).await?;
    let now = now_us();

    let a = valid("ev-a", now);
    let mut b = valid("ev-b", now);
    b.kind = EventKind::RefundIssued as i32;
    b.amount_minor = 300;
    let mut c = valid("ev-c", now);
    c.kind = EventKind::Correction as i32;
    c.amount_minor = -250;
    c.corrects_event_id = "ev-a".into();
    let mut lowercase = valid("ev-lower", now);
    lowercase.currency = "eur".into();
    let mut zero = valid("ev-zero", now);
    zero.amount_minor = 0;
    let mut future = valid("ev-future", now);
    future.event_time_us = now + 10 * MINUTE_US;

    let events = vec![
        lowercase.clone(),
        a.clone(),
        zero.clone(),
        b.clone(),
        a.clone(),
        future,
        c.clone(),
    ];
    let results = client
        .publish(v1::PublishRequest {
            events: events.clone(),
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(results.len(), events.len());
    check_rejected(
        "lowercase currency",
        &results[0],
        Code::InvalidArgument,
        "currency",
        "three capital letters",
    );
    check_rejected(
        "zero amount",
        &results[2],
        Code::InvalidArgument,
        "amount_minor",
        "must be > 0",
    );
    check_rejected(
        "future",
        &results[5],
        Code::InvalidArgument,
        "event_time_us",
        "ahead",
    );
    let seq = |i: usize| match &results[i].outcome {
        Some(Outcome::Accepted(x)) => x.sequence,
        other => panic!("event {i}: expected Accepted, got {other:?}"),
    };
    let (sa, sb, sc) = (seq(1), seq(3), seq(6));
    assert!(
        sa < sb && sb < sc,
        "accepted events get sequences in request order: {sa} {sb} {sc}"
    );
    assert_eq!(
        results[4].outcome,
        Some(Outcome::Duplicate(v1::Duplicate { sequence: sa })),
        "the repeat of ev-a answers with its sequence"
    );

    // The log holds exactly the three valid events, in request order.
    let stored: Vec<(u64, String)> = read_log(&h.nats.url())
        .await?
        .into_iter()
        .map(|e| match e.record.body {
            Some(v1::log_record::Body::Fact(f)) => (e.seq, f.event_id),
            other => (e.seq, format!("{other:?}")),
        })
        .collect();
    assert_eq!(
        stored,
        vec![
            (sa, "ev-a".to_string()),
            (sb, "ev-b".to_string()),
            (sc, "ev-c".to_string())
        ]
    );

    let mut log = AcceptedLog::default();
    log.record(&events, &results)?;
    assert_eq!((log.records.len(), log.duplicates, log.rejected), (3, 1, 3));
    let mut q = query_client(&query.url()).await?;
    assert_converges(
        &mut q,
        &log.fold(Settings::default())?,
        Duration::from_secs(20),
    )
    .await
}

/// Publishes one dimension record: its sequence and whether it was a duplicate, or
/// the status it was refused with.
async fn publish_dimension(
    client: &mut v1::ingest_service_client::IngestServiceClient<Channel>,
    record: DimRecord,
) -> anyhow::Result<Result<(u64, bool), Status>> {
    Ok(client
        .publish_dimension(v1::PublishDimensionRequest {
            record: Some(record),
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.sequence, r.duplicate)
        }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dimension_key_published_again_with_other_content_is_refused() -> anyhow::Result<()> {
    let mut stack = Stack::builder().start().await?;
    let mut client = stack.ingest_client().await?;
    let fx = |rate: &str, version| {
        DimRecord::Fx(v1::FxRate {
            currency: "EUR".into(),
            rate: rate.into(),
            effective_date: "2026-11-25".into(),
            version,
        })
    };
    let risk = |tier: &str, reserve_bps, version| {
        DimRecord::Risk(v1::RiskTier {
            merchant_id: "m-dims:1".into(),
            tier: tier.into(),
            reserve_bps,
            effective_date: "2026-11-25".into(),
            version,
        })
    };
    let (fx_seq, duplicate) = publish_dimension(&mut client, fx("1.10", 1)).await??;
    assert!(!duplicate);
    let (risk_seq, duplicate) = publish_dimension(&mut client, risk("gold", 250, 1)).await??;
    assert!(!duplicate);

    // The same process, then a new one that knows the keys from the log alone.
    for round in ["the first ingest", "a restarted ingest"] {
        assert_eq!(
            publish_dimension(&mut client, fx("1.10", 1)).await??,
            (fx_seq, true),
            "{round}: the same FX record again"
        );
        assert_eq!(
            publish_dimension(&mut client, risk("gold", 250, 1)).await??,
            (risk_seq, true),
            "{round}: the same risk record again"
        );
        for (what, record, seq) in [
            ("another rate", fx("1.20", 1), fx_seq),
            ("the rate spelt otherwise", fx("1.1", 1), fx_seq),
            ("another tier", risk("tin", 250, 1), risk_seq),
            ("another reserve", risk("gold", 300, 1), risk_seq),
        ] {
            let status = publish_dimension(&mut client, record)
                .await?
                .expect_err(what);
            assert_eq!(
                status.code(),
                Code::AlreadyExists,
                "{round}, {what}: {status:?}"
            );
            assert!(
                status
                    .message()
                    .contains(&format!("already in the log at sequence {seq}"))
                    && status.message().contains("higher version"),
                "{round}, {what}: {status:?}"
            );
        }
        assert_eq!(
            stream_messages(&stack.h.nats.url()).await?,
            2,
            "{round}: only the two first records are in the log: {:?}",
            read_log(&stack.h.nats.url()).await?
        );
        stack.ingest.terminate().await?;
        stack.ingest = stack.spawn_ingest(&[]).await?;
        client = stack.ingest_client().await?;
    }

    // A higher version is a new key.
    let (seq, duplicate) = publish_dimension(&mut client, fx("1.20", 2)).await??;
    assert!(!duplicate && seq > risk_seq);
    assert_eq!(stream_messages(&stack.h.nats.url()).await?, 3);
    Ok(())
}
