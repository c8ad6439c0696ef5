//! A reader of the log or of a bucket that has stopped receiving while there is
//! more to read. The client library re-creates an ordered consumer it has lost,
//! but after a partition heals one can stay silent — no message, no error — while
//! its stream grows (seen in the fault matrix's partition row, README "Fault
//! matrix"). Every reader notes each delivery; at each check it compares what it
//! has read with where its stream ends, and fails when it is behind and has been
//! silent for `--nats-stall-timeout`, so that its consumer is made again from the
//! record after the last one read.

use std::time::Duration;

use tokio::time::Instant;

pub struct Stall {
    timeout: Duration,
    last_delivery: Instant,
}

impl Stall {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            last_delivery: Instant::now(),
        }
    }

    pub fn delivered(&mut self) {
        self.last_delivery = Instant::now();
    }

    /// When to check next: often enough that a stall is noticed within about
    /// 1.5 × the timeout.
    pub fn checks(&self) -> tokio::time::Interval {
        let every = (self.timeout / 2).max(Duration::from_millis(100));
        let mut interval = tokio::time::interval_at(Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    }

    /// Fails when nothing was delivered for the timeout while the stream holds
    /// records past `read` (it ends at `end`). `what` names the reader.
    pub fn judge(&self, what: &str, read: u64, end: u64) -> anyhow::Result<()> {
        self.judge_at(what, read, end, Instant::now())
    }

    fn judge_at(&self, what: &str, read: u64, end: u64, now: Instant) -> anyhow::Result<()> {
        let silent = now.saturating_duration_since(self.last_delivery);
        if end > read && silent >= self.timeout {
            anyhow::bail!(
                "{what} stalled: nothing delivered for {silent:.1?} (--nats-stall-timeout {:?}) while the stream holds sequence {end}, past {read} read; making its consumer again",
                self.timeout
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_and_behind_is_a_stall_silent_and_current_is_not() {
        let stall = Stall::new(Duration::from_secs(10));
        let t = stall.last_delivery;
        // Behind, but delivering recently: the consumer is just catching up.
        assert!(
            stall
                .judge_at("p0", 5, 9, t + Duration::from_secs(9))
                .is_ok()
        );
        // Silent for the timeout, but nothing more to read: an idle stream.
        assert!(
            stall
                .judge_at("p0", 9, 9, t + Duration::from_secs(60))
                .is_ok()
        );
        let e = stall
            .judge_at("p0", 5, 9, t + Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p0 stalled") && e.contains("sequence 9, past 5"),
            "{e}"
        );
    }
}
