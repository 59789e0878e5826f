//! What each message carries besides its stamp, decided from (producer,
//! sequence) alone so that consumers recompute it and check what they get:
//! its scheduled delivery time (`--delay-ms`, `--delay-spread-ms`,
//! `--due-burst`), its priority (`--priorities`) and whether the run's
//! filter passes it (`--filter-tag-pass-pct`, `--filter-sql-pass-pct`).

use keelmq::client::{FilterSpec, Record};

/// Tag of the messages a tag filter passes, and of the others.
pub const PASS_TAG: &str = "pass";
pub const OTHER_TAG: &str = "other";
/// Property an SQL filter looks at: `k=1` passes, `k=0` does not.
pub const SQL_PROPERTY: &str = "k";

/// When messages are due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DueSpec {
    /// Delay after the scheduled send time (or, for a burst, after the
    /// run's start), ms.
    pub delay_ms: u64,
    /// Uniform extra in [0, spread_ms), ms.
    pub spread_ms: u64,
    /// `--due-burst`: every message due at start + delay (+ spread),
    /// whenever it was sent.
    pub burst: bool,
}

impl DueSpec {
    /// The absolute due time (ms since the epoch) of message (`pid`,
    /// `seq`) scheduled `sched_ns` after the run's start `epoch0_ns` (ns
    /// since the epoch).
    pub fn due_ms(&self, epoch0_ns: u64, pid: u32, seq: u32, sched_ns: u64) -> i64 {
        let from_ns = if self.burst {
            epoch0_ns
        } else {
            epoch0_ns + sched_ns
        };
        let base_ms = from_ns.div_ceil(1_000_000);
        let extra = if self.spread_ms == 0 {
            0
        } else {
            mix(pid, seq, 0x5EED) % self.spread_ms
        };
        (base_ms + self.delay_ms + extra) as i64
    }

    /// A burst's earliest due time (ms since the epoch): start + delay.
    pub fn first_due_ms(&self, epoch0_ns: u64) -> i64 {
        (epoch0_ns.div_ceil(1_000_000) + self.delay_ms) as i64
    }
}

/// Which messages the run's filter passes, and how it is written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FilterShape {
    pub kind: FilterKind,
    /// Share of messages that pass, percent (0..=100).
    pub pass_pct: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKind {
    Tag,
    Sql,
}

impl FilterShape {
    /// Whether message `seq` of a producer passes: exactly `pass_pct`
    /// percent of every producer's messages (to a millionth), evenly
    /// spread.
    pub fn passes(&self, seq: u32) -> bool {
        let ppm = (self.pass_pct * 10_000.0).round().clamp(0.0, 1e6) as u64;
        let s = u64::from(seq);
        (s + 1) * ppm / 1_000_000 > s * ppm / 1_000_000
    }

    /// The filter the consumers subscribe with.
    pub fn spec(&self) -> FilterSpec {
        match self.kind {
            FilterKind::Tag => FilterSpec::tag(PASS_TAG),
            FilterKind::Sql => FilterSpec::sql(format!("{SQL_PROPERTY} = 1")),
        }
    }

    /// Marks `r` as passing or not.
    pub fn mark(&self, r: Record, pass: bool) -> Record {
        match self.kind {
            FilterKind::Tag => r.with_tag(if pass { PASS_TAG } else { OTHER_TAG }),
            FilterKind::Sql => r.with_property(SQL_PROPERTY, if pass { "1" } else { "0" }),
        }
    }

    /// As reported: `TAG pass` or `SQL92 k = 1`.
    pub fn describe(&self) -> String {
        let s = self.spec();
        format!("{} {}", s.kind.name(), s.expression)
    }
}

/// Everything a run puts on its messages besides the stamp.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Shape {
    pub due: Option<DueSpec>,
    /// Priorities 0..n, each drawn at random (deterministically).
    pub priorities: Option<u8>,
    pub filter: Option<FilterShape>,
}

impl Shape {
    /// Whether message `seq` must reach the consumers.
    pub fn expected(&self, seq: u32) -> bool {
        self.filter.is_none_or(|f| f.passes(seq))
    }
}

/// Priority of message (`pid`, `seq`) among `n`: 0..n, uniformly at
/// random but deterministic (a round robin would line up with the
/// round robin over queues and with the filter's evenly spread passes).
pub fn priority_of(pid: u32, seq: u32, n: u8) -> u8 {
    (mix(pid, seq, 0x9A1) % u64::from(n.max(1))) as u8
}

/// A deterministic 64-bit hash of (producer, sequence, salt).
pub fn mix(pid: u32, seq: u32, salt: u64) -> u64 {
    let mut x = (u64::from(pid) << 32 | u64::from(seq)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// How late (µs) a message due at `due_ms` (ms since the epoch) is when
/// received at `wall_ns` (ns since the epoch); `None` when it came early.
pub fn lateness_us(wall_ns: u64, due_ms: i64) -> Option<u64> {
    let due_ns = due_ms.max(0) as u64 * 1_000_000;
    wall_ns.checked_sub(due_ns).map(|d| d / 1000)
}

/// Now, ns since the Unix epoch.
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_spread_evenly() {
        for n in 1..=10u8 {
            for pid in 0..3 {
                let mut count = [0u32; 10];
                for seq in 0..10_000 * u32::from(n) {
                    let p = priority_of(pid, seq, n);
                    assert!(p < n);
                    count[p as usize] += 1;
                }
                assert!(
                    count[..n as usize]
                        .iter()
                        .all(|&c| (9_600..10_400).contains(&c)),
                    "{count:?}"
                );
            }
        }
        // Not lined up with the filter's passes (every 10th message) nor
        // with queues taken in turn: each priority gets its share of both.
        let f = FilterShape {
            kind: FilterKind::Tag,
            pass_pct: 10.0,
        };
        let mut passing = [0u32; 10];
        let mut queue0 = [0u32; 10];
        for seq in 0..100_000 {
            let p = priority_of(0, seq, 10) as usize;
            if f.passes(seq) {
                passing[p] += 1;
            }
            if seq % 10 == 0 {
                queue0[p] += 1;
            }
        }
        for c in [passing, queue0] {
            assert!(c.iter().all(|&c| (800..1200).contains(&c)), "{c:?}");
        }
    }

    #[test]
    fn pass_share_is_exact_and_spread() {
        for (pct, per_10k) in [
            (0.0, 0),
            (1.0, 100),
            (12.5, 1250),
            (50.0, 5000),
            (100.0, 10_000),
        ] {
            let f = FilterShape {
                kind: FilterKind::Tag,
                pass_pct: pct,
            };
            let n = (0..10_000).filter(|&s| f.passes(s)).count();
            assert_eq!(n, per_10k, "{pct}%");
            // Evenly spread: every 100 consecutive messages have pct of them.
            if pct == 1.0 {
                for w in 0..100 {
                    assert_eq!((w * 100..(w + 1) * 100).filter(|&s| f.passes(s)).count(), 1);
                }
            }
        }
        let small = FilterShape {
            kind: FilterKind::Sql,
            pass_pct: 0.01,
        };
        assert_eq!((0..1_000_000).filter(|&s| small.passes(s)).count(), 100);
    }

    #[test]
    fn filter_marks_and_expression() {
        let t = FilterShape {
            kind: FilterKind::Tag,
            pass_pct: 1.0,
        };
        assert_eq!(t.mark(Record::new("x"), true).tag.as_deref(), Some("pass"));
        assert_eq!(
            t.mark(Record::new("x"), false).tag.as_deref(),
            Some("other")
        );
        assert_eq!(t.describe(), "TAG pass");
        let s = FilterShape {
            kind: FilterKind::Sql,
            pass_pct: 1.0,
        };
        assert_eq!(
            s.mark(Record::new("x"), true).properties,
            vec![("k".to_string(), "1".to_string())]
        );
        assert_eq!(s.describe(), "SQL92 k = 1");
        let shape = Shape {
            filter: Some(t),
            ..Shape::default()
        };
        assert!(shape.expected(99) && !shape.expected(0));
        assert!(Shape::default().expected(0));
    }

    #[test]
    fn lateness_and_early() {
        let due = 1_700_000_000_000i64;
        let due_ns = due as u64 * 1_000_000;
        assert_eq!(lateness_us(due_ns, due), Some(0));
        assert_eq!(lateness_us(due_ns + 1_500_999, due), Some(1500));
        assert_eq!(lateness_us(due_ns - 1, due), None);
        assert_eq!(lateness_us(0, due), None);
    }

    #[test]
    fn due_times() {
        let epoch0 = 1_700_000_000_123_400_000u64; // ns, not on a ms boundary
        let d = DueSpec {
            delay_ms: 1000,
            spread_ms: 0,
            burst: false,
        };
        // Rounded up to the ms after the scheduled send time, plus the delay.
        assert_eq!(d.due_ms(epoch0, 0, 0, 0), 1_700_000_000_124 + 1000);
        assert_eq!(d.due_ms(epoch0, 0, 7, 2_000_000), 1_700_000_000_126 + 1000);
        // Never before send + delay.
        for sched in [0u64, 1, 599_999, 600_000, 600_001, 5_000_000_000] {
            let due = d.due_ms(epoch0, 1, 1, sched) as u64 * 1_000_000;
            assert!(due >= epoch0 + sched + 1_000_000_000);
            assert!(due < epoch0 + sched + 1_001_000_000);
        }
        // A burst: every message due in [start + D, start + D + S), whenever sent.
        let b = DueSpec {
            delay_ms: 20_000,
            spread_ms: 1000,
            burst: true,
        };
        let start = 1_700_000_000_124i64 + 20_000;
        let mut per_ms = vec![0u32; 1000];
        for seq in 0..500_000 {
            let due = b.due_ms(epoch0, seq % 4, seq, u64::from(seq) * 1000);
            assert!((start..start + 1000).contains(&due), "{due}");
            per_ms[(due - start) as usize] += 1;
        }
        // Uniform: 500 a ms on average; no ms far off.
        assert!(
            per_ms.iter().all(|&n| (350..650).contains(&n)),
            "{per_ms:?}"
        );
        assert_eq!(b.first_due_ms(epoch0), start);
        // Deterministic: the consumer recomputes the producer's due time.
        assert_eq!(b.due_ms(epoch0, 3, 9, 0), b.due_ms(epoch0, 3, 9, 0));
    }
}
