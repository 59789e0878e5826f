//! Retention decisions (no I/O): which whole segments to delete, oldest
//! first, by age and by the shard's total size. The active (last) segment
//! is never deleted, nor one whose bytes are not all durable yet (a write
//! may still be on its way to it, and recovery must never find the
//! durable prefix of the log gone behind it).

use super::segment::SegmentInfo;

/// Retention limits; 0 disables a limit.
#[derive(Clone, Copy, Debug)]
pub struct RetentionPolicy {
    pub retention_ms: u64,
    pub retention_bytes: u64,
}

/// Bases of the segments to delete, oldest first. `segments` is ascending;
/// `synced` is the log's durable position.
pub fn segments_to_delete(
    segments: &[SegmentInfo],
    policy: RetentionPolicy,
    now_ms: i64,
    synced: u64,
) -> Vec<u64> {
    let Some((_active, closed)) = segments.split_last() else {
        return Vec::new();
    };
    let mut total: u64 = segments.iter().map(|s| s.capacity).sum();
    let mut out = Vec::new();
    for s in closed {
        let too_old = policy.retention_ms > 0
            && now_ms.saturating_sub(s.max_append_time_ms) > policy.retention_ms as i64;
        let too_big = policy.retention_bytes > 0 && total > policy.retention_bytes;
        if !(too_old || too_big) || s.data_end() > synced {
            break;
        }
        total -= s.capacity;
        out.push(s.base);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(base: u64, t: i64) -> SegmentInfo {
        SegmentInfo {
            base,
            capacity: 100,
            used: 90,
            max_append_time_ms: t,
            key: crate::batch::SegmentKey([0; 16]),
        }
    }

    #[test]
    fn deletes_oldest_first_and_never_the_active_segment() {
        let segs = [seg(0, 10), seg(100, 20), seg(200, 30), seg(300, 40)];
        let by_age = RetentionPolicy {
            retention_ms: 15,
            retention_bytes: 0,
        };
        assert_eq!(
            segments_to_delete(&segs, by_age, 40, u64::MAX),
            vec![0, 100]
        );
        let by_size = RetentionPolicy {
            retention_ms: 0,
            retention_bytes: 250,
        };
        assert_eq!(
            segments_to_delete(&segs, by_size, 40, u64::MAX),
            vec![0, 100]
        );
        let everything = RetentionPolicy {
            retention_ms: 1,
            retention_bytes: 1,
        };
        assert_eq!(
            segments_to_delete(&segs, everything, 1000, u64::MAX),
            vec![0, 100, 200]
        );
        let none = RetentionPolicy {
            retention_ms: 0,
            retention_bytes: 0,
        };
        assert!(segments_to_delete(&segs, none, 1000, u64::MAX).is_empty());
        assert!(segments_to_delete(&[], everything, 1000, u64::MAX).is_empty());
    }

    #[test]
    fn an_old_segment_behind_a_young_one_waits_its_turn() {
        // Deletion is by prefix: the log never has holes.
        let segs = [seg(0, 100), seg(100, 10), seg(200, 200)];
        let p = RetentionPolicy {
            retention_ms: 50,
            retention_bytes: 0,
        };
        assert!(segments_to_delete(&segs, p, 120, u64::MAX).is_empty());
    }

    #[test]
    fn a_segment_not_yet_durable_waits() {
        let segs = [seg(0, 10), seg(100, 20), seg(200, 30), seg(300, 40)];
        let p = RetentionPolicy {
            retention_ms: 1,
            retention_bytes: 0,
        };
        // The second segment's last batch (ending at 190) is not synced.
        assert_eq!(segments_to_delete(&segs, p, 1000, 189), vec![0]);
        assert_eq!(segments_to_delete(&segs, p, 1000, 190), vec![0, 100]);
        assert!(segments_to_delete(&segs, p, 1000, 50).is_empty());
    }
}
