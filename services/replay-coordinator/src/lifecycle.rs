//! The lifecycle of a replay and of its shards: which state follows which, in one
//! place. Pure; the runner asks it for every change and persists what it answers.
//!
//! On the wire a replay's state stays the `ReplayState` value it always was; the
//! wait for the archive (docs/operations.md, "Read-your-writes") is RUNNING with no
//! cutoff chosen yet, so clients that know only the proto values see nothing new.

use payledger_proto::v1;

/// A replay's phase, as the coordinator drives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplayPhase {
    /// Asked for without a cutoff: waits until the archive holds every record the
    /// stream had at the request (RUNNING with cutoff 0 on the wire).
    WaitingForArchive,
    Running,
    Committing,
    Reconciling,
    Succeeded,
    Failed,
    Cancelled,
}

/// What happens to a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplayEvent {
    /// The archive reached the awaited sequence: the cutoff is chosen.
    ArchiveReached,
    /// Every shard is done and verified.
    ShardsVerified,
    Committed,
    Reconciled,
    Fail,
    Cancel,
}

/// A shard's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShardPhase {
    Pending,
    Running,
    Done,
    Failed,
}

/// What happens to a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShardEvent {
    /// An attempt is placed on a worker.
    Placed,
    /// The attempt's parts and states verified.
    Verified,
    /// The attempt failed; another may follow.
    AttemptFailed,
    /// The attempt failed and was the last one allowed.
    GaveUp,
    /// A resumed replay runs again every shard that is not done: an attempt that
    /// was running when a coordinator stopped is lost.
    Resumed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum IllegalTransition {
    #[error("a replay that is {from:?} cannot take {event:?}")]
    Replay {
        from: ReplayPhase,
        event: ReplayEvent,
    },
    #[error("a shard that is {from:?} cannot take {event:?}")]
    Shard { from: ShardPhase, event: ShardEvent },
    #[error("state value {0} is not a known replay state")]
    UnknownReplayState(i32),
    #[error("state value {0} is not a known shard state")]
    UnknownShardState(i32),
}

impl ReplayPhase {
    /// The phase of `replay` as persisted.
    pub fn of(replay: &v1::Replay) -> Result<Self, IllegalTransition> {
        use v1::ReplayState as S;
        Ok(match S::try_from(replay.state) {
            Ok(S::Running) if replay.cutoff == 0 => Self::WaitingForArchive,
            Ok(S::Running) => Self::Running,
            Ok(S::Committing) => Self::Committing,
            Ok(S::Reconciling) => Self::Reconciling,
            Ok(S::Succeeded) => Self::Succeeded,
            Ok(S::Failed) => Self::Failed,
            Ok(S::Cancelled) => Self::Cancelled,
            Ok(S::Unspecified) | Err(_) => {
                return Err(IllegalTransition::UnknownReplayState(replay.state));
            }
        })
    }

    pub fn to_proto(self) -> v1::ReplayState {
        use v1::ReplayState as S;
        match self {
            Self::WaitingForArchive | Self::Running => S::Running,
            Self::Committing => S::Committing,
            Self::Reconciling => S::Reconciling,
            Self::Succeeded => S::Succeeded,
            Self::Failed => S::Failed,
            Self::Cancelled => S::Cancelled,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Whether a commit may exist or be on its way: it is never taken back, so a
    /// replay past this point cannot be cancelled.
    pub fn has_committed(self) -> bool {
        matches!(self, Self::Committing | Self::Reconciling | Self::Succeeded)
    }

    /// The phase after `event`, or why `event` cannot happen now.
    pub fn transition(self, event: ReplayEvent) -> Result<Self, IllegalTransition> {
        use ReplayEvent as E;
        use ReplayPhase as P;
        match (self, event) {
            (P::WaitingForArchive, E::ArchiveReached) => Ok(P::Running),
            (P::Running, E::ShardsVerified) => Ok(P::Committing),
            (P::Committing, E::Committed) => Ok(P::Reconciling),
            (P::Reconciling, E::Reconciled) => Ok(P::Succeeded),
            (P::WaitingForArchive | P::Running, E::Cancel) => Ok(P::Cancelled),
            (phase, E::Fail) if !phase.is_terminal() => Ok(P::Failed),
            (from, event) => Err(IllegalTransition::Replay { from, event }),
        }
    }
}

impl ShardPhase {
    pub fn of(shard: &v1::ShardStatus) -> Result<Self, IllegalTransition> {
        use v1::ShardState as S;
        Ok(match S::try_from(shard.state) {
            Ok(S::Pending) => Self::Pending,
            Ok(S::Running) => Self::Running,
            Ok(S::Done) => Self::Done,
            Ok(S::Failed) => Self::Failed,
            Ok(S::Unspecified) | Err(_) => {
                return Err(IllegalTransition::UnknownShardState(shard.state));
            }
        })
    }

    pub fn to_proto(self) -> v1::ShardState {
        use v1::ShardState as S;
        match self {
            Self::Pending => S::Pending,
            Self::Running => S::Running,
            Self::Done => S::Done,
            Self::Failed => S::Failed,
        }
    }

    pub fn transition(self, event: ShardEvent) -> Result<Self, IllegalTransition> {
        use ShardEvent as E;
        use ShardPhase as P;
        match (self, event) {
            (P::Pending, E::Placed) => Ok(P::Running),
            (P::Running, E::Verified) => Ok(P::Done),
            (P::Running, E::AttemptFailed) => Ok(P::Pending),
            (P::Running, E::GaveUp) => Ok(P::Failed),
            // A done shard's verified parts are kept; the rest start over.
            (P::Done, E::Resumed) => Ok(P::Done),
            (P::Pending | P::Running | P::Failed, E::Resumed) => Ok(P::Pending),
            (from, event) => Err(IllegalTransition::Shard { from, event }),
        }
    }
}

/// Moves `replay` on by `event`, writing the new state into it.
pub(crate) fn advance(
    replay: &mut v1::Replay,
    event: ReplayEvent,
) -> Result<ReplayPhase, IllegalTransition> {
    let next = ReplayPhase::of(replay)?.transition(event)?;
    replay.state = next.to_proto().into();
    Ok(next)
}

/// Moves `shard` on by `event`, writing the new state into it.
pub(crate) fn advance_shard(
    shard: &mut v1::ShardStatus,
    event: ShardEvent,
) -> Result<ShardPhase, IllegalTransition> {
    let next = ShardPhase::of(shard)?.transition(event)?;
    shard.state = next.to_proto().into();
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLAY_PHASES: [ReplayPhase; 7] = [
        ReplayPhase::WaitingForArchive,
        ReplayPhase::Running,
        ReplayPhase::Committing,
        ReplayPhase::Reconciling,
        ReplayPhase::Succeeded,
        ReplayPhase::Failed,
        ReplayPhase::Cancelled,
    ];
    const REPLAY_EVENTS: [ReplayEvent; 6] = [
        ReplayEvent::ArchiveReached,
        ReplayEvent::ShardsVerified,
        ReplayEvent::Committed,
        ReplayEvent::Reconciled,
        ReplayEvent::Fail,
        ReplayEvent::Cancel,
    ];
    const SHARD_PHASES: [ShardPhase; 4] = [
        ShardPhase::Pending,
        ShardPhase::Running,
        ShardPhase::Done,
        ShardPhase::Failed,
    ];
    const SHARD_EVENTS: [ShardEvent; 5] = [
        ShardEvent::Placed,
        ShardEvent::Verified,
        ShardEvent::AttemptFailed,
        ShardEvent::GaveUp,
        ShardEvent::Resumed,
    ];

    #[test]
    fn replay_transitions_are_exactly_the_table() {
        use ReplayEvent as E;
        use ReplayPhase as P;
        let legal = [
            (P::WaitingForArchive, E::ArchiveReached, P::Running),
            (P::WaitingForArchive, E::Fail, P::Failed),
            (P::WaitingForArchive, E::Cancel, P::Cancelled),
            (P::Running, E::ShardsVerified, P::Committing),
            (P::Running, E::Fail, P::Failed),
            (P::Running, E::Cancel, P::Cancelled),
            (P::Committing, E::Committed, P::Reconciling),
            (P::Committing, E::Fail, P::Failed),
            (P::Reconciling, E::Reconciled, P::Succeeded),
            (P::Reconciling, E::Fail, P::Failed),
        ];
        for from in REPLAY_PHASES {
            for event in REPLAY_EVENTS {
                let expected = legal
                    .iter()
                    .find(|(f, e, _)| (*f, *e) == (from, event))
                    .map(|(_, _, to)| *to)
                    .ok_or(IllegalTransition::Replay { from, event });
                assert_eq!(from.transition(event), expected, "{from:?} + {event:?}");
            }
        }
    }

    #[test]
    fn shard_transitions_are_exactly_the_table() {
        use ShardEvent as E;
        use ShardPhase as P;
        let legal = [
            (P::Pending, E::Placed, P::Running),
            (P::Pending, E::Resumed, P::Pending),
            (P::Running, E::Verified, P::Done),
            (P::Running, E::AttemptFailed, P::Pending),
            (P::Running, E::GaveUp, P::Failed),
            (P::Running, E::Resumed, P::Pending),
            (P::Done, E::Resumed, P::Done),
            (P::Failed, E::Resumed, P::Pending),
        ];
        for from in SHARD_PHASES {
            for event in SHARD_EVENTS {
                let expected = legal
                    .iter()
                    .find(|(f, e, _)| (*f, *e) == (from, event))
                    .map(|(_, _, to)| *to)
                    .ok_or(IllegalTransition::Shard { from, event });
                assert_eq!(from.transition(event), expected, "{from:?} + {event:?}");
            }
        }
    }

    #[test]
    fn wire_values_are_unchanged_and_waiting_is_running_without_a_cutoff() {
        let wire = |phase: ReplayPhase| phase.to_proto() as i32;
        assert_eq!(
            REPLAY_PHASES.map(wire),
            [1, 1, 2, 3, 4, 5, 6],
            "ReplayState values of replay.proto"
        );
        assert_eq!(
            SHARD_PHASES.map(|p| p.to_proto() as i32),
            [1, 2, 3, 4],
            "ShardState values of replay.proto"
        );
        for phase in REPLAY_PHASES {
            let replay = v1::Replay {
                state: wire(phase),
                cutoff: if phase == ReplayPhase::WaitingForArchive {
                    0
                } else {
                    42
                },
                ..Default::default()
            };
            assert_eq!(ReplayPhase::of(&replay), Ok(phase));
        }
        for phase in SHARD_PHASES {
            let shard = v1::ShardStatus {
                state: phase.to_proto().into(),
                ..Default::default()
            };
            assert_eq!(ShardPhase::of(&shard), Ok(phase));
        }
        let unknown = v1::Replay {
            state: 0,
            ..Default::default()
        };
        assert_eq!(
            ReplayPhase::of(&unknown),
            Err(IllegalTransition::UnknownReplayState(0))
        );
    }

    #[test]
    fn advance_writes_the_new_state_and_leaves_an_illegal_one_unchanged() {
        let mut replay = v1::Replay {
            state: v1::ReplayState::Running.into(),
            cutoff: 7,
            ..Default::default()
        };
        assert_eq!(
            advance(&mut replay, ReplayEvent::ShardsVerified),
            Ok(ReplayPhase::Committing)
        );
        assert_eq!(replay.state, i32::from(v1::ReplayState::Committing));
        assert!(advance(&mut replay, ReplayEvent::Cancel).is_err());
        assert_eq!(replay.state, i32::from(v1::ReplayState::Committing));
        let mut shard = v1::ShardStatus {
            state: v1::ShardState::Done.into(),
            ..Default::default()
        };
        assert!(advance_shard(&mut shard, ShardEvent::Placed).is_err());
        assert_eq!(shard.state, i32::from(v1::ShardState::Done));
    }
}
