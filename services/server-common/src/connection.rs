//! The connection losses of a NATS client, as its event callback reports them.
//!
//! A request or a JetStream publish in flight when the connection drops can
//! never be answered: its reply was due on the connection that is gone. Callers
//! that wait for such an answer watch for a loss, so that they give up at once
//! instead of waiting out their timeout.

use std::future::Future;

use tokio::sync::watch;

/// Counts the times the client lost its connection (`Event::Disconnected`).
#[derive(Clone, Debug)]
pub struct ConnectionLosses(watch::Receiver<u64>);

/// Raised when the connection was lost while an answer was awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection to NATS was lost")]
pub struct ConnectionLost;

impl ConnectionLosses {
    /// The counter and its recorder, for the event callback of a client to be connected.
    pub fn channel() -> (Self, LossRecorder) {
        let (tx, rx) = watch::channel(0);
        (Self(rx), LossRecorder(tx))
    }

    /// Losses that will never happen: for a caller without a connection to watch.
    pub fn none() -> Self {
        Self::channel().0
    }

    /// Watches for a loss from now on.
    pub fn since_now(&self) -> LossWatch {
        let rx = self.0.clone();
        let start = *rx.borrow();
        LossWatch { rx, start }
    }

    /// Losses so far.
    pub fn count(&self) -> u64 {
        *self.0.borrow()
    }
}

/// The sending half, held by the client's event callback.
pub struct LossRecorder(watch::Sender<u64>);

impl LossRecorder {
    pub fn record(&self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// Resolves once the connection was lost after it was made.
pub struct LossWatch {
    rx: watch::Receiver<u64>,
    start: u64,
}

impl LossWatch {
    /// Whether the connection was lost since this watch was made.
    pub fn lost_already(&self) -> bool {
        *self.rx.borrow() != self.start
    }

    /// Resolves once the connection was lost since this watch was made (at once
    /// if it already was); never, once the client is gone.
    pub async fn lost(&mut self) {
        let start = self.start;
        if self.rx.wait_for(|n| *n != start).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// `fut`'s output, or [`ConnectionLost`] if the connection is lost first. An
    /// answer already there wins over a loss seen at the same moment.
    pub async fn or_lost<F: Future>(&mut self, fut: F) -> Result<F::Output, ConnectionLost> {
        tokio::select! {
            biased;
            out = fut => Ok(out),
            () = self.lost() => Err(ConnectionLost),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_sees_only_losses_after_it_was_made() {
        let (losses, recorder) = ConnectionLosses::channel();
        recorder.record();
        let mut watch = losses.since_now();
        assert!(!watch.lost_already());
        {
            let pending = watch.or_lost(std::future::pending::<()>());
            tokio::pin!(pending);
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(20), &mut pending)
                    .await
                    .is_err(),
                "no loss yet"
            );
            recorder.record();
            assert_eq!(pending.await, Err(ConnectionLost));
        }
        assert!(watch.lost_already());
        // Idempotent: a watch that saw a loss keeps seeing it.
        assert_eq!(
            watch.or_lost(std::future::pending::<()>()).await,
            Err(ConnectionLost)
        );
        // An answer that is there wins.
        assert_eq!(watch.or_lost(async { 7 }).await, Ok(7));
    }

    #[tokio::test]
    async fn a_watch_of_no_connection_never_fires() {
        let mut watch = ConnectionLosses::none().since_now();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), watch.lost())
                .await
                .is_err()
        );
    }
}
