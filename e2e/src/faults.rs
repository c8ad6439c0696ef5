//! The fault matrix's parts: a stack on one nats-server or a 3-node cluster, a
//! paced client that retries as docs/failure-contract.md says a client should,
//! and the end checks every row makes (each acknowledged event in the log and
//! the archive exactly once, the archive tiled, the stream's rows equal to a fold
//! of the archive, a replay's commit equal to both).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use payledger_proto::v1;
use payledger_semantics::{DailyRow, Settings};
use payledger_semantics::{RecordedStream, StreamSettings};
use payledger_storage::{ArchiveStore, SnapshotStore, open_store_with_env, verify_tiling};
use tokio::sync::Mutex;

use crate::cluster::{NatsCluster, Network};
use crate::seaweed::SeaweedFs;
use crate::{Harness, Service, ingest_client, now_us, query_client, read_log};

const MINUTE_US: i64 = 60_000_000;

/// Where the stack's NATS runs.
pub enum Nats {
    Single,
    /// One nats-server whose JetStream store is a tmpfs of this many MiB, so
    /// that a test can fill it.
    SingleOnTmpfs {
        mebibytes: u32,
    },
    Cluster(Network),
    /// A 3-node cluster on loopback where node `node`'s JetStream store is a
    /// tmpfs of this many MiB (the others' on the normal disk).
    ClusterWithOneStoreOnTmpfs {
        node: usize,
        mebibytes: u32,
    },
}

/// A tmpfs mounted on a temporary directory (needs root), unmounted and removed
/// when dropped, after the processes that used it.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(mebibytes: u32) -> anyhow::Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mebibytes}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map_err(|e| anyhow::anyhow!("running mount: {e}"))?;
        anyhow::ensure!(status.success(), "mount -t tmpfs failed (it needs root)");
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Writes a file of zeros until the tmpfs has no room left.
    pub fn fill(&self) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        let path = self.dir.path().join("filler");
        let mut file = std::fs::File::create(&path)?;
        let block = vec![0u8; 64 * 1024];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
        // Whatever the page cache still holds must hit the tmpfs too.
        let _ = file.sync_all();
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The health status `service` of the gRPC server at `url` reports, None when
/// it does not answer.
pub async fn health_of(url: &str, service: &str) -> Option<i32> {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = tokio::time::timeout(
        Duration::from_secs(2),
        health.check(tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    Some(answer.into_inner().status)
}

/// Where every store of a [`FaultStack`] lives: the archive, the projector's
/// checkpoints, query's tables, the replay worker's and coordinator's stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stores {
    /// Directories of the harness's temporary directory.
    Fs,
    /// Prefixes of the bucket of a private SeaweedFS, which a row can take away
    /// and bring back ([`SeaweedFs::kill`], [`SeaweedFs::restart`]).
    S3,
}

/// The replay worker and coordinator [`FaultStack::replayers`] started, and a
/// client of the coordinator.
pub struct Replayers {
    pub worker: Service,
    pub coordinator: Service,
    pub client: v1::replay_coordinator_client::ReplayCoordinatorClient<tonic::transport::Channel>,
}

/// Ingest (archiving to the stack's store), a stream projector, query, and on
/// demand a replay worker and coordinator, on one nats-server or a cluster.
pub struct FaultStack {
    pub h: Harness,
    /// The store of a [`Nats::SingleOnTmpfs`] server; dropped after `h`'s processes.
    pub cluster: Option<NatsCluster>,
    pub store: String,
    /// The stream projector's `--store` (its checkpoints).
    pub projector_store: String,
    pub ingest: Service,
    pub projector: Service,
    pub query: Service,
    /// Extra flags every service got (replicas in a cluster).
    replicas: Vec<&'static str>,
    pub tmpfs: Option<Tmpfs>,
    /// Set by a row that purged the stream's head (what `max_age` drops, for a
    /// history longer than the log): acknowledged events below this sequence are
    /// looked for in the archive only.
    pub log_head_dropped_below: Option<u64>,
    /// The object store of a [`Stores::S3`] stack; dropped after the services.
    pub s3: Option<SeaweedFs>,
    /// The environment every service gets (the S3 endpoint and credentials).
    pub env: Vec<(String, String)>,
    /// `--metrics-listen` of ingest and of the stream projector in a
    /// [`Stores::S3`] stack.
    pub metrics: Option<(String, String)>,
}

impl FaultStack {
    pub async fn start(nats: Nats) -> anyhow::Result<FaultStack> {
        Self::start_with(nats, &[]).await
    }

    /// [`FaultStack::start`] with `ingest_extra` flags for ingest.
    pub async fn start_with(nats: Nats, ingest_extra: &[&str]) -> anyhow::Result<FaultStack> {
        Self::start_on(nats, Stores::Fs, ingest_extra, &[]).await
    }

    /// [`FaultStack::start_with`] with every store where `stores` says, and extra
    /// flags for the projector too.
    pub async fn start_on(
        nats: Nats,
        stores: Stores,
        ingest_extra: &[&str],
        projector_extra: &[&str],
    ) -> anyhow::Result<FaultStack> {
        let mut h = Harness::start()?;
        let mut tmpfs = None;
        let cluster = match nats {
            Nats::Single => None,
            Nats::SingleOnTmpfs { mebibytes } => {
                let disk = Tmpfs::mount(mebibytes)?;
                h.nats.stop();
                h.nats = payledger_server_common::local_nats::LocalNats::start(disk.path())?;
                tmpfs = Some(disk);
                None
            }
            Nats::Cluster(network) => {
                let cluster = NatsCluster::start(&h.dir.path().join("cluster"), 3, network)?;
                cluster.wait_healthy(Duration::from_secs(60)).await?;
                Some(cluster)
            }
            Nats::ClusterWithOneStoreOnTmpfs { node, mebibytes } => {
                let disk = Tmpfs::mount(mebibytes)?;
                let store = disk.path().to_path_buf();
                tmpfs = Some(disk);
                let cluster = NatsCluster::start_with_stores(
                    &h.dir.path().join("cluster"),
                    3,
                    Network::Loopback,
                    |i| (i == node).then(|| store.clone()),
                )?;
                cluster.wait_healthy(Duration::from_secs(60)).await?;
                Some(cluster)
            }
        };
        let replicas = match cluster {
            Some(_) => vec!["--kv-replicas", "3"],
            None => Vec::new(),
        };
        let urls = match &cluster {
            Some(c) => c.urls(),
            None => h.nats.url(),
        };
        let (s3, store, projector_store, env) = match stores {
            Stores::Fs => {
                let store = h.store();
                let projector = format!("{store}-projector");
                (None, store, projector, Vec::new())
            }
            Stores::S3 => {
                let s3 = SeaweedFs::start().await?;
                let (store, projector) = (s3.s3_url("lake"), s3.s3_url("projector"));
                let env = s3.envs();
                (Some(s3), store, projector, env)
            }
        };
        let mut ingest_args = vec![
            "--archive-store",
            store.as_str(),
            "--archive-flush-interval",
            "200ms",
            "--heartbeat-interval",
            "0s",
        ];
        if cluster.is_some() {
            ingest_args.extend(["--stream-replicas", "3"]);
        }
        let metrics = match stores {
            Stores::S3 => Some((
                payledger_server_common::local_nats::free_address()?,
                payledger_server_common::local_nats::free_address()?,
            )),
            Stores::Fs => None,
        };
        if let Some((ingest, _)) = &metrics {
            ingest_args.extend(["--metrics-listen", ingest.as_str()]);
        }
        ingest_args.extend_from_slice(ingest_extra);
        let ingest = h
            .spawn_with_nats_url("payledger-ingest", &urls, &ingest_args, &env)
            .await?;
        let mut projector_args = vec![
            "--store",
            projector_store.as_str(),
            "--checkpoint-interval",
            "1s",
        ];
        projector_args.extend(replicas.iter().copied());
        if let Some((_, projector)) = &metrics {
            projector_args.extend(["--metrics-listen", projector.as_str()]);
        }
        projector_args.extend_from_slice(projector_extra);
        let projector = h
            .spawn_with_nats_url("payledger-projector", &urls, &projector_args, &env)
            .await?;
        let mut query_args = vec!["--store", store.as_str(), "--commit-poll-interval", "100ms"];
        query_args.extend(replicas.iter().copied());
        let query = h
            .spawn_with_nats_url("payledger-query", &urls, &query_args, &env)
            .await?;
        Ok(FaultStack {
            h,
            cluster,
            store,
            projector_store,
            ingest,
            projector,
            query,
            replicas,
            tmpfs,
            log_head_dropped_below: None,
            s3,
            env,
            metrics,
        })
    }

    /// Starts the stream projector again with the flags it was started with
    /// (after [`Service::kill_hard`], say).
    pub async fn respawn_projector(&mut self) -> anyhow::Result<()> {
        let urls = self.nats_urls();
        let mut args = vec![
            "--store",
            self.projector_store.as_str(),
            "--checkpoint-interval",
            "1s",
        ];
        args.extend(self.replicas.iter().copied());
        if let Some((_, metrics)) = &self.metrics {
            args.extend(["--metrics-listen", metrics.as_str()]);
        }
        self.projector = self
            .h
            .spawn_with_nats_url("payledger-projector", &urls, &args, &self.env)
            .await?;
        Ok(())
    }

    /// `location` opened as the services open it.
    pub fn open(&self, location: &str) -> anyhow::Result<Arc<dyn object_store::ObjectStore>> {
        Ok(open_store_with_env(
            location,
            std::env::vars().chain(self.env.iter().cloned()),
        )?)
    }

    /// `--nats-url` of the services.
    pub fn nats_urls(&self) -> String {
        match &self.cluster {
            Some(c) => c.urls(),
            None => self.h.nats.url(),
        }
    }

    pub fn archive(&self) -> anyhow::Result<ArchiveStore> {
        Ok(ArchiveStore::new(
            self.open(&self.store)?,
            RecordedStream::new(StreamSettings::default()),
        ))
    }

    /// Fails if a platform process has exited: the matrix's faults are all
    /// meant to be ridden out, none to stop a service.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        for service in [&mut self.ingest, &mut self.projector, &mut self.query] {
            if let Some(status) = service.exited()? {
                anyhow::bail!("{} exited with {status}:\n{}", service.name, service.log());
            }
        }
        Ok(())
    }

    /// The end checks of a row, after the client acknowledged `acked`: returns
    /// how long the stream's rows took to equal the archive's fold.
    pub async fn verify(&mut self, acked: &Acknowledged) -> anyhow::Result<Verified> {
        self.ensure_running()?;
        let urls = self.nats_urls();
        let log = read_log(&urls).await?;
        let mut in_log: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for entry in &log {
            if let Some(v1::log_record::Body::Fact(event)) = &entry.record.body {
                in_log
                    .entry(event.event_id.clone())
                    .or_default()
                    .push(entry.seq);
            }
        }
        match self.log_head_dropped_below {
            None => check_exactly_once("log", acked, &in_log)?,
            Some(first) => {
                let in_log_range = Acknowledged {
                    sequences: acked
                        .sequences
                        .iter()
                        .filter(|(_, seq)| **seq >= first)
                        .map(|(id, seq)| (id.clone(), *seq))
                        .collect(),
                };
                check_exactly_once("log", &in_log_range, &in_log)?;
            }
        }

        let last = log.last().map(|e| e.seq).unwrap_or(0);
        let archive = self.archive()?;
        if let Err(e) = crate::wait_until_archived(&archive, last).await {
            anyhow::bail!("{e}\n{}", notable(&self.ingest));
        }
        let in_archive = archived_event_ids(&archive).await?;
        check_exactly_once("archive", acked, &in_archive)?;

        let started = Instant::now();
        let cutoff = payledger_projector::replay::latest_cutoff(&archive).await?;
        let partitions: Vec<u32> = (0..Settings::default().partitions).collect();
        let folded = payledger_projector::replay::fold_partitions(
            &archive,
            Settings::default(),
            &partitions,
            cutoff,
        )
        .await?;
        let mut q = query_client(&self.query.url()).await?;
        if let Err(e) = crate::assert_converges(&mut q, &folded, Duration::from_secs(90)).await {
            let found = self.where_rows_stall(&urls, &folded).await;

            anyhow::bail!("{e}\n{found}");
        }
        // Readers the row left silent and that made their consumer again.
        for service in [&self.ingest, &self.projector, &self.query] {
            for line in service.log().lines().filter(|l| l.contains("stalled:")) {
                eprintln!("{}: {line}", service.name);
            }
        }
        Ok(Verified {
            log_records: log.len(),
            cutoff,
            converged_in: started.elapsed(),
            archive_rows: folded.daily_rows(),
        })
    }

    /// Where served rows stall behind the log: each partition's last record in the
    /// stream beside what the projector reports applied, the KV rows beside the
    /// archive's fold, and what the projector and query logged about it.
    async fn where_rows_stall(&self, urls: &str, folded: &payledger_semantics::Exposure) -> String {
        use futures::StreamExt;
        use payledger_server_common::topology;
        use prost::Message;
        let mut out = String::new();
        let found: anyhow::Result<()> = async {
            let js = async_nats::jetstream::new(crate::connect_nats(urls).await?);
            let stream = js.get_stream(topology::STREAM).await?;
            let progress = js.get_key_value(topology::PROGRESS_BUCKET).await?;
            for p in 0..Settings::default().partitions {
                let last = stream
                    .get_last_raw_message_by_subject(&topology::event_subject(p))
                    .await
                    .map(|m| m.sequence)
                    .unwrap_or(0);
                let applied = progress
                    .get(topology::progress_key(p))
                    .await?
                    .and_then(|b| v1::PartitionProgress::decode(b).ok())
                    .map(|r| r.applied_sequence);
                out += &format!("partition {p}: last record {last}, applied {applied:?}\n");
            }
            let daily = js.get_key_value(topology::DAILY_BUCKET).await?;
            let mut keys = daily.keys().await?;
            let mut in_kv = Vec::new();
            while let Some(key) = keys.next().await {
                if let Some(bytes) = daily.get(key?).await? {
                    in_kv.push(v1::DailyRow::decode(bytes)?);
                }
            }
            let want = folded.daily_rows();
            let differ = want
                .iter()
                .filter(|w| !in_kv.contains(&payledger_proto::daily_row_to_proto(w)))
                .count();
            out += &format!(
                "KV {}: {} rows, {differ} of the fold's {} rows not among them\n",
                topology::DAILY_BUCKET,
                in_kv.len(),
                want.len()
            );
            Ok(())
        }
        .await;
        if let Err(e) = found {
            out += &format!("(could not read the cluster: {e:#})\n");
        }
        for service in [&self.projector, &self.query] {
            out += &notable(service);
        }
        out
    }

    /// Runs a replay of every day the client wrote through a worker and a
    /// coordinator, and checks its committed snapshot equals the archive's fold
    /// (and so the stream's rows, which [`FaultStack::verify`] compared).
    pub async fn verify_replay(&mut self, verified: &Verified) -> anyhow::Result<()> {
        let mut replayers = self.replayers().await?;
        let id = Self::start_replay(&mut replayers, verified).await?;
        let done = Self::replay_outcome(&mut replayers, &id, Duration::from_secs(120)).await?;
        anyhow::ensure!(
            done.state == v1::ReplayState::Succeeded as i32,
            "the replay failed: {done:?}\n{}",
            replayers.coordinator.log()
        );
        self.check_committed(&done.snapshot_id, verified).await
    }

    /// Starts a replay worker and a coordinator on the stack's stores.
    pub async fn replayers(&mut self) -> anyhow::Result<Replayers> {
        let urls = self.nats_urls();
        let own = match &self.s3 {
            Some(s3) => s3.s3_url("worker"),
            None => format!("{}-worker", self.store),
        };
        let mut worker_args = vec![
            "--mode",
            "replay",
            "--store",
            own.as_str(),
            "--archive-store",
            self.store.as_str(),
        ];
        worker_args.extend(self.replicas.iter().copied());
        let worker = self
            .h
            .spawn_with_nats_url("payledger-projector", &urls, &worker_args, &self.env)
            .await?;
        let workers = worker.url();
        let mut coordinator_args = vec![
            "--store",
            self.store.as_str(),
            "--workers",
            workers.as_str(),
            "--reconcile-wait",
            "60s",
        ];
        coordinator_args.extend(self.replicas.iter().copied());
        let coordinator = self
            .h
            .spawn_with_nats_url(
                "payledger-replay-coordinator",
                &urls,
                &coordinator_args,
                &self.env,
            )
            .await?;
        let client = v1::replay_coordinator_client::ReplayCoordinatorClient::new(
            tonic::transport::Channel::from_shared(coordinator.url())?
                .connect()
                .await?,
        );
        Ok(Replayers {
            worker,
            coordinator,
            client,
        })
    }

    /// The days the client wrote, first and last.
    pub fn days(
        verified: &Verified,
    ) -> anyhow::Result<(payledger_semantics::Day, payledger_semantics::Day)> {
        match (
            verified.archive_rows.iter().map(|r| r.day).min(),
            verified.archive_rows.iter().map(|r| r.day).max(),
        ) {
            (Some(from), Some(to)) => Ok((from, to)),
            _ => anyhow::bail!("no rows to replay"),
        }
    }

    /// Asks the coordinator for a replay of every day the client wrote, through
    /// the cutoff [`FaultStack::verify`] folded; returns its id.
    pub async fn start_replay(
        replayers: &mut Replayers,
        verified: &Verified,
    ) -> anyhow::Result<String> {
        let (from, to) = Self::days(verified)?;
        let request = v1::StartReplayRequest {
            from_day: from.to_string(),
            to_day: to.to_string(),
            reason: "fault matrix".into(),
            cutoff: verified.cutoff,
            from_genesis: false,
        };
        // As `payledger replay start` does: sent again only after a refusal that
        // says nothing was started.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match replayers.client.start_replay(request.clone()).await {
                Ok(answer) => return Ok(answer.into_inner().replay_id),
                Err(status)
                    if payledger_cli::replay::retryable(
                        payledger_cli::replay::Call::Start,
                        &status,
                    ) && Instant::now() < deadline =>
                {
                    eprintln!("start replay: {status:?}; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    /// Polls the replay until it ends (SUCCEEDED or FAILED), for at most `within`.
    pub async fn replay_outcome(
        replayers: &mut Replayers,
        id: &str,
        within: Duration,
    ) -> anyhow::Result<v1::Replay> {
        let deadline = Instant::now() + within;
        loop {
            let replay = replayers
                .client
                .get_replay(v1::GetReplayRequest {
                    replay_id: id.to_string(),
                })
                .await?
                .into_inner();
            if replay.state == v1::ReplayState::Succeeded as i32
                || replay.state == v1::ReplayState::Failed as i32
            {
                return Ok(replay);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the replay did not end within {within:?}: {replay:?}\n{}",
                replayers.coordinator.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Checks the snapshot `snapshot_id` holds exactly the archive's fold of the
    /// days the client wrote.
    pub async fn check_committed(
        &self,
        snapshot_id: &str,
        verified: &Verified,
    ) -> anyhow::Result<()> {
        let (from, to) = Self::days(verified)?;
        let snapshots = SnapshotStore::new(self.open(&self.store)?);
        let mut committed = Vec::new();
        for p in 0..Settings::default().partitions {
            committed.extend(snapshots.read_part(snapshot_id, p).await?);
        }
        let mut expected: Vec<DailyRow> = verified
            .archive_rows
            .iter()
            .filter(|r| from <= r.day && r.day <= to)
            .cloned()
            .collect();
        let key = |r: &DailyRow| (r.merchant_id.clone(), r.day, r.currency);
        committed.sort_by_key(key);
        expected.sort_by_key(key);
        anyhow::ensure!(
            committed == expected,
            "the replay committed {} rows, the archive's fold has {}; first difference {:#?}",
            committed.len(),
            expected.len(),
            committed.iter().zip(&expected).find(|(a, b)| a != b)
        );
        Ok(())
    }
}

/// The last warnings, errors and recoveries `service` logged.
fn notable(service: &crate::Service) -> String {
    let log = service.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["WARN", "ERROR", "re-created", "resumed"]
                .iter()
                .any(|mark| l.contains(mark))
        })
        .collect();
    format!(
        "{} logged:\n{}\n",
        service.name,
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// What [`FaultStack::verify`] found.
pub struct Verified {
    pub log_records: usize,
    pub cutoff: u64,
    pub converged_in: Duration,
    pub archive_rows: Vec<DailyRow>,
}

fn check_exactly_once(
    place: &str,
    acked: &Acknowledged,
    found: &BTreeMap<String, Vec<u64>>,
) -> anyhow::Result<()> {
    for (id, seq) in &acked.sequences {
        match found.get(id).map(Vec::as_slice) {
            Some([only]) if only == seq => {}
            Some([only]) => anyhow::bail!(
                "{place}: event {id} was acknowledged at sequence {seq} but is at {only}"
            ),
            Some(many) => anyhow::bail!(
                "{place}: event {id} is there {} times: {many:?}",
                many.len()
            ),
            None => anyhow::bail!("{place}: acknowledged event {id} (sequence {seq}) is missing"),
        }
    }
    // Every event the client sent was acknowledged in the end, so nothing else
    // may be there: an extra one was stored twice under another identity.
    if let Some(extra) = found.keys().find(|id| !acked.sequences.contains_key(*id)) {
        anyhow::bail!("{place}: event {extra} is there but was never acknowledged");
    }
    Ok(())
}

/// Each archived event's sequences, the archive's tiling checked on the way.
async fn archived_event_ids(archive: &ArchiveStore) -> anyhow::Result<BTreeMap<String, Vec<u64>>> {
    let watermarks = archive.watermarks().await?;
    let top = watermarks.last().copied().unwrap_or(0);
    let mut ids: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for p in 0..Settings::default().partitions {
        let segments = archive.event_segments(p).await?;
        verify_tiling(&segments, &watermarks, top)
            .map_err(|e| anyhow::anyhow!("archive partition {p}: {e}"))?;
        for cut in segments.into_iter().filter(|s| s.last <= top) {
            for record in archive.read_events(p, cut).await? {
                if let payledger_semantics::RecordBody::Fact(fact) = &record.body {
                    ids.entry(fact.event_id.clone())
                        .or_default()
                        .push(record.seq);
                }
            }
        }
    }
    Ok(ids)
}

/// Every event the client got an answer for, with the sequence it was given
/// (an accepted event's own, or the sequence of the copy a retry found).
#[derive(Default, Debug)]
pub struct Acknowledged {
    pub sequences: BTreeMap<String, u64>,
}

/// What the client saw: per gRPC code how many calls ended with it, the longest
/// a call took, and the longest time between two acknowledged batches.
#[derive(Default, Debug)]
pub struct ClientReport {
    pub acked: Acknowledged,
    pub codes: BTreeMap<String, usize>,
    pub calls: usize,
    pub retries: usize,
    pub longest_call: Duration,
    /// The longest stretch without an acknowledged batch: how long the fault
    /// kept the client from writing.
    pub longest_outage: Duration,
    /// How long each acknowledged call took.
    pub latencies: Vec<Duration>,
    /// The first message of each code other than OK.
    pub messages: BTreeMap<String, String>,
}

impl ClientReport {
    /// Several clients' reports as one.
    pub fn merge(reports: Vec<ClientReport>) -> anyhow::Result<ClientReport> {
        let mut all = ClientReport::default();
        for r in reports {
            for (id, seq) in r.acked.sequences {
                anyhow::ensure!(
                    all.acked.sequences.insert(id.clone(), seq).is_none(),
                    "event {id} acknowledged to two clients"
                );
            }
            for (code, n) in r.codes {
                *all.codes.entry(code).or_default() += n;
            }
            for (code, message) in r.messages {
                all.messages.entry(code).or_insert(message);
            }
            all.calls += r.calls;
            all.retries += r.retries;
            all.longest_call = all.longest_call.max(r.longest_call);
            all.longest_outage = all.longest_outage.max(r.longest_outage);
            all.latencies.extend(r.latencies);
        }
        Ok(all)
    }

    /// The `q` quantile of acknowledged calls' latency.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        match sorted.len() {
            0 => Duration::ZERO,
            n => sorted[((n - 1) as f64 * q).round() as usize],
        }
    }

    pub fn codes_line(&self) -> String {
        self.codes
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A client writing `batches` batches of `batch` events, one every `pace`,
/// retrying each batch until acknowledged as docs/failure-contract.md says:
/// UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED and a lost connection are
/// retried with the same event ids (dedup makes that safe), anything else is an
/// error of the row.
pub struct PacedClient {
    pub ingest_url: String,
    pub batches: usize,
    pub batch: usize,
    pub pace: Duration,
    /// Name prefix of the event ids, unique per row.
    pub tag: String,
    /// How long one batch may take to be acknowledged, retries included.
    pub give_up_after: Duration,
}

/// The client's progress, readable while it runs: batches acknowledged, and
/// when the last one was.
#[derive(Clone, Default)]
pub struct Progress {
    acked: Arc<AtomicUsize>,
    /// Every batch is acknowledged.
    finished: Arc<std::sync::atomic::AtomicBool>,
    last_ack: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Progress {
    pub fn batches_acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    fn acked_one(&self) {
        *self.last_ack.lock().expect("progress lock") = Some(Instant::now());
        self.acked.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits for a batch acknowledged after `since`; returns how long after
    /// `since` it was. A client that has finished counts as recovered when its
    /// last batch was.
    pub async fn first_ack_after(
        &self,
        since: Instant,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        loop {
            if let Some(at) = *self.last_ack.lock().expect("progress lock") {
                if at > since {
                    return Ok(at - since);
                }
                // Everything was written before `since`: nothing was kept waiting.
                if self.finished.load(Ordering::Relaxed) {
                    return Ok(Duration::ZERO);
                }
            }
            anyhow::ensure!(
                since.elapsed() < within,
                "no batch acknowledged within {within:?} ({} acknowledged so far)",
                self.batches_acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Progress::first_ack_after`] on a task of its own, so that a row can
    /// inject its fault while it waits.
    pub fn first_ack_after_in_background(
        &self,
        since: Instant,
        within: Duration,
    ) -> tokio::task::JoinHandle<anyhow::Result<Duration>> {
        let progress = self.clone();
        tokio::spawn(async move { progress.first_ack_after(since, within).await })
    }

    /// Waits until `n` batches are acknowledged.
    pub async fn wait_for(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while self.batches_acked() < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} of {n} batches acknowledged within {within:?}",
                self.batches_acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl PacedClient {
    pub fn new(ingest_url: String, tag: &str, batches: usize) -> PacedClient {
        PacedClient {
            ingest_url,
            batches,
            batch: 20,
            pace: Duration::from_millis(100),
            tag: tag.to_string(),
            give_up_after: Duration::from_secs(120),
        }
    }

    fn events(&self, batch: usize, now: i64) -> Vec<v1::Event> {
        (0..self.batch)
            .map(|i| v1::Event {
                event_id: format!("{}-{batch}-{i}", self.tag),
                merchant_id: format!("m-{}", (batch * 7 + i) % 40),
                kind: v1::EventKind::PaymentCaptured as i32,
                amount_minor: 100 + (batch * self.batch + i) as i64,
                currency: "EUR".to_string(),
                event_time_us: now - MINUTE_US,
                corrects_event_id: String::new(),
            })
            .collect()
    }

    /// Starts the client; the progress counts acknowledged batches.
    pub fn spawn(
        self,
    ) -> (
        Progress,
        tokio::task::JoinHandle<anyhow::Result<ClientReport>>,
    ) {
        let progress = Progress::default();
        let counter = progress.clone();
        (
            progress,
            tokio::spawn(async move { self.run(counter).await }),
        )
    }

    async fn run(self, progress: Progress) -> anyhow::Result<ClientReport> {
        let report = Arc::new(Mutex::new(ClientReport::default()));
        let mut last_ack = Instant::now();
        for batch in 0..self.batches {
            let events = self.events(batch, now_us());
            let deadline = Instant::now() + self.give_up_after;
            let mut backoff = Duration::from_millis(50);
            loop {
                let call = Instant::now();
                let outcome = self.publish_once(&events).await;
                let mut r = report.lock().await;
                r.calls += 1;
                r.longest_call = r.longest_call.max(call.elapsed());
                match outcome {
                    Ok(results) => {
                        *r.codes.entry("OK".into()).or_default() += 1;
                        for (event, result) in events.iter().zip(&results) {
                            let seq = match &result.outcome {
                                Some(v1::publish_result::Outcome::Accepted(a)) => a.sequence,
                                Some(v1::publish_result::Outcome::Duplicate(d)) => d.sequence,
                                other => anyhow::bail!(
                                    "event {} of a valid batch answered {other:?}",
                                    event.event_id
                                ),
                            };
                            if let Some(before) =
                                r.acked.sequences.insert(event.event_id.clone(), seq)
                            {
                                anyhow::ensure!(
                                    before == seq,
                                    "event {} acknowledged at {before} and then at {seq}",
                                    event.event_id
                                );
                            }
                        }
                        r.longest_outage = r.longest_outage.max(last_ack.elapsed());
                        r.latencies.push(call.elapsed());
                        last_ack = Instant::now();
                        break;
                    }
                    Err(status) => {
                        eprintln!("batch {batch}: {:?} {}", status.code(), status.message());
                        let code = format!("{:?}", status.code());
                        r.messages
                            .entry(code.clone())
                            .or_insert_with(|| status.message().to_string());
                        *r.codes.entry(code).or_default() += 1;
                        let retryable = matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::ResourceExhausted
                                | tonic::Code::DeadlineExceeded
                                | tonic::Code::Unknown
                        );
                        anyhow::ensure!(
                            retryable,
                            "batch {batch}: {:?} is not retryable by the contract: {}",
                            status.code(),
                            status.message()
                        );
                        anyhow::ensure!(
                            Instant::now() < deadline,
                            "batch {batch} not acknowledged within {:?}; last answer {:?}: {}",
                            self.give_up_after,
                            status.code(),
                            status.message()
                        );
                        r.retries += 1;
                    }
                }
                drop(r);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            progress.acked_one();
            tokio::time::sleep(self.pace).await;
        }
        progress.finished.store(true, Ordering::Relaxed);
        let report = Arc::try_unwrap(report)
            .map_err(|_| anyhow::anyhow!("report still shared"))?
            .into_inner();
        Ok(report)
    }

    async fn publish_once(
        &self,
        events: &[v1::Event],
    ) -> Result<Vec<v1::PublishResult>, tonic::Status> {
        // A call a fault leaves hanging counts as unanswered: the client's own
        // deadline, longer than ingest's ack timeout.
        let call = async {
            let mut client = ingest_client(&self.ingest_url)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
            client
                .publish(v1::PublishRequest {
                    events: events.to_vec(),
                })
                .await
                .map(|r| r.into_inner().results)
        };
        match tokio::time::timeout(Duration::from_secs(15), call).await {
            Ok(result) => result,
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 15 s")),
        }
    }
}

/// One line of the README's fault matrix, written to
/// `target/fault-matrix/{row}.md` for `just faults` to gather.
pub struct MatrixLine<'a> {
    pub row: &'a str,
    pub nats: &'a str,
    pub fault: &'a str,
    pub report: &'a ClientReport,
    pub verified: &'a Verified,
    pub recovery: Duration,
}

impl MatrixLine<'_> {
    pub fn write(&self) -> anyhow::Result<()> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fault-matrix");
        std::fs::create_dir_all(&dir)?;
        let line = format!(
            "| {} | {} | {} | {} | {} | {:.1} s | {:.1} s | {:.1} s | {} |\n",
            self.row,
            self.nats,
            self.fault,
            self.report.acked.sequences.len(),
            self.verified.log_records,
            self.recovery.as_secs_f64(),
            self.report.longest_outage.as_secs_f64(),
            self.verified.converged_in.as_secs_f64(),
            self.report.codes_line(),
        );
        eprint!("{line}");
        std::fs::write(dir.join(format!("{}.md", self.row)), line)?;
        Ok(())
    }
}
