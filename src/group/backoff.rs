//! Retry backoff: how long a failed delivery waits before its next attempt.
//!
//! A list of durations, one per attempt (the first retry waits the first
//! entry); attempts past the end wait the last entry. RocketMQ's list is the
//! default. Durations are written `250ms`, `10s`, `2m`, `1h` (a bare number
//! is milliseconds).

use std::fmt;

/// Most entries in a backoff list.
pub const BACKOFF_STEPS_MAX: usize = 64;
/// Longest single backoff step: 7 days, in milliseconds.
pub const BACKOFF_STEP_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// RocketMQ's retry schedule: 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m
/// 30m 1h 2h.
pub const ROCKETMQ_BACKOFF_MS: [u64; 16] = [
    10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000, 480_000, 540_000,
    600_000, 1_200_000, 1_800_000, 3_600_000, 7_200_000,
];

/// A retry schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    steps_ms: Vec<u64>,
}

/// Why a backoff list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackoffError {
    #[error("a backoff list needs at least one duration")]
    Empty,
    #[error("a backoff list holds at most {BACKOFF_STEPS_MAX} durations, not {0}")]
    TooLong(usize),
    #[error("`{0}` is not a duration (expected a number with ms, s, m or h, like 250ms or 10s)")]
    Malformed(String),
    #[error("a backoff step of {0} ms is longer than the {BACKOFF_STEP_MS_MAX} ms allowed")]
    TooLarge(u64),
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            steps_ms: ROCKETMQ_BACKOFF_MS.to_vec(),
        }
    }
}

impl Backoff {
    /// A schedule of these steps, in milliseconds.
    pub fn new(steps_ms: Vec<u64>) -> Result<Backoff, BackoffError> {
        if steps_ms.is_empty() {
            return Err(BackoffError::Empty);
        }
        if steps_ms.len() > BACKOFF_STEPS_MAX {
            return Err(BackoffError::TooLong(steps_ms.len()));
        }
        if let Some(&big) = steps_ms.iter().find(|&&s| s > BACKOFF_STEP_MS_MAX) {
            return Err(BackoffError::TooLarge(big));
        }
        Ok(Backoff { steps_ms })
    }

    /// Parses a list of durations separated by spaces or commas.
    pub fn parse(text: &str) -> Result<Backoff, BackoffError> {
        let steps = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(parse_duration_ms)
            .collect::<Result<Vec<_>, _>>()?;
        Backoff::new(steps)
    }

    /// How long the retry after `failed_attempt` (1 for the first delivery)
    /// waits.
    pub fn delay_ms(&self, failed_attempt: u32) -> u64 {
        let i = (failed_attempt.max(1) - 1) as usize;
        self.steps_ms[i.min(self.steps_ms.len() - 1)]
    }

    /// The steps, in milliseconds.
    pub fn steps_ms(&self) -> &[u64] {
        &self.steps_ms
    }
}

impl fmt::Display for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &ms) in self.steps_ms.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match ms {
                ms if ms > 0 && ms % 3_600_000 == 0 => write!(f, "{}h", ms / 3_600_000)?,
                ms if ms > 0 && ms % 60_000 == 0 => write!(f, "{}m", ms / 60_000)?,
                ms if ms > 0 && ms % 1000 == 0 => write!(f, "{}s", ms / 1000)?,
                ms => write!(f, "{ms}ms")?,
            }
        }
        Ok(())
    }
}

/// `250ms`, `10s`, `2m`, `1h`, or a bare number of milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, BackoffError> {
    let bad = || BackoffError::Malformed(s.to_string());
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let scale = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_rocketmqs_schedule_and_the_last_step_repeats() {
        let b = Backoff::default();
        assert_eq!(b.delay_ms(1), 10_000);
        assert_eq!(b.delay_ms(2), 30_000);
        assert_eq!(b.delay_ms(16), 7_200_000);
        assert_eq!(b.delay_ms(40), 7_200_000);
        assert_eq!(
            b.to_string(),
            "10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h"
        );
        assert_eq!(Backoff::parse(&b.to_string()).unwrap(), b);
    }

    #[test]
    fn lists_take_milliseconds_and_refuse_what_they_cannot_mean() {
        let b = Backoff::parse("5ms, 250ms 1s,2m").unwrap();
        assert_eq!(b.steps_ms(), &[5, 250, 1000, 120_000]);
        assert_eq!(Backoff::parse("40").unwrap().steps_ms(), &[40]);
        assert_eq!(Backoff::parse(""), Err(BackoffError::Empty));
        assert_eq!(
            Backoff::parse("10s 3x"),
            Err(BackoffError::Malformed("3x".into()))
        );
        assert_eq!(
            Backoff::parse("ms"),
            Err(BackoffError::Malformed("ms".into()))
        );
        assert_eq!(
            Backoff::parse("8d").unwrap_err(),
            BackoffError::Malformed("8d".into())
        );
        assert_eq!(
            Backoff::parse("169h"),
            Err(BackoffError::TooLarge(169 * 3_600_000))
        );
        assert!(matches!(
            Backoff::parse("99999999999999999999h"),
            Err(BackoffError::Malformed(_))
        ));
        assert_eq!(Backoff::new(vec![1; 65]), Err(BackoffError::TooLong(65)));
    }
}
