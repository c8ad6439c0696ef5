//! `payledger reconcile`: the committed snapshots against the stream's rows.

use std::io::Write;

use payledger_proto::v1;

use super::Endpoints;
use crate::render::{Exit, Output, Report};

#[derive(clap::Args, Debug)]
pub struct ReconcileArgs {
    #[arg(long)]
    from: String,
    #[arg(long)]
    to: String,
    /// Most differences listed.
    #[arg(long, default_value_t = 50)]
    max: u32,
    #[command(flatten)]
    endpoints: Endpoints,
}

pub async fn run(args: ReconcileArgs, out: &Output) -> anyhow::Result<Exit> {
    // Ranges longer than one call may ask for go in chunks (docs/operations.md "Reconcile").
    let report =
        crate::replay::reconcile_range(&args.endpoints.query_url, &args.from, &args.to, args.max)
            .await?;
    out.emit(&Reconciliation(report))
}

pub struct Reconciliation(pub v1::ReconcileReport);

impl Report for Reconciliation {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let report = &self.0;
        writeln!(
            out,
            "{} equal, {} stream ahead of the snapshot, {} divergent, {} missing on one side (snapshots: {}{})",
            report.rows_equal,
            report.rows_stream_ahead,
            report.rows_divergent,
            report.rows_missing,
            report.snapshot_ids.join(", "),
            if report.uncovered_days.is_empty() {
                String::new()
            } else {
                format!("; no commit for {}", report.uncovered_days.join(", "))
            }
        )?;
        for d in &report.differences {
            writeln!(
                out,
                "  {:<20} {} {} {}: {}",
                d.kind, d.merchant_id, d.day, d.currency, d.detail
            )?;
        }
        Ok(())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap_or_default()
    }

    /// Rows that differ for the same log prefix must never exist (docs/operations.md).
    fn exit(&self) -> Exit {
        if self.0.rows_divergent + self.0.rows_missing > 0 {
            Exit::Divergent
        } else {
            Exit::Success
        }
    }
}
