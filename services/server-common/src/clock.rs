//! The one wall clock of every service, the CLI and the tests: UTC microseconds
//! since the epoch, the unit of every time on the wire and in the log.
//!
//! The semantics crate reads no wall clock (docs/semantics.md, "Order and the two
//! clocks"); everything that stamps or compares against "now" reads this one.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in UTC microseconds since the epoch (negative before 1970, saturating at
/// the ends of `i64`, which no real clock reaches).
pub fn now_us() -> i64 {
    micros_since_epoch(SystemTime::now())
}

/// `at` in UTC microseconds since the epoch.
pub fn micros_since_epoch(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::{micros_since_epoch, now_us};

    #[test]
    fn times_are_microseconds_either_side_of_the_epoch() {
        let at = |us: u64| UNIX_EPOCH + Duration::from_micros(us);
        assert_eq!(micros_since_epoch(UNIX_EPOCH), 0);
        assert_eq!(
            micros_since_epoch(at(1_764_547_200_000_001)),
            1_764_547_200_000_001
        );
        assert_eq!(
            micros_since_epoch(UNIX_EPOCH - Duration::from_micros(1_500)),
            -1_500
        );
    }

    #[test]
    fn now_is_after_the_code_was_written() {
        // 2026-01-01T00:00:00Z: a clock reading before it is a broken conversion.
        assert!(now_us() > 1_767_225_600_000_000, "{}", now_us());
    }
}
