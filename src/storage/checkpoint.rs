//! The shard checkpoint: the log position known durable (fdatasync
//! returned) and each queue's next offset at that position. Recovery uses
//! it to tell media corruption (below the durable position: skip and report)
//! from a torn tail (above it: cut), and to keep queue offsets from going
//! back when retention has deleted every batch of a queue.
//!
//! ```text
//! u32 magic 0x4B435031 ("KCP1") | u64 synced_position | u32 n
//! n × (u32 queue_id, u64 next_offset) | u32 crc32 of everything before
//! ```
//! Written to `checkpoint.tmp`, synced, renamed over `checkpoint`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

const MAGIC: u32 = 0x4B43_5031;
/// File name inside the shard directory.
pub const CHECKPOINT_FILE: &str = "checkpoint";

/// Decoded checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub synced_position: u64,
    pub next_offsets: BTreeMap<u32, u64>,
}

impl Checkpoint {
    /// Encodes with a trailing CRC.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + self.next_offsets.len() * 12);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&self.synced_position.to_le_bytes());
        b.extend_from_slice(&(self.next_offsets.len() as u32).to_le_bytes());
        for (q, o) in &self.next_offsets {
            b.extend_from_slice(&q.to_le_bytes());
            b.extend_from_slice(&o.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes; `None` for a damaged or foreign file.
    pub fn decode(b: &[u8]) -> Option<Checkpoint> {
        if b.len() < 20 {
            return None;
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        if u32::from_le_bytes(body[0..4].try_into().ok()?) != MAGIC {
            return None;
        }
        let synced_position = u64::from_le_bytes(body[4..12].try_into().ok()?);
        let n = u32::from_le_bytes(body[12..16].try_into().ok()?) as usize;
        if body.len() != 16 + n * 12 {
            return None;
        }
        let next_offsets = body[16..]
            .chunks_exact(12)
            .map(|c| {
                (
                    u32::from_le_bytes(c[0..4].try_into().unwrap()),
                    u64::from_le_bytes(c[4..12].try_into().unwrap()),
                )
            })
            .collect();
        Some(Checkpoint {
            synced_position,
            next_offsets,
        })
    }

    /// Reads the checkpoint of `dir`; a missing or damaged file gives the
    /// empty checkpoint (and the bool says it was damaged).
    pub fn load(dir: &Path) -> (Checkpoint, bool) {
        match std::fs::read(dir.join(CHECKPOINT_FILE)) {
            Ok(b) => match Checkpoint::decode(&b) {
                Some(c) => (c, false),
                None => (Checkpoint::default(), true),
            },
            Err(_) => (Checkpoint::default(), false),
        }
    }

    /// Writes atomically and durably (blocking: run off the executor).
    pub fn store(&self, dir: &Path) -> std::io::Result<()> {
        write_atomic(dir, CHECKPOINT_FILE, &self.encode())
    }
}

/// Writes `name` in `dir` via a synced temp file and a rename, then syncs
/// the directory. Blocking.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_detection() {
        let c = Checkpoint {
            synced_position: 12345,
            next_offsets: [(1, 10), (7, 99)].into_iter().collect(),
        };
        let b = c.encode();
        assert_eq!(Checkpoint::decode(&b), Some(c.clone()));
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert_eq!(Checkpoint::decode(&bad), None, "flip at {i} undetected");
        }
        let dir = tempfile::tempdir().unwrap();
        c.store(dir.path()).unwrap();
        assert_eq!(Checkpoint::load(dir.path()), (c, false));
        std::fs::write(dir.path().join(CHECKPOINT_FILE), b"junk").unwrap();
        assert_eq!(Checkpoint::load(dir.path()), (Checkpoint::default(), true));
    }
}
