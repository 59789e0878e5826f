//! Index snapshots: per segment, `<base>.idx` lists the segment's batches
//! (position, length, queue, offsets, append time), so a restart rebuilds
//! the indexes from these files and scans only the log written since the
//! last snapshot instead of the whole retained log.
//!
//! A snapshot only ever lists batches below the synced position, so it
//! never names a batch a crash could take back. The file is append-only, in
//! blocks: each append writes one block (at a page boundary, padded to
//! whole pages) and syncs it. A torn last block fails its CRC and is
//! dropped; the blocks before it stand. A segment whose batches are all
//! listed and synced gets a last block flagged *sealed*: its data end is
//! then known and recovery reads nothing of the segment but the header
//! page and the last batch (to check the snapshot against the log).
//!
//! ```text
//! block: u32 magic 0x4B495832 ("KIX2") | u32 n | u64 covered_end
//!        | u32 flags (bit 0: sealed) | u32 crc32 (bytes 0..20 and 24..32,
//!        then the entries) | u64 from
//!        | n × (u64 position, u64 base_offset, i64 append_time_ms,
//!             u32 queue_id, u32 len, u32 count, u32 tags,
//!             u16 attributes, u32 view_len, u8 max_priority, 1 byte 0)
//!        | zeros to the next page
//! ```
//! Files of older brokers have "KIX1" blocks: 40-byte entries ending at
//! `count` and a reserved u32 (tag summaries then read as unknown, all
//! ones, and attributes as 0: no stored batch had any).
//! ```text
//! ```
//! A block lists every batch of the segment starting in `[from,
//! covered_end)`; the first block's `from` is the segment's first batch
//! position and each next block's is the previous `covered_end`, so a read
//! that returns the blocks of another place (a misdirected read) never
//! decodes as this file.

use std::path::Path;

use super::io::{Io, IoBuffer, IoFile, IoResult};
use super::{align_up, BatchEntry};

/// Blocks written now ("KIX2": entries carry their batch's tag summary
/// and attributes).
const MAGIC: u32 = 0x4B49_5832;
/// Blocks of older files ("KIX1").
const MAGIC_V1: u32 = 0x4B49_5831;
const BLOCK_HEAD_BYTES: usize = 32;
const ENTRY_BYTES: usize = 48;
const ENTRY_BYTES_V1: usize = 40;
const FLAG_SEALED: u32 = 1;
/// Most entries one block holds (a block stays a few MiB at most).
pub const BLOCK_ENTRIES_MAX: usize = 65_536;

/// What a snapshot file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub entries: Vec<BatchEntry>,
    /// Every batch starting below this is in `entries`.
    pub covered_end: u64,
    /// `covered_end` is the end of the segment's data.
    pub sealed: bool,
    /// Bytes of intact blocks: where the next block goes.
    pub file_len: u64,
}

/// Encodes one block (page-padded) listing the batches in
/// `[from, covered_end)`.
pub fn encode_block(entries: &[BatchEntry], from: u64, covered_end: u64, sealed: bool) -> Vec<u8> {
    assert!(entries.len() <= BLOCK_ENTRIES_MAX, "index block too large");
    let body = BLOCK_HEAD_BYTES + entries.len() * ENTRY_BYTES;
    let mut b = vec![0u8; align_up(body as u64) as usize];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    b[8..16].copy_from_slice(&covered_end.to_le_bytes());
    let flags = if sealed { FLAG_SEALED } else { 0 };
    b[16..20].copy_from_slice(&flags.to_le_bytes());
    b[24..32].copy_from_slice(&from.to_le_bytes());
    let mut at = BLOCK_HEAD_BYTES;
    for e in entries {
        b[at..at + 8].copy_from_slice(&e.position.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&e.base_offset.to_le_bytes());
        b[at + 16..at + 24].copy_from_slice(&e.append_time_ms.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&e.queue_id.to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&e.len.to_le_bytes());
        b[at + 32..at + 36].copy_from_slice(&e.count.to_le_bytes());
        b[at + 36..at + 40].copy_from_slice(&e.tags.to_le_bytes());
        b[at + 40..at + 42].copy_from_slice(&e.attributes.to_le_bytes());
        b[at + 42..at + 46].copy_from_slice(&e.view_len.to_le_bytes());
        b[at + 46] = e.max_priority;
        at += ENTRY_BYTES;
    }
    let crc = block_crc(&b[..BLOCK_HEAD_BYTES], &b[BLOCK_HEAD_BYTES..body]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

fn block_crc(head: &[u8], entries: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..20]);
    h.update(&head[24..32]);
    h.update(entries);
    h.finalize()
}

/// Decodes a whole file of the segment whose first batch position is
/// `data_start`: every intact block of the chain up to the first damaged
/// one.
pub fn decode_file(b: &[u8], data_start: u64) -> Snapshot {
    let mut snap = Snapshot {
        covered_end: data_start,
        ..Snapshot::default()
    };
    let mut at = 0usize;
    while at + BLOCK_HEAD_BYTES <= b.len() {
        let u32_at = |i: usize| u32::from_le_bytes(b[at + i..at + i + 4].try_into().unwrap());
        let n = u32_at(4) as usize;
        let magic = u32_at(0);
        if (magic != MAGIC && magic != MAGIC_V1) || n > BLOCK_ENTRIES_MAX {
            break;
        }
        let entry_bytes = if magic == MAGIC {
            ENTRY_BYTES
        } else {
            ENTRY_BYTES_V1
        };
        let body = BLOCK_HEAD_BYTES + n * entry_bytes;
        let len = align_up(body as u64) as usize;
        if at + len > b.len()
            || block_crc(
                &b[at..at + BLOCK_HEAD_BYTES],
                &b[at + BLOCK_HEAD_BYTES..at + body],
            ) != u32_at(20)
        {
            break;
        }
        let covered_end = u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap());
        let from = u64::from_le_bytes(b[at + 24..at + 32].try_into().unwrap());
        if from != snap.covered_end {
            break;
        }
        let entries = b[at + BLOCK_HEAD_BYTES..at + body].chunks_exact(entry_bytes);
        let decoded: Vec<BatchEntry> = entries
            .map(|c| BatchEntry {
                position: u64::from_le_bytes(c[0..8].try_into().unwrap()),
                base_offset: u64::from_le_bytes(c[8..16].try_into().unwrap()),
                append_time_ms: i64::from_le_bytes(c[16..24].try_into().unwrap()),
                queue_id: u32::from_le_bytes(c[24..28].try_into().unwrap()),
                len: u32::from_le_bytes(c[28..32].try_into().unwrap()),
                count: u32::from_le_bytes(c[32..36].try_into().unwrap()),
                tags: if magic == MAGIC {
                    u32::from_le_bytes(c[36..40].try_into().unwrap())
                } else {
                    u32::MAX
                },
                attributes: if magic == MAGIC {
                    u16::from_le_bytes([c[40], c[41]])
                } else {
                    0
                },
                view_len: if magic == MAGIC {
                    u32::from_le_bytes(c[42..46].try_into().unwrap())
                } else {
                    0
                },
                // Old entries: unknown, so readers look (9).
                max_priority: if magic == MAGIC { c[46] } else { 9 },
            })
            .collect();
        // Blocks only ever extend the list, in log order.
        let ordered = decoded
            .first()
            .is_none_or(|e| e.position >= snap.covered_end)
            && decoded.windows(2).all(|w| w[0].end() <= w[1].position)
            && decoded.last().is_none_or(|e| e.end() <= covered_end)
            && covered_end >= snap.covered_end;
        if !ordered {
            break;
        }
        snap.entries.extend(decoded);
        snap.covered_end = covered_end;
        snap.sealed = u32_at(16) & FLAG_SEALED != 0;
        at += len;
        snap.file_len = at as u64;
        if snap.sealed {
            break;
        }
    }
    snap
}

/// Reads the snapshot at `path` of the segment whose first batch position
/// is `data_start`; `None` when there is none. A read whose blocks stop
/// short of the file's end is read again (a misdirected or flipped read is
/// not a damaged file); the longest decode wins.
pub async fn load<I: Io>(io: &I, path: &Path, data_start: u64) -> Option<(I::File, Snapshot)> {
    let file = io.open(path).await.ok()?;
    let len = file.size().await.ok()?;
    let mut best = Snapshot {
        covered_end: data_start,
        ..Snapshot::default()
    };
    for _ in 0..4 {
        let Ok(bytes) = file.read_at(0, len as usize).await else {
            continue;
        };
        let s = decode_file(&bytes, data_start);
        let whole = s.sealed || s.file_len >= len;
        if s.file_len >= best.file_len {
            best = s;
        }
        if whole {
            break;
        }
    }
    Some((file, best))
}

/// Appends one block at `at` (listing `[from, covered_end)`) and syncs it.
#[allow(clippy::too_many_arguments)]
pub async fn append<I: Io>(
    io: &I,
    file: &I::File,
    at: u64,
    entries: &[BatchEntry],
    from: u64,
    covered_end: u64,
    sealed: bool,
) -> IoResult<u64> {
    let block = encode_block(entries, from, covered_end, sealed);
    let mut buf = io.buffer(block.len());
    buf.bytes_mut().copy_from_slice(&block);
    file.write_at(buf, at).await?;
    file.sync().await?;
    Ok(at + block.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(position: u64, len: u32, queue_id: u32, base_offset: u64) -> BatchEntry {
        BatchEntry {
            position,
            len,
            queue_id,
            base_offset,
            count: 3,
            append_time_ms: 1000 + position as i64,
            tags: (position as u32).rotate_left(7) ^ queue_id,
            attributes: 0,
            view_len: 0,
            max_priority: 0,
        }
    }

    #[test]
    fn tag_summaries_and_attributes_round_trip_and_old_blocks_read_as_unknown() {
        let mut entries = [e(4096, 100, 1, 0), e(4196, 50, 2, 0)];
        entries[1].attributes = crate::batch::BATCH_ATTR_REFERENCE;
        entries[1].view_len = 12_345;
        entries[1].max_priority = 7;
        let block = encode_block(&entries, 4096, 4246, false);
        assert_eq!(decode_file(&block, 4096).entries, entries);
        // The same entries as an older broker wrote them: magic KIX1,
        // 40-byte entries, the last field reserved (0), which must not
        // read as "no tags".
        let body = BLOCK_HEAD_BYTES + entries.len() * ENTRY_BYTES_V1;
        let mut old = vec![0u8; align_up(body as u64) as usize];
        old[..BLOCK_HEAD_BYTES].copy_from_slice(&block[..BLOCK_HEAD_BYTES]);
        old[0..4].copy_from_slice(&MAGIC_V1.to_le_bytes());
        for i in 0..entries.len() {
            let (from, to) = (
                BLOCK_HEAD_BYTES + i * ENTRY_BYTES,
                BLOCK_HEAD_BYTES + i * ENTRY_BYTES_V1,
            );
            old[to..to + 36].copy_from_slice(&block[from..from + 36]);
        }
        let crc = block_crc(&old[..BLOCK_HEAD_BYTES], &old[BLOCK_HEAD_BYTES..body]);
        old[20..24].copy_from_slice(&crc.to_le_bytes());
        let got = decode_file(&old, 4096).entries;
        assert_eq!(got.len(), 2);
        assert_eq!((got[1].position, got[1].len, got[1].count), (4196, 50, 3));
        assert!(got.iter().all(|g| g.tags == u32::MAX
            && g.attributes == 0
            && g.view_len == 0
            && g.max_priority == 9));
    }

    #[test]
    fn blocks_round_trip_and_a_torn_last_block_is_dropped() {
        let a = encode_block(&[e(4096, 100, 1, 0), e(4196, 50, 2, 0)], 4096, 4246, false);
        let b = encode_block(&[e(4246, 70, 1, 3)], 4246, 4316, false);
        let c = encode_block(&[], 4316, 4316, true);
        let mut file = [a.clone(), b.clone(), c.clone()].concat();
        let s = decode_file(&file, 4096);
        assert_eq!(s.entries.len(), 3);
        assert_eq!((s.covered_end, s.sealed), (4316, true));
        assert_eq!(s.file_len as usize, file.len());
        // The sealed block torn: the first two stand, unsealed.
        let at = a.len() + b.len() + 10;
        file[at] ^= 1;
        let s = decode_file(&file, 4096);
        assert_eq!((s.entries.len(), s.covered_end, s.sealed), (3, 4316, false));
        assert_eq!(s.file_len as usize, a.len() + b.len());
        // Damage in the first block: nothing is trusted after it.
        let mut file = [a.clone(), b.clone()].concat();
        file[40] ^= 1;
        assert_eq!(decode_file(&file, 4096).entries.len(), 0);
        // A read that starts at the second block (misdirected) is not this
        // file, though every block in it checks.
        let shifted = [b, c].concat();
        let s = decode_file(&shifted, 4096);
        assert_eq!((s.entries.len(), s.sealed, s.file_len), (0, false, 0));
    }

    #[test]
    fn out_of_order_blocks_are_refused() {
        let a = encode_block(&[e(5000, 100, 1, 0)], 4096, 5100, false);
        let b = encode_block(&[e(4096, 100, 1, 3)], 5100, 4196, false);
        let s = decode_file(&[a, b].concat(), 4096);
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.covered_end, 5100);
    }
}
