//! One way to start the stack the tests run: a nats-server, ingest (archiving or
//! not), a stream projector, replay workers and query, on the local filesystem or
//! on SeaweedFS, each with the flags the tests share:
//!
//! ```text
//! let mut stack = Stack::builder()
//!     .archive(Archive::Fs)
//!     .projector(&[])
//!     .workers(2, &[])
//!     .query(&["--commit-poll-interval", "100ms"])
//!     .start()
//!     .await?;
//! let coordinator = stack.spawn_coordinator(&[]).await?;
//! ```
//!
//! Services are started in the order ingest, projector, workers, query, each once
//! the previous one answers health. A test that restarts one starts it again with
//! [`Stack::spawn_ingest`], [`Stack::spawn_projector`] or [`Stack::spawn_query`],
//! with the same flags.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use payledger_proto::v1::ingest_service_client::IngestServiceClient;
use payledger_semantics::{RecordedStream, StreamSettings};
use payledger_storage::{ArchiveStore, open_store_with_env};
use tonic::transport::Channel;

use crate::seaweed::SeaweedFs;
use crate::{Harness, Service};

/// Where the stack's object storage lives, and with it ingest's archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Archive {
    /// Directories of the harness's temporary directory.
    Fs,
    /// Prefixes of the bucket of a private SeaweedFS (`e2e/src/seaweed.rs`).
    S3,
}

#[derive(Default)]
pub struct StackBuilder {
    archive: Option<Archive>,
    flush_interval: Option<String>,
    heartbeats: Option<String>,
    fixture: Option<PathBuf>,
    ingest: Vec<String>,
    projector: Option<Vec<String>>,
    projector_archive: bool,
    workers: (usize, Vec<String>),
    query: Option<Vec<String>>,
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

impl StackBuilder {
    /// Ingest archives to the stack's store, in cuts of 200 ms unless
    /// [`Self::archive_flush_interval`] says otherwise; query reads the store.
    /// Without it ingest does not archive and query gets no `--store`.
    pub fn archive(mut self, archive: Archive) -> Self {
        self.archive = Some(archive);
        self
    }

    pub fn archive_flush_interval(mut self, interval: &str) -> Self {
        self.flush_interval = Some(interval.to_string());
        self
    }

    /// Ingest's `--heartbeat-interval`; `0s` (off) unless set, so that the log
    /// holds exactly the accepted events.
    pub fn heartbeats(mut self, interval: &str) -> Self {
        self.heartbeats = Some(interval.to_string());
        self
    }

    /// Starts on a copy of `fixture` (see [`Harness::start_from`]); the store is
    /// the fixture's `store/`.
    pub fn fixture(mut self, fixture: impl Into<PathBuf>) -> Self {
        self.fixture = Some(fixture.into());
        self
    }

    /// Flags ingest gets besides `--archive-*` and `--heartbeat-interval`.
    pub fn ingest(mut self, extra: &[&str]) -> Self {
        self.ingest = owned(extra);
        self
    }

    /// A stream projector with `--store` a store of its own (the fixture's one
    /// store when started from a fixture) and `extra`.
    pub fn projector(mut self, extra: &[&str]) -> Self {
        self.projector = Some(owned(extra));
        self
    }

    /// The stream projector reads the stack's store as its archive
    /// (`--archive-store`), to fill in at start what the log no longer holds.
    pub fn projector_reads_the_archive(mut self) -> Self {
        self.projector_archive = true;
        self
    }

    /// `count` replay workers (`--mode replay`), each with a store of its own and
    /// `--archive-store` the stack's store, and `extra`.
    pub fn workers(mut self, count: usize, extra: &[&str]) -> Self {
        self.workers = (count, owned(extra));
        self
    }

    /// The query service, with `--store` the stack's store when it archives, and
    /// `extra`.
    pub fn query(mut self, extra: &[&str]) -> Self {
        self.query = Some(owned(extra));
        self
    }

    pub async fn start(self) -> anyhow::Result<Stack> {
        let mut h = match &self.fixture {
            Some(fixture) => Harness::start_from(fixture)?,
            None => Harness::start()?,
        };
        let (s3, store, projector_store, env) = match self.archive {
            Some(Archive::S3) => {
                let s3 = SeaweedFs::start().await?;
                let (store, projector) = (s3.s3_url("lake"), s3.s3_url("projector"));
                let env = s3.envs();
                (Some(s3), store, projector, env)
            }
            Some(Archive::Fs) | None => {
                let store = h.store();
                // The fixture's checkpoints lie in its one store.
                let projector = match self.fixture {
                    Some(_) => store.clone(),
                    None => format!("{store}-projector"),
                };
                (None, store, projector, Vec::new())
            }
        };
        let flags = Flags {
            archives: self.archive.is_some(),
            flush_interval: self.flush_interval.unwrap_or_else(|| "200ms".into()),
            heartbeats: self.heartbeats.unwrap_or_else(|| "0s".into()),
            ingest: self.ingest,
            projector: self.projector.clone().unwrap_or_default(),
            projector_archive: self.projector_archive,
            worker: self.workers.1.clone(),
            query: self.query.clone().unwrap_or_default(),
        };
        let ingest_args = flags.ingest(&store, &[]);
        let ingest_args: Vec<&str> = ingest_args.iter().map(String::as_str).collect();
        let ingest = h
            .spawn_with_env("payledger-ingest", &ingest_args, &env)
            .await?;
        let mut stack = Stack {
            ingest,
            projector: None,
            workers: Vec::new(),
            query: None,
            h,
            s3,
            flags,
            store,
            projector_store,
            env,
        };
        if self.projector.is_some() {
            stack.projector = Some(stack.spawn_projector(&[]).await?);
        }
        for i in 0..self.workers.0 {
            let worker = stack.spawn_worker(i).await?;
            stack.workers.push(worker);
        }
        if self.query.is_some() {
            stack.query = Some(stack.spawn_query(&[]).await?);
        }
        Ok(stack)
    }
}

/// Makes a test's own struct, one with a field `stack: Stack` beside what the test
/// keeps of its own, usable as the stack (`s.h`, `s.ingest`, `s.spawn_query(…)`).
#[macro_export]
macro_rules! deref_to_stack {
    ($holder:ty) => {
        impl std::ops::Deref for $holder {
            type Target = $crate::Stack;
            fn deref(&self) -> &$crate::Stack {
                &self.stack
            }
        }

        impl std::ops::DerefMut for $holder {
            fn deref_mut(&mut self) -> &mut $crate::Stack {
                &mut self.stack
            }
        }
    };
}

/// A running stack; dropping it stops every process and removes every directory.
pub struct Stack {
    // Fields drop in order: the services stop before the servers they use.
    pub ingest: Service,
    pub projector: Option<Service>,
    pub workers: Vec<Service>,
    pub query: Option<Service>,
    pub h: Harness,
    s3: Option<SeaweedFs>,
    flags: Flags,
    /// The shared store: archive, replay states, tables (a directory or an
    /// `s3://` URL).
    pub store: String,
    /// The stream projector's own store (its checkpoints).
    projector_store: String,
    /// The environment every service gets (S3 endpoint and credentials).
    env: Vec<(String, String)>,
}

impl Stack {
    pub fn builder() -> StackBuilder {
        StackBuilder::default()
    }

    /// The SeaweedFS of an [`Archive::S3`] stack.
    pub fn s3(&self) -> Option<&SeaweedFs> {
        self.s3.as_ref()
    }

    pub fn projector(&self) -> &Service {
        self.projector
            .as_ref()
            .expect("the stack was built without .projector()")
    }

    pub fn query(&self) -> &Service {
        self.query
            .as_ref()
            .expect("the stack was built without .query()")
    }

    pub async fn ingest_client(&self) -> anyhow::Result<IngestServiceClient<Channel>> {
        crate::ingest_client(&self.ingest.url()).await
    }

    /// The shared store, opened as the services open it.
    pub fn object_store(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        Ok(open_store_with_env(
            &self.store,
            std::env::vars().chain(self.env.iter().cloned()),
        )?)
    }

    /// The archive ingest writes, for a stream of the default settings.
    pub fn archive(&self) -> anyhow::Result<ArchiveStore> {
        Ok(ArchiveStore::new(
            self.object_store()?,
            RecordedStream::new(StreamSettings::default()),
        ))
    }

    /// Starts `binary` with `args` and the stack's environment.
    pub async fn spawn(&mut self, binary: &str, args: &[&str]) -> anyhow::Result<Service> {
        self.h.spawn_with_env(binary, args, &self.env).await
    }

    /// Another ingest with the stack's ingest flags plus `extra` (a restart, or a
    /// second instance).
    pub async fn spawn_ingest(&mut self, extra: &[&str]) -> anyhow::Result<Service> {
        let args = self.flags.ingest(&self.store, extra);
        self.spawn_owned("payledger-ingest", args).await
    }

    /// Another stream projector with the stack's projector flags plus `extra`.
    pub async fn spawn_projector(&mut self, extra: &[&str]) -> anyhow::Result<Service> {
        let mut args = vec!["--store".to_string(), self.projector_store.clone()];
        if self.flags.projector_archive {
            args.extend(["--archive-store".to_string(), self.store.clone()]);
        }
        args.extend(self.flags.projector.iter().cloned());
        args.extend(owned(extra));
        self.spawn_owned("payledger-projector", args).await
    }

    async fn spawn_worker(&mut self, index: usize) -> anyhow::Result<Service> {
        let own = match &self.s3 {
            Some(s3) => s3.s3_url(&format!("worker-{index}")),
            None => format!("{}-worker-{index}", self.store),
        };
        let mut args = vec![
            "--mode".to_string(),
            "replay".to_string(),
            "--store".to_string(),
            own,
            "--archive-store".to_string(),
            self.store.clone(),
        ];
        args.extend(self.flags.worker.iter().cloned());
        self.spawn_owned("payledger-projector", args).await
    }

    /// Another query service with the stack's query flags plus `extra`.
    pub async fn spawn_query(&mut self, extra: &[&str]) -> anyhow::Result<Service> {
        let mut args = Vec::new();
        if self.flags.archives {
            args.extend(["--store".to_string(), self.store.clone()]);
        }
        args.extend(self.flags.query.iter().cloned());
        args.extend(owned(extra));
        self.spawn_owned("payledger-query", args).await
    }

    /// A replay coordinator on the stack's store, calling the stack's workers,
    /// with `extra`.
    pub async fn spawn_coordinator(&mut self, extra: &[&str]) -> anyhow::Result<Service> {
        let workers: Vec<String> = self.workers.iter().map(Service::url).collect();
        let mut args = vec![
            "--store".to_string(),
            self.store.clone(),
            "--workers".to_string(),
            workers.join(","),
        ];
        args.extend(owned(extra));
        self.spawn_owned("payledger-replay-coordinator", args).await
    }

    async fn spawn_owned(&mut self, binary: &str, args: Vec<String>) -> anyhow::Result<Service> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(binary, &args).await
    }
}

/// The flags the builder was given, for starting a service again.
struct Flags {
    archives: bool,
    flush_interval: String,
    heartbeats: String,
    ingest: Vec<String>,
    projector: Vec<String>,
    projector_archive: bool,
    worker: Vec<String>,
    query: Vec<String>,
}

impl Flags {
    fn ingest(&self, store: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--heartbeat-interval".to_string(), self.heartbeats.clone()];
        if self.archives {
            args.extend([
                "--archive-store".to_string(),
                store.to_string(),
                "--archive-flush-interval".to_string(),
                self.flush_interval.clone(),
            ]);
        }
        args.extend(self.ingest.iter().cloned());
        args.extend(owned(extra));
        args
    }
}
