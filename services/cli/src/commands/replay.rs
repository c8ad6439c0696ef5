//! `payledger replay start|status|list|cancel|run`: the coordinator's client
//! (`crate::replay`) and the in-process replay.

use std::io::Write;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use payledger_proto::v1;
use payledger_semantics::Day;

use super::status_error;
use crate::render::{Exit, Output, Report};
use crate::replay;

/// The days a replay publishes.
#[derive(clap::Args, Debug)]
pub struct DayRange {
    /// First day to publish (YYYY-MM-DD).
    #[arg(long, required_unless_present = "yesterday")]
    from: Option<String>,
    /// Last day to publish (YYYY-MM-DD).
    #[arg(long, required_unless_present = "yesterday")]
    to: Option<String>,
    /// Publish yesterday (UTC) only: the nightly replay.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    yesterday: bool,
}

impl DayRange {
    fn days(&self) -> anyhow::Result<(Day, Day)> {
        let day = |flag: &str, text: &Option<String>| {
            Day::parse(text.as_deref().unwrap_or_default())
                .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
        };
        let (from, to) = if self.yesterday {
            let y = Day(Day::of_micros(super::now_us()).0 - 1);
            (y, y)
        } else {
            (day("from", &self.from)?, day("to", &self.to)?)
        };
        anyhow::ensure!(from <= to, "--from {from} is after --to {to}");
        Ok((from, to))
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorUrl {
    /// Replay coordinator URL.
    #[arg(
        long,
        env = "PAYLEDGER_COORDINATOR_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    coordinator_url: String,
}

#[derive(Subcommand, Debug)]
pub enum ReplayCommand {
    /// Ask the replay coordinator to replay the archive on the projector workers and
    /// commit the rows of the day range; with --wait, follow it with a bar per shard
    /// and end once the query service (--query-url) reads the commit.
    ///
    /// Exit status with --wait (the same with --json): 0 committed and reconciled
    /// without divergence, 2 the replay failed or was cancelled, 3 committed but
    /// reconciliation found divergent or missing rows.
    Start {
        #[command(flatten)]
        days: DayRange,
        /// Why (kept with the replay): "nightly", "late settlement file of 2026-11-20", ...
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Log cutoff: an archive watermark. By default the replay covers every
        /// record the stream holds now: the coordinator waits (at most its
        /// --archive-wait) until the archive reaches them.
        #[arg(long, default_value_t = 0)]
        cutoff: u64,
        /// Fold every partition from the beginning of history (an audit of the
        /// stored replay states), not from the newest committed state at or below
        /// the cutoff.
        #[arg(long)]
        from_genesis: bool,
        /// Wait until the replay ends, showing progress per shard.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        coordinator: CoordinatorUrl,
        #[command(flatten)]
        retry: replay::RetryArgs,
        #[command(flatten)]
        served: replay::ServedArgs,
    },
    /// Show one replay, shard by shard.
    Status {
        replay_id: String,
        #[command(flatten)]
        coordinator: CoordinatorUrl,
    },
    /// The latest replays, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        coordinator: CoordinatorUrl,
    },
    /// Stop a replay that has not committed yet.
    Cancel {
        replay_id: String,
        #[command(flatten)]
        coordinator: CoordinatorUrl,
        #[command(flatten)]
        retry: replay::RetryArgs,
    },
    /// Fold the archive from its beginning through the cutoff in this process (no
    /// coordinator or workers needed) and commit the rows of the day range as the
    /// authoritative snapshot.
    Run {
        #[command(flatten)]
        days: DayRange,
        /// Log cutoff: an archive watermark; the highest by default.
        #[arg(long)]
        cutoff: Option<u64>,
        /// Names the replay in the commit log.
        #[arg(long, default_value = "manual")]
        replay_id: String,
        /// Fold from the beginning of history, not from committed replay states.
        #[arg(long)]
        from_genesis: bool,
        /// Object storage holding the archive and the tables.
        #[arg(long, env = "PAYLEDGER_STORE", default_value = "./data/store")]
        store: String,
        #[command(flatten)]
        nats: payledger_server_common::config::NatsArgs,
        #[command(flatten)]
        projection: payledger_server_common::config::ProjectionArgs,
    },
}

/// One replay as the coordinator answered it.
pub struct Replay {
    pub replay: v1::Replay,
    /// Shard by shard (`replay status`).
    pub shards: bool,
    /// Followed to its end (`--wait`, the demo): its outcome is the exit status.
    pub waited: bool,
}

impl Report for Replay {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        replay::write(out, &self.replay, self.shards)
    }

    fn json(&self) -> serde_json::Value {
        replay::to_json(&self.replay)
    }

    fn exit(&self) -> Exit {
        if !self.waited {
            Exit::Success
        } else if self.replay.state != i32::from(v1::ReplayState::Succeeded) {
            Exit::Failed
        } else if self
            .replay
            .reconciliation
            .as_ref()
            .is_some_and(|c| c.rows_divergent + c.rows_missing > 0)
        {
            Exit::Divergent
        } else {
            Exit::Success
        }
    }
}

struct ReplayList(Vec<v1::Replay>);

impl Report for ReplayList {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.0.is_empty() {
            writeln!(
                out,
                "no replays yet; start one with `payledger replay start --yesterday --wait`"
            )?;
        }
        for r in &self.0 {
            replay::write(out, r, false)?;
        }
        Ok(())
    }

    fn json(&self) -> serde_json::Value {
        self.0.iter().map(replay::to_json).collect()
    }
}

/// A commit made by `replay run`.
struct Committed(payledger_storage::Commit);

impl Report for Committed {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let commit = &self.0;
        writeln!(
            out,
            "committed #{}: snapshot {} for {} to {}, log cutoff {}, {} rows",
            commit.number,
            commit.draft.snapshot_id,
            commit.draft.from_day,
            commit.draft.to_day,
            commit.draft.log_cutoff,
            commit.draft.parts.iter().map(|p| p.rows).sum::<u64>()
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap_or_default()
    }
}

pub async fn run(command: ReplayCommand, out: &Output) -> anyhow::Result<Exit> {
    match command {
        ReplayCommand::Start {
            days,
            reason,
            cutoff,
            from_genesis,
            wait,
            coordinator,
            retry,
            served,
        } => {
            let (from_day, to_day) = days.days()?;
            let request = v1::StartReplayRequest {
                from_day: from_day.to_string(),
                to_day: to_day.to_string(),
                reason,
                cutoff,
                from_genesis,
            };
            // Sent again only after a refusal made before anything was done (or no
            // connection at all), never after one that may have started a replay:
            // see `replay::retryable`.
            let (started, mut client) = replay::send_with_retry(
                &coordinator.coordinator_url,
                &retry,
                replay::Call::Start,
                |mut client| {
                    let request = request.clone();
                    async move { client.start_replay(request).await }
                },
            )
            .await?;
            if !wait {
                return out.emit(&Replay {
                    replay: started,
                    shards: false,
                    waited: false,
                });
            }
            out.note(&replay::started_line(&started))?;
            let ended = replay::wait(&mut client, &started.replay_id, !out.is_json()).await?;
            replay::wait_until_served(&ended, &served).await;
            out.emit(&Replay {
                replay: ended,
                shards: false,
                waited: true,
            })
        }
        ReplayCommand::Status {
            replay_id,
            coordinator,
        } => {
            let mut client = replay::client(&coordinator.coordinator_url).await?;
            let found = client
                .get_replay(v1::GetReplayRequest { replay_id })
                .await
                .map_err(status_error)?
                .into_inner();
            out.emit(&Replay {
                replay: found,
                shards: true,
                waited: false,
            })
        }
        ReplayCommand::List { limit, coordinator } => {
            let mut client = replay::client(&coordinator.coordinator_url).await?;
            let replays = client
                .list_replays(v1::ListReplaysRequest { limit })
                .await
                .map_err(status_error)?
                .into_inner()
                .replays;
            out.emit(&ReplayList(replays))
        }
        ReplayCommand::Cancel {
            replay_id,
            coordinator,
            retry,
        } => {
            let (stopped, _) = replay::send_with_retry(
                &coordinator.coordinator_url,
                &retry,
                replay::Call::Cancel,
                |mut client| {
                    let replay_id = replay_id.clone();
                    async move {
                        client
                            .cancel_replay(v1::CancelReplayRequest { replay_id })
                            .await
                    }
                },
            )
            .await?;
            out.emit(&Replay {
                replay: stopped,
                shards: false,
                waited: false,
            })
        }
        ReplayCommand::Run {
            days,
            cutoff,
            replay_id,
            from_genesis,
            store,
            nats,
            projection,
        } => {
            let (from_day, to_day) = days.days()?;
            // The stream's settings are recorded with the stream; the projection's
            // are this command's.
            let client = nats.connect("payledger-replay").await?;
            let recorded =
                payledger_server_common::topology::read_stream(&async_nats::jetstream::new(client))
                    .await?;
            let settings =
                payledger_semantics::Settings::of(recorded.settings, projection.settings()?);
            settings.validate()?;
            let stores = payledger_projector::replay::ReplayStores::at(
                payledger_storage::open_store(&store)?,
                recorded,
            );
            let request = payledger_projector::replay::ReplayRequest {
                replay_id,
                from_day,
                to_day,
                cutoff,
                from_genesis,
            };
            let bar = ProgressBar::new(u64::from(settings.partitions));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} replaying [{bar:40}] {pos}/{len} partitions ({elapsed})",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            let commit =
                payledger_projector::replay::replay_and_commit(&stores, settings, &request, |_| {
                    bar.inc(1)
                })
                .await?;
            bar.finish_and_clear();
            out.emit(&Committed(commit))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(state: v1::ReplayState, divergent: u64, missing: u64) -> v1::Replay {
        v1::Replay {
            state: state as i32,
            reconciliation: Some(v1::ReconciliationSummary {
                rows_divergent: divergent,
                rows_missing: missing,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn exit(replay: v1::Replay, waited: bool) -> Exit {
        Replay {
            replay,
            shards: false,
            waited,
        }
        .exit()
    }

    #[test]
    fn a_waited_replay_exits_with_its_outcome() {
        use v1::ReplayState::*;
        assert_eq!(exit(ended(Succeeded, 0, 0), true), Exit::Success);
        assert_eq!(exit(ended(Failed, 0, 0), true), Exit::Failed);
        assert_eq!(exit(ended(Cancelled, 0, 0), true), Exit::Failed);
        assert_eq!(exit(ended(Succeeded, 1, 0), true), Exit::Divergent);
        assert_eq!(exit(ended(Succeeded, 0, 2), true), Exit::Divergent);
        // Only started, or only looked at: the command did what it was asked.
        assert_eq!(exit(ended(Failed, 1, 0), false), Exit::Success);
        assert_eq!(
            [
                Exit::Success,
                Exit::Error,
                Exit::Failed,
                Exit::Divergent,
                Exit::Rejected
            ]
            .map(Exit::code),
            [0, 1, 2, 3, 4]
        );
    }
}
