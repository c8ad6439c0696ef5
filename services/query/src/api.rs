//! The `QueryService` gRPC API. Every answer carries its provenance.

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use payledger_proto::page_token::{PagePosition, PageQuery, decode_page_token, encode_page_token};
use payledger_proto::reconcile::{DayRows, MAX_RECONCILE_DAYS, SnapshotSide, compare_day};
use payledger_proto::v1::query_service_server::{QueryService, QueryServiceServer};
use payledger_proto::{daily_row_from_proto, v1};
use payledger_semantics::{
    Day, MAX_MERCHANT_ID_BYTES, REPORTING_CURRENCY, SEMANTICS_VERSION, Settings, check_id,
    partition_of,
};
use tokio::sync::broadcast;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::authoritative::Authoritative;
use crate::routing::{AutoSource, CoveringCommit, StreamRow, auto_source};
use crate::tables::Tables;

pub(crate) struct QueryApi {
    pub tables: Arc<Tables>,
    pub authoritative: Option<Arc<Authoritative>>,
    pub settings: Settings,
    pub changes: broadcast::Sender<v1::CurrentRow>,
    pub max_watch_merchants: usize,
    pub metrics: Arc<crate::metrics::QueryMetrics>,
}

/// Response metadata present when stream answers withhold reporting values that
/// depend on FX and risk records the service may lack; its value says why. The
/// `Reporting` message has no field for a reason, so the values themselves are left
/// absent (with `missing_rates` naming the currencies they would need).
pub const REPORTING_INCOMPLETE: &str = "payledger-reporting-incomplete";

/// One merchant-day's answer, and why its reporting values are withheld, if they are.
struct Answer {
    exposure: v1::DailyExposure,
    reporting_incomplete: Option<String>,
}

/// Marks `response` with the reason reporting values are withheld.
fn mark_incomplete<T>(response: &mut Response<T>, reason: Option<String>) {
    let Some(reason) = reason else { return };
    // Metadata values are visible ASCII only.
    let text: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if let Ok(value) = tonic::metadata::MetadataValue::try_from(text) {
        response.metadata_mut().insert(REPORTING_INCOMPLETE, value);
    }
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn merchant(field: &'static str, id: &str) -> Result<(), Status> {
    check_id(field, id, MAX_MERCHANT_ID_BYTES).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn day(field: &str, text: &str) -> Result<Day, Status> {
    Day::parse(text).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

impl QueryApi {
    pub fn into_routes(self) -> Routes {
        Routes::new(QueryServiceServer::new(self))
    }

    fn stream_lag(&self, merchant_id: &str) -> v1::StreamLag {
        let partition = partition_of(merchant_id, self.settings.partitions);
        let progress = self.tables.progress.read().expect("progress lock");
        match progress.get(&partition) {
            Some((p, seen)) => v1::StreamLag {
                partition,
                known: true,
                applied_sequence: p.applied_sequence,
                pending_records: p.pending_records,
                report_age_us: seen.elapsed().as_micros() as i64,
                refused: p.refused.clone(),
            },
            None => v1::StreamLag {
                partition,
                ..Default::default()
            },
        }
    }

    /// Refuses a stream answer for a merchant whose partition the projector
    /// refused: whatever rows the tables hold for it may miss records.
    fn unless_refused(&self, merchant_id: &str) -> Result<(), Status> {
        let partition = partition_of(merchant_id, self.settings.partitions);
        let progress = self.tables.progress.read().expect("progress lock");
        match progress.get(&partition) {
            Some((p, _)) if !p.refused.is_empty() => Err(Status::failed_precondition(format!(
                "the stream tables of partition {partition} are not current: {}",
                p.refused
            ))),
            _ => Ok(()),
        }
    }

    fn stream_provenance(
        &self,
        merchant_id: &str,
        log_position: u64,
        restated: bool,
    ) -> v1::Provenance {
        v1::Provenance {
            source: v1::Source::Stream as i32,
            provisional: true,
            restated,
            snapshot_id: String::new(),
            log_position,
            semantics_version: SEMANTICS_VERSION,
            version_key: self.settings.version_key(),
            stream_lag: Some(self.stream_lag(merchant_id)),
        }
    }

    fn current_exposure(&self, merchant_id: &str) -> v1::CurrentExposure {
        let rows: Vec<v1::CurrentRow> = self
            .tables
            .current
            .read()
            .expect("current table lock")
            .get(merchant_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let position = rows.iter().map(|r| r.log_position).max().unwrap_or(0);
        v1::CurrentExposure {
            merchant_id: merchant_id.to_string(),
            rows,
            provenance: Some(self.stream_provenance(merchant_id, position, false)),
        }
    }

    /// One merchant-day from the stream tables, with the dimensions applied.
    fn daily_exposure(
        &self,
        merchant_id: &str,
        day: Day,
        rows: Vec<v1::DailyRow>,
    ) -> Result<Answer, Status> {
        self.unless_refused(merchant_id)?;
        let parsed = rows
            .iter()
            .map(daily_row_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::internal(format!("stored row unreadable: {e}")))?;
        let (reporting, reporting_incomplete) = self
            .tables
            .dimensions
            .read()
            .expect("dimension lock")
            .reporting(&parsed);
        let position = rows.iter().map(|r| r.log_position).max().unwrap_or(0);
        let restated = rows.iter().any(|r| r.restated);
        Ok(Answer {
            exposure: v1::DailyExposure {
                merchant_id: merchant_id.to_string(),
                day: day.to_string(),
                rows,
                reporting: Some(reporting_to_proto(&reporting)),
                provenance: Some(self.stream_provenance(merchant_id, position, restated)),
            },
            reporting_incomplete,
        })
    }

    fn consistency(consistency: i32) -> Result<v1::Consistency, Status> {
        match v1::Consistency::try_from(consistency) {
            Ok(v1::Consistency::Unspecified) => Ok(v1::Consistency::Auto),
            Ok(c) => Ok(c),
            Err(_) => Err(Status::invalid_argument(format!(
                "consistency: unknown value {consistency}"
            ))),
        }
    }

    fn stream_rows(&self, merchant_id: &str, day: Day) -> Vec<v1::DailyRow> {
        let daily = self.tables.daily.read().expect("daily table lock");
        let from = (merchant_id.to_string(), day, String::new());
        daily
            .range(from..)
            .take_while(|((m, d, _), _)| m == merchant_id && *d == day)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// One merchant-day from one source (docs/query-routing.md); AUTO as
    /// [`auto_source`] decides.
    async fn route(
        &self,
        merchant_id: &str,
        day: Day,
        consistency: v1::Consistency,
        snapshot_id: Option<&str>,
    ) -> Result<Option<Answer>, Status> {
        let stream = self.stream_rows(merchant_id, day);
        let stream_answer = |rows: Vec<v1::DailyRow>| -> Result<Option<Answer>, Status> {
            if rows.is_empty() {
                Ok(None)
            } else {
                self.daily_exposure(merchant_id, day, rows).map(Some)
            }
        };
        let partition = partition_of(merchant_id, self.settings.partitions);
        match consistency {
            v1::Consistency::Provisional => stream_answer(stream),
            v1::Consistency::Authoritative => {
                let auth = self.authoritative.as_ref().ok_or_else(|| {
                    Status::failed_precondition("this query service has no --store, so no authoritative tables; ask for AUTO or PROVISIONAL")
                })?;
                let commit = auth.commit_for(day, snapshot_id)?.ok_or_else(|| {
                    Status::failed_precondition(format!("no committed replay covers {day}; run a replay of that day, or ask for AUTO or PROVISIONAL"))
                })?;
                let rows = auth.rows(&commit, partition, merchant_id, day).await?;
                if rows.is_empty() {
                    Ok(None)
                } else {
                    self.replay_exposure(auth, merchant_id, day, &commit, rows)
                        .await
                        .map(Some)
                }
            }
            _ => {
                let covering = match &self.authoritative {
                    Some(auth) => auth.commit_for(day, None)?.map(|commit| (auth, commit)),
                    None => None,
                };
                let snapshot_rows = match &covering {
                    Some((auth, commit)) => auth.rows(commit, partition, merchant_id, day).await?,
                    None => Vec::new(),
                };
                let currencies: Vec<&str> =
                    snapshot_rows.iter().map(|r| r.currency.as_str()).collect();
                let stream_rows: Vec<StreamRow> = stream
                    .iter()
                    .map(|r| StreamRow {
                        currency: &r.currency,
                        log_position: r.log_position,
                    })
                    .collect();
                let route = auto_source(
                    covering.as_ref().map(|(_, commit)| CoveringCommit {
                        log_cutoff: commit.draft.log_cutoff,
                        currencies: &currencies,
                    }),
                    &stream_rows,
                );
                match (route, covering) {
                    (AutoSource::Snapshot, Some((auth, commit))) => self
                        .replay_exposure(auth, merchant_id, day, &commit, snapshot_rows)
                        .await
                        .map(Some),
                    (why, _) => {
                        tracing::debug!(merchant_id, %day, ?why, "auto answers from the stream");
                        stream_answer(stream)
                    }
                }
            }
        }
    }

    async fn replay_exposure(
        &self,
        auth: &Authoritative,
        merchant_id: &str,
        day: Day,
        commit: &payledger_storage::Commit,
        rows: Vec<payledger_semantics::DailyRow>,
    ) -> Result<Answer, Status> {
        let reporting = auth.reporting(commit, &rows).await?;
        let exposure = v1::DailyExposure {
            merchant_id: merchant_id.to_string(),
            day: day.to_string(),
            rows: rows
                .iter()
                .map(payledger_proto::daily_row_to_proto)
                .collect(),
            reporting: Some(reporting_to_proto(&reporting)),
            provenance: Some(v1::Provenance {
                source: v1::Source::Replay as i32,
                provisional: false,
                restated: rows.iter().any(|r| r.restated),
                snapshot_id: commit.draft.snapshot_id.clone(),
                log_position: rows.iter().map(|r| r.log_position).max().unwrap_or(0),
                semantics_version: commit.draft.semantics_version,
                version_key: commit.draft.version_key.clone(),
                stream_lag: Some(self.stream_lag(merchant_id)),
            }),
        };
        Ok(Answer {
            exposure,
            reporting_incomplete: None,
        })
    }
}

fn reporting_to_proto(r: &payledger_semantics::Reporting) -> v1::Reporting {
    v1::Reporting {
        reporting_currency: REPORTING_CURRENCY.to_string(),
        closing_reporting_minor: r.closing_reporting_minor.map(|v| v.to_string()),
        reserve_minor: r.reserve_minor.map(|v| v.to_string()),
        fx_versions: r
            .fx_used
            .iter()
            .map(|f| v1::FxVersion {
                currency: f.currency.to_string(),
                effective_date: f.effective_day.to_string(),
                version: f.version,
                rate: f.rate.clone(),
            })
            .collect(),
        risk_tier: r
            .risk_used
            .as_ref()
            .map(|u| u.tier.clone())
            .unwrap_or_default(),
        risk_version: r.risk_used.as_ref().map(|u| u.version),
        risk_effective_date: r
            .risk_used
            .as_ref()
            .map(|u| u.effective_day.to_string())
            .unwrap_or_default(),
        reserve_bps: r
            .risk_used
            .as_ref()
            .map(|u| u.reserve_bps)
            .unwrap_or_default(),
        missing_rates: r.missing_rates.iter().map(ToString::to_string).collect(),
        overflow: r.overflow.map(|o| o.to_string()).unwrap_or_default(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::CurrentExposure, Status>> + Send>>;

#[tonic::async_trait]
impl QueryService for QueryApi {
    async fn get_current_exposure(
        &self,
        request: Request<v1::GetCurrentExposureRequest>,
    ) -> Result<Response<v1::CurrentExposure>, Status> {
        let started = std::time::Instant::now();
        let merchant_id = request.into_inner().merchant_id;
        merchant("merchant_id", &merchant_id)?;
        self.unless_refused(&merchant_id)?;
        let exposure = self.current_exposure(&merchant_id);
        let source = if exposure.rows.is_empty() {
            "none"
        } else {
            "stream"
        };
        self.metrics.observe("GetCurrentExposure", source, started);
        if exposure.rows.is_empty() {
            return Err(Status::not_found(format!(
                "merchant '{merchant_id}' has no events in the stream tables"
            )));
        }
        Ok(Response::new(exposure))
    }

    type WatchCurrentExposureStream = WatchStream;

    async fn watch_current_exposure(
        &self,
        request: Request<v1::WatchCurrentExposureRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let merchants = request.into_inner().merchant_ids;
        if merchants.is_empty() || merchants.len() > self.max_watch_merchants {
            return Err(Status::invalid_argument(format!(
                "merchant_ids: name 1 to {} merchants (--max-watch-merchants)",
                self.max_watch_merchants
            )));
        }
        for m in &merchants {
            merchant("merchant_ids", m)?;
        }
        // Subscribe before taking the snapshot, so no change falls between them.
        let mut changes = self.changes.subscribe();
        let wanted: HashSet<String> = merchants.iter().cloned().collect();
        let initial: Vec<v1::CurrentExposure> =
            merchants.iter().map(|m| self.current_exposure(m)).collect();
        let api = QueryApi {
            tables: self.tables.clone(),
            authoritative: self.authoritative.clone(),
            settings: self.settings,
            changes: self.changes.clone(),
            max_watch_merchants: self.max_watch_merchants,
            metrics: self.metrics.clone(),
        };
        let stream = async_stream(initial, move |tx| async move {
            loop {
                match changes.recv().await {
                    Ok(row) if wanted.contains(&row.merchant_id) => {
                        if tx
                            .send(Ok(api.current_exposure(&row.merchant_id)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: resend the whole state of every watched merchant.
                        for m in &wanted {
                            if tx.send(Ok(api.current_exposure(m))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_daily_exposure(
        &self,
        request: Request<v1::GetDailyExposureRequest>,
    ) -> Result<Response<v1::DailyExposure>, Status> {
        let request = request.into_inner();
        merchant("merchant_id", &request.merchant_id)?;
        let day = day("day", &request.day)?;
        let consistency = Self::consistency(request.consistency)?;
        let snapshot_id = (!request.snapshot_id.is_empty()).then_some(request.snapshot_id.as_str());
        if snapshot_id.is_some() && consistency != v1::Consistency::Authoritative {
            return Err(Status::invalid_argument(
                "snapshot_id: only with consistency AUTHORITATIVE",
            ));
        }
        let started = std::time::Instant::now();
        let answer = self
            .route(&request.merchant_id, day, consistency, snapshot_id)
            .await?;
        let source = match answer.as_ref().and_then(|a| a.exposure.provenance.as_ref()) {
            Some(p) if p.source == v1::Source::Replay as i32 => "replay",
            Some(_) => "stream",
            None => "none",
        };
        self.metrics.observe("GetDailyExposure", source, started);
        match answer {
            Some(answer) => {
                let mut response = Response::new(answer.exposure);
                mark_incomplete(&mut response, answer.reporting_incomplete);
                Ok(response)
            }
            None => Err(Status::not_found(format!(
                "merchant '{}' has no rows on {day} ({})",
                request.merchant_id,
                consistency.as_str_name()
            ))),
        }
    }

    async fn list_daily_exposure(
        &self,
        request: Request<v1::ListDailyExposureRequest>,
    ) -> Result<Response<v1::ListDailyExposureResponse>, Status> {
        let request = request.into_inner();
        if !request.merchant_id.is_empty() {
            merchant("merchant_id", &request.merchant_id)?;
        }
        let from = day("from_day", &request.from_day)?;
        let to = day("to_day", &request.to_day)?;
        if from > to {
            return Err(Status::invalid_argument(format!(
                "from_day {from} is after to_day {to}"
            )));
        }
        let consistency = Self::consistency(request.consistency)?;
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(Status::invalid_argument(format!(
                    "page_size: at most {MAX_PAGE}, got {n}"
                )));
            }
            n => n,
        };
        let page_query = PageQuery {
            merchant_id: &request.merchant_id,
            from_day: from,
            to_day: to,
            consistency: consistency as i32,
        };
        let after =
            decode_page_token(&page_query, &request.page_token).map_err(|e| e.to_status())?;
        // Group by merchant-day, in (merchant, day) order, resuming after the token.
        let mut groups: BTreeMap<(String, Day), Vec<v1::DailyRow>> = BTreeMap::new();
        let mut more = false;
        {
            let daily = self.tables.daily.read().expect("daily table lock");
            let start = match (&after, request.merchant_id.is_empty()) {
                (Some(p), _) => (p.merchant_id.clone(), Day(p.day.0 + 1), String::new()),
                (None, false) => (request.merchant_id.clone(), from, String::new()),
                (None, true) => (String::new(), Day(i32::MIN), String::new()),
            };
            for ((m, d, _), row) in daily.range(start..) {
                if !request.merchant_id.is_empty() && *m != request.merchant_id {
                    break;
                }
                if *d < from || *d > to {
                    continue;
                }
                if !groups.contains_key(&(m.clone(), *d)) && groups.len() == page_size {
                    more = true;
                    break;
                }
                groups.entry((m.clone(), *d)).or_default().push(row.clone());
            }
        }
        let next_page_token = match (more, groups.keys().next_back()) {
            (true, Some((m, d))) => encode_page_token(
                &page_query,
                &PagePosition {
                    merchant_id: m.clone(),
                    day: *d,
                },
            ),
            _ => String::new(),
        };
        // The page is the merchant-days the stream knows; each answers from its own source.
        let mut items = Vec::with_capacity(groups.len());
        let mut reporting_incomplete = None;
        for (m, d) in groups.into_keys() {
            if let Some(item) = self.route(&m, d, consistency, None).await? {
                reporting_incomplete = reporting_incomplete.or(item.reporting_incomplete);
                items.push(item.exposure);
            }
        }
        let mut response = Response::new(v1::ListDailyExposureResponse {
            items,
            next_page_token,
        });
        mark_incomplete(&mut response, reporting_incomplete);
        Ok(response)
    }

    async fn reconcile(
        &self,
        request: Request<v1::ReconcileRequest>,
    ) -> Result<Response<v1::ReconcileReport>, Status> {
        let request = request.into_inner();
        let from = day("from_day", &request.from_day)?;
        let to = day("to_day", &request.to_day)?;
        if from > to || to.0 - from.0 >= MAX_RECONCILE_DAYS {
            return Err(Status::invalid_argument(format!(
                "from_day {from} to to_day {to}: at most {MAX_RECONCILE_DAYS} days, in order; ask for a longer range in chunks (`payledger reconcile` does)"
            )));
        }
        let auth = self.authoritative.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this query service has no --store, so there is nothing to reconcile against",
            )
        })?;
        let max_differences = match request.max_differences {
            0 => 1000,
            n => n as usize,
        };
        let mut report = v1::ReconcileReport::default();
        for d in from.0..=to.0 {
            let day = Day(d);
            let Some(commit) = auth.commit_for(day, None)? else {
                report.uncovered_days.push(day.to_string());
                continue;
            };
            let mut snapshot = DayRows::new();
            for partition in 0..self.settings.partitions {
                for row in auth
                    .part(&commit, partition)
                    .await?
                    .iter()
                    .filter(|r| r.day == day)
                {
                    snapshot.insert(
                        (row.merchant_id.clone(), row.currency.to_string()),
                        row.clone(),
                    );
                }
            }
            let mut stream = DayRows::new();
            for ((m, row_day, c), row) in self.tables.daily.read().expect("daily table lock").iter()
            {
                if *row_day == day {
                    let row =
                        daily_row_from_proto(row).map_err(|e| Status::internal(e.to_string()))?;
                    stream.insert((m.clone(), c.clone()), row);
                }
            }
            let snapshot = SnapshotSide {
                snapshot_id: &commit.draft.snapshot_id,
                log_cutoff: commit.draft.log_cutoff,
                rows: &snapshot,
            };
            compare_day(&mut report, max_differences, day, snapshot, &stream);
        }
        Ok(Response::new(report))
    }
}

/// A response stream that first yields `initial`, then what `produce` sends.
fn async_stream<F, Fut>(initial: Vec<v1::CurrentExposure>, produce: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::CurrentExposure, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = produce(tx.clone());
    tokio::spawn(async move {
        for item in initial {
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
        drop(tx);
        task.await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
