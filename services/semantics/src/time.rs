//! UTC days as the number of days since 1970-01-01 (Parquet `DATE`).

use std::fmt;

use serde::{Deserialize, Serialize};

pub const MICROS_PER_DAY: i64 = 86_400_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Day(pub i32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a date of the form YYYY-MM-DD")]
pub struct DayParseError(pub String);

impl Day {
    pub fn of_micros(t_us: i64) -> Day {
        Day(t_us.div_euclid(MICROS_PER_DAY) as i32)
    }

    pub fn start_us(self) -> i64 {
        i64::from(self.0) * MICROS_PER_DAY
    }

    pub fn end_us(self) -> i64 {
        self.start_us() + MICROS_PER_DAY
    }

    pub fn from_ymd(year: i32, month: u32, day: u32) -> Option<Day> {
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(Day(days_from_civil(year, month, day)))
    }

    pub fn ymd(self) -> (i32, u32, u32) {
        civil_from_days(self.0)
    }

    pub fn parse(s: &str) -> Result<Day, DayParseError> {
        let err = || DayParseError(s.to_string());
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(err());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, DayParseError> {
            let part = &s[r];
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err());
            }
            part.parse().map_err(|_| err())
        };
        let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        Day::from_ymd(y as i32, m, d).ok_or_else(err)
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian).
fn days_from_civil(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400) as u32;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i32 - 719_468
}

fn civil_from_days(z: i32) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u32;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe as i32 + era * 400 + i32::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip_through_the_calendar() {
        for z in -800_000..800_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(Day::from_ymd(y, m, d), Some(Day(z)));
        }
        assert_eq!(Day(0).to_string(), "1970-01-01");
        assert_eq!(Day::parse("2024-02-29"), Ok(Day(19_782)));
        assert!(Day::parse("2023-02-29").is_err());
        assert!(Day::parse("2024-2-29").is_err());
        assert!(Day::parse("+024-02-29").is_err());
        assert_eq!(Day::of_micros(-1), Day(-1));
    }
}
