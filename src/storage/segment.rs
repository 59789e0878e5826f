//! Segment files: `shard-N/<base position, 20 digits>.log`, each created at
//! its full capacity (fallocate) so appends never grow the file, and its
//! index snapshot `<base>.idx` (see `index_snapshot`).
//!
//! The first 4 KiB page of a segment is its header: the same 512-byte
//! record in each of its 8 sectors, each with its own CRC, so a damaged
//! sector costs nothing. The record holds the segment's base (checked
//! against the file name), the secret key of its batch MACs, the end of the
//! previous segment's data (so recovery tells roll padding from lost
//! batches), and the unsynced window the writer kept. The page is written
//! with the segment's first batches, in the same write. Batches start at
//! `base + SEGMENT_HEADER_BYTES`.

use std::path::{Path, PathBuf};

use crate::batch::SegmentKey;

/// Bytes of the header page at the start of every segment.
pub const SEGMENT_HEADER_BYTES: u64 = 4096;
const RECORD_BYTES: usize = 512;
const RECORD_MAGIC: u32 = 0x4B53_4731; // "KSG1"
const RECORD_VERSION: u16 = 1;
const _: () = assert!(SEGMENT_HEADER_BYTES as usize % RECORD_BYTES == 0);
const _: () = assert!(SEGMENT_HEADER_BYTES == super::DMA_ALIGNMENT_BYTES);

/// File name of the segment starting at log position `base`.
pub fn segment_file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// Path of the segment starting at `base` in `dir`.
pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(segment_file_name(base))
}

/// Path of the index snapshot of the segment starting at `base`.
pub fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

/// Parses a segment (`.log`) or index (`.idx`) file name back to its base.
pub fn parse_file_name(name: &str, ext: &str) -> Option<u64> {
    let digits = name.strip_suffix(ext)?.strip_suffix('.')?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Parses a segment file name back to its base position.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    parse_file_name(name, "log")
}

/// What the header page of a segment says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u16,
    pub base: u64,
    /// Where the previous segment's data ends (`base` itself for the first
    /// segment of a log).
    pub prev_end: u64,
    pub key: SegmentKey,
    pub created_ms: i64,
    /// The writer never had more than this many bytes written but not
    /// synced (see `CommitLog`); recovery's torn-tail window.
    pub unsynced_bytes_max: u64,
}

impl SegmentHeader {
    /// The 4 KiB header page.
    pub fn encode_page(&self) -> Vec<u8> {
        let mut rec = [0u8; RECORD_BYTES];
        rec[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        rec[4..6].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        rec[6..8].copy_from_slice(&self.shard.to_le_bytes());
        rec[8..16].copy_from_slice(&self.base.to_le_bytes());
        rec[16..24].copy_from_slice(&self.prev_end.to_le_bytes());
        rec[24..40].copy_from_slice(&self.key.0);
        rec[40..48].copy_from_slice(&self.created_ms.to_le_bytes());
        rec[48..56].copy_from_slice(&self.unsynced_bytes_max.to_le_bytes());
        let crc = crc32fast::hash(&rec[..RECORD_BYTES - 4]);
        rec[RECORD_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        rec.repeat(SEGMENT_HEADER_BYTES as usize / RECORD_BYTES)
    }

    /// Decodes the first intact copy in a header page; `None` when every
    /// copy is damaged (or the page was never written).
    pub fn decode_page(page: &[u8]) -> Option<SegmentHeader> {
        page.chunks_exact(RECORD_BYTES).find_map(decode_record)
    }
}

fn decode_record(rec: &[u8]) -> Option<SegmentHeader> {
    let u64_at = |at: usize| u64::from_le_bytes(rec[at..at + 8].try_into().unwrap());
    let crc = u32::from_le_bytes(rec[RECORD_BYTES - 4..].try_into().unwrap());
    if crc32fast::hash(&rec[..RECORD_BYTES - 4]) != crc
        || u32::from_le_bytes(rec[0..4].try_into().unwrap()) != RECORD_MAGIC
        || u16::from_le_bytes([rec[4], rec[5]]) != RECORD_VERSION
    {
        return None;
    }
    Some(SegmentHeader {
        shard: u16::from_le_bytes([rec[6], rec[7]]),
        base: u64_at(8),
        prev_end: u64_at(16),
        key: SegmentKey(rec[24..40].try_into().unwrap()),
        created_ms: i64::from_le_bytes(rec[40..48].try_into().unwrap()),
        unsynced_bytes_max: u64_at(48),
    })
}

/// What the log knows of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub base: u64,
    /// File size: the segment holds positions `base..base + capacity`.
    pub capacity: u64,
    /// Bytes from `base` to the end of its last batch (the header page
    /// counts: an empty segment has `used == SEGMENT_HEADER_BYTES`).
    pub used: u64,
    /// Latest broker append time of a batch in it (0 if empty).
    pub max_append_time_ms: i64,
    pub key: SegmentKey,
}

impl SegmentInfo {
    /// First position after this segment.
    pub fn end(&self) -> u64 {
        self.base + self.capacity
    }
    /// First position a batch may take.
    pub fn data_start(&self) -> u64 {
        self.base + SEGMENT_HEADER_BYTES
    }
    /// End of the segment's batches.
    pub fn data_end(&self) -> u64 {
        self.base + self.used
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
        let idx = index_path(Path::new("/d"), 4096);
        assert_eq!(
            parse_file_name(idx.file_name().unwrap().to_str().unwrap(), "idx"),
            Some(4096)
        );
    }

    #[test]
    fn header_page_survives_seven_damaged_sectors_of_eight() {
        let h = SegmentHeader {
            shard: 3,
            base: 1 << 30,
            prev_end: (1 << 30) - 77,
            key: SegmentKey([9; 16]),
            created_ms: 1_700_000_000_000,
            unsynced_bytes_max: 32 << 20,
        };
        let mut page = h.encode_page();
        assert_eq!(page.len(), SEGMENT_HEADER_BYTES as usize);
        assert_eq!(SegmentHeader::decode_page(&page), Some(h));
        for sector in 0..7 {
            page[sector * RECORD_BYTES + 100] ^= 1;
            assert_eq!(SegmentHeader::decode_page(&page), Some(h));
        }
        page[7 * RECORD_BYTES + 9] ^= 1;
        assert_eq!(SegmentHeader::decode_page(&page), None);
        assert_eq!(SegmentHeader::decode_page(&[0u8; 4096]), None);
    }
}
