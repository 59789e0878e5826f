//! Segment files: `shard-N/<base position, 20 digits>.log`, each created at
//! its full capacity (fallocate) so appends never grow the file.

use std::path::{Path, PathBuf};

/// File name of the segment starting at log position `base`.
pub fn segment_file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// Path of the segment starting at `base` in `dir`.
pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(segment_file_name(base))
}

/// Parses a segment file name back to its base position.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment bases found in `dir`, ascending.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(base) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// What the log knows of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub base: u64,
    /// File size: the segment holds positions `base..base + capacity`.
    pub capacity: u64,
    /// Bytes used by batches (the rest is zero padding).
    pub used: u64,
    /// Latest broker append time of a batch in it (0 if empty).
    pub max_append_time_ms: i64,
}

impl SegmentInfo {
    /// First position after this segment.
    pub fn end(&self) -> u64 {
        self.base + self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_numerically() {
        assert_eq!(segment_file_name(4096), "00000000000000004096.log");
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_file_name("123.log"), None);
        assert_eq!(parse_segment_file_name("0000000000000000409a.log"), None);
        assert_eq!(parse_segment_file_name("00000000000000004096.idx"), None);
    }
}
