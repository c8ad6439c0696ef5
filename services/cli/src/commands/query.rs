//! `payledger query current|daily|list|watch` and the exposure reports they print.

use std::io::Write;

use clap::{Subcommand, ValueEnum};
use payledger_proto::v1::{self, query_service_client::QueryServiceClient};

use super::{Endpoints, status_error};
use crate::connect::Conn;
use crate::render::{Exit, Output, Report};
use payledger_proto::lines::format_time_us;

#[derive(Subcommand, Debug)]
pub enum QueryCommand {
    /// Current open exposure of a merchant, per currency.
    Current {
        merchant: String,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// One merchant-day (YYYY-MM-DD), all currencies, with FX and reserve applied.
    Daily {
        merchant: String,
        day: String,
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Auto)]
        consistency: ConsistencyArg,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Merchant-days in a range, page by page.
    List {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "")]
        merchant: String,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Follow merchants' current exposure as it changes (Ctrl-C to stop).
    Watch {
        merchants: Vec<String>,
        #[command(flatten)]
        endpoints: Endpoints,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ConsistencyArg {
    Auto,
    Provisional,
    Authoritative,
}

impl ConsistencyArg {
    fn to_proto(self) -> v1::Consistency {
        match self {
            ConsistencyArg::Auto => v1::Consistency::Auto,
            ConsistencyArg::Provisional => v1::Consistency::Provisional,
            ConsistencyArg::Authoritative => v1::Consistency::Authoritative,
        }
    }
}

pub async fn client(url: &str) -> anyhow::Result<QueryServiceClient<Conn>> {
    Ok(QueryServiceClient::new(
        crate::connect::connect(url, "query").await?,
    ))
}

pub async fn run(command: QueryCommand, out: &Output) -> anyhow::Result<Exit> {
    match command {
        QueryCommand::Current {
            merchant,
            endpoints,
        } => {
            let mut client = client(&endpoints.query_url).await?;
            let e = client
                .get_current_exposure(v1::GetCurrentExposureRequest {
                    merchant_id: merchant,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            out.emit(&Current(e))
        }
        QueryCommand::Daily {
            merchant,
            day,
            consistency,
            endpoints,
        } => {
            let mut client = client(&endpoints.query_url).await?;
            let response = client
                .get_daily_exposure(v1::GetDailyExposureRequest {
                    merchant_id: merchant,
                    day,
                    consistency: consistency.to_proto() as i32,
                    snapshot_id: String::new(),
                })
                .await
                .map_err(status_error)?;
            warn_reporting_incomplete(response.metadata());
            out.emit(&Daily(response.into_inner()))
        }
        QueryCommand::List {
            from,
            to,
            merchant,
            page_size,
            endpoints,
        } => {
            let mut client = client(&endpoints.query_url).await?;
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_daily_exposure(v1::ListDailyExposureRequest {
                        merchant_id: merchant.clone(),
                        from_day: from.clone(),
                        to_day: to.clone(),
                        consistency: v1::Consistency::Auto as i32,
                        page_size,
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(status_error)?;
                warn_reporting_incomplete(page.metadata());
                let page = page.into_inner();
                for e in page.items {
                    out.emit(&Daily(e))?;
                }
                if page.next_page_token.is_empty() {
                    return Ok(Exit::Success);
                }
                page_token = page.next_page_token;
            }
        }
        QueryCommand::Watch {
            merchants,
            endpoints,
        } => {
            let mut client = client(&endpoints.query_url).await?;
            let mut stream = client
                .watch_current_exposure(v1::WatchCurrentExposureRequest {
                    merchant_ids: merchants,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(status_error)? {
                out.emit(&Current(e))?;
            }
            Ok(Exit::Success)
        }
    }
}

/// Says on stderr (stdout stays the answer, JSON or not) why stream answers carry
/// no reporting values, when the query service says so.
fn warn_reporting_incomplete(metadata: &tonic::metadata::MetadataMap) {
    if let Some(reason) = metadata
        .get(payledger_query::REPORTING_INCOMPLETE)
        .and_then(|v| v.to_str().ok())
    {
        eprintln!("warning: reporting values withheld from stream answers: {reason}");
    }
}

/// A merchant's current exposure.
pub struct Current(pub v1::CurrentExposure);

/// One merchant-day.
pub struct Daily(pub v1::DailyExposure);

impl Report for Current {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let e = &self.0;
        writeln!(out, "merchant {}", e.merchant_id)?;
        writeln!(
            out,
            "  {:<4} {:>18} {:>8} {:>6} {:>6} {:>6} {:>7} {:>10}  last event",
            "cur", "balance_minor", "applied", "dup", "confl", "late", "too_old", "log_pos"
        )?;
        for r in &e.rows {
            writeln!(
                out,
                "  {:<4} {:>18} {:>8} {:>6} {:>6} {:>6} {:>7} {:>10}  {}",
                r.currency,
                r.balance_minor,
                r.applied,
                r.duplicates,
                r.conflicts,
                r.late,
                r.too_old,
                r.log_position,
                format_time_us(r.last_event_time_us)
            )?;
        }
        write_provenance(out, e.provenance.as_ref())
    }

    fn json(&self) -> serde_json::Value {
        let e = &self.0;
        serde_json::json!({
            "merchant_id": e.merchant_id,
            "rows": json_rows(&e.rows, |r| serde_json::json!({
                "currency": r.currency, "balance_minor": r.balance_minor, "last_event_time_us": r.last_event_time_us,
                "applied": r.applied, "duplicates": r.duplicates, "conflicts": r.conflicts, "late": r.late,
                "too_old": r.too_old, "log_position": r.log_position, "semantics_version": r.semantics_version})),
            "provenance": json_provenance(e.provenance.as_ref()),
        })
    }
}

impl Report for Daily {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let e = &self.0;
        writeln!(out, "merchant {} day {}", e.merchant_id, e.day)?;
        writeln!(
            out,
            "  {:<4} {:>18} {:>18} {:>8} {:>8} {:>6} {:>6} {:>6} {:>9} {:>10}",
            "cur",
            "closing_minor",
            "peak_minor",
            "peak at",
            "applied",
            "dup",
            "confl",
            "late",
            "restated",
            "log_pos"
        )?;
        for r in &e.rows {
            let peak_at = format_time_us(r.peak_bucket_start_us);
            writeln!(
                out,
                "  {:<4} {:>18} {:>18} {:>8} {:>8} {:>6} {:>6} {:>6} {:>9} {:>10}",
                r.currency,
                r.closing_minor,
                r.peak_minor,
                &peak_at[11..16],
                r.applied,
                r.duplicates,
                r.conflicts,
                r.late,
                r.restated,
                r.log_position
            )?;
        }
        if let Some(rep) = &e.reporting {
            let fx: Vec<String> = rep
                .fx_versions
                .iter()
                .map(|f| {
                    format!(
                        "{}@{} v{} ({})",
                        f.currency, f.effective_date, f.version, f.rate
                    )
                })
                .collect();
            writeln!(
                out,
                "  in {}: closing {} reserve {} (tier '{}', {} bps){}{}",
                rep.reporting_currency,
                rep.closing_reporting_minor.as_deref().unwrap_or("n/a"),
                rep.reserve_minor.as_deref().unwrap_or("n/a"),
                rep.risk_tier,
                rep.reserve_bps,
                if fx.is_empty() {
                    String::new()
                } else {
                    format!("; fx {}", fx.join(", "))
                },
                if rep.missing_rates.is_empty() {
                    String::new()
                } else {
                    format!("; missing rates: {}", rep.missing_rates.join(", "))
                },
            )?;
        }
        write_provenance(out, e.provenance.as_ref())
    }

    fn json(&self) -> serde_json::Value {
        let e = &self.0;
        let rep = e.reporting.clone().unwrap_or_default();
        serde_json::json!({
            "merchant_id": e.merchant_id, "day": e.day,
            "rows": json_rows(&e.rows, |r| serde_json::json!({
                "currency": r.currency, "closing_minor": r.closing_minor, "peak_minor": r.peak_minor,
                "peak_bucket_start_us": r.peak_bucket_start_us, "applied": r.applied, "duplicates": r.duplicates,
                "conflicts": r.conflicts, "late": r.late, "restated": r.restated, "log_position": r.log_position,
                "semantics_version": r.semantics_version})),
            "reporting": {"currency": rep.reporting_currency, "closing_reporting_minor": rep.closing_reporting_minor,
                          "reserve_minor": rep.reserve_minor, "risk_tier": rep.risk_tier, "risk_version": rep.risk_version,
                          "reserve_bps": rep.reserve_bps, "missing_rates": rep.missing_rates,
                          "fx_versions": json_rows(&rep.fx_versions, |f| serde_json::json!({
                              "currency": f.currency, "effective_date": f.effective_date, "version": f.version, "rate": f.rate}))},
            "provenance": json_provenance(e.provenance.as_ref()),
        })
    }
}

fn write_provenance(out: &mut dyn Write, p: Option<&v1::Provenance>) -> std::io::Result<()> {
    let Some(p) = p else { return Ok(()) };
    let source = v1::Source::try_from(p.source)
        .map(|s| s.as_str_name())
        .unwrap_or("?");
    let lag = p.stream_lag.as_ref().map_or("unknown".to_string(), |l| {
        if !l.refused.is_empty() {
            format!("p{} NOT CURRENT: {}", l.partition, l.refused)
        } else if l.known {
            format!(
                "p{} applied through seq {}, {} pending, reported {} ms ago",
                l.partition,
                l.applied_sequence,
                l.pending_records,
                l.report_age_us / 1000
            )
        } else {
            format!("p{} not reported yet", l.partition)
        }
    });
    writeln!(
        out,
        "  source {source}{} restated={} log_position={} semantics v{} version key {}\n  stream: {lag}",
        if p.provisional { " (provisional)" } else { "" },
        p.restated,
        p.log_position,
        p.semantics_version,
        p.version_key
    )
}

fn json_rows<T>(rows: &[T], f: impl Fn(&T) -> serde_json::Value) -> serde_json::Value {
    serde_json::Value::Array(rows.iter().map(f).collect())
}

fn json_provenance(p: Option<&v1::Provenance>) -> serde_json::Value {
    let Some(p) = p else {
        return serde_json::Value::Null;
    };
    let lag = p.stream_lag.clone().unwrap_or_default();
    serde_json::json!({
        "source": v1::Source::try_from(p.source).map(|s| s.as_str_name()).unwrap_or("?"),
        "provisional": p.provisional, "restated": p.restated, "snapshot_id": p.snapshot_id,
        "log_position": p.log_position, "semantics_version": p.semantics_version,
        "version_key": p.version_key,
        "stream_lag": {"partition": lag.partition, "known": lag.known, "applied_sequence": lag.applied_sequence,
                        "pending_records": lag.pending_records, "report_age_us": lag.report_age_us,
                        "refused": lag.refused},
    })
}
