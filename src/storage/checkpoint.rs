//! The shard checkpoint: the log position known durable (fdatasync
//! returned), where the log ended at a clean stop, and per queue its next
//! offset at the durable position and its offset reservation.
//!
//! - Recovery uses the durable position as one lower bound of what is
//!   durable (see `recovery` for the other, which needs no checkpoint), and
//!   the clean end to skip looking for batches past a clean stop.
//! - The next offsets keep a queue's offsets when retention deleted every
//!   batch of it.
//! - The reservations keep offsets from ever going back: a `memory` or
//!   `written` append is acknowledged only below its queue's reservation as
//!   last stored, and after a crash a queue resumes at its reservation.
//!
//! The file holds two slots of `slot_bytes` each, written in place in turn
//! (slot `sequence % 2`) and synced: a torn write damages one slot and the
//! other still holds the previous checkpoint. Writing in place allocates
//! nothing, so checkpoints are stored on a full disk too. A checkpoint that
//! outgrows its slot is moved to a larger file (written whole, synced,
//! renamed over, directory synced), which needs space.
//!
//! The boot id (the kernel's, per boot) tells recovery whether the machine
//! lost power since the checkpoint: a `written` append survives a process
//! crash, so its queue needs its reservation only after a reboot; a
//! `memory` append needs it after any crash.
//!
//! A log that stopped after an I/O failure marks it (`storage_failed`):
//! the device may have lost completed writes, so recovery treats that like
//! a power cut too.
//!
//! ```text
//! slot: u32 magic 0x4B435032 ("KCP2") | u32 slot_bytes | u64 sequence
//!       | u64 synced_position | u64 clean_end (u64::MAX: not a clean stop)
//!       | [16] boot_id | u32 n | u32 flags (bit 0: storage_failed)
//!       | u32 crc32 (bytes 0..56, then 60 to the entries' end) | u32 reserved 0
//!       | n × (u32 queue_id, u32 reserve_kind (0 none, 1 written, 2 memory),
//!              u64 next_offset, u64 offset_reserved) | zeros
//! ```

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::io::{Io, IoBuffer, IoFailure, IoFile, IoKind, IoResult};
use super::{align_up, DMA_ALIGNMENT_BYTES};
use crate::runtime::Watch;

const MAGIC: u32 = 0x4B43_5032;
const SLOT_HEAD_BYTES: usize = 64;
const FLAG_STORAGE_FAILED: u32 = 1;
const ENTRY_BYTES: usize = 24;
/// File name inside the shard directory.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// Reads of a checkpoint that fails its check before it counts as damaged.
const LOAD_READS: usize = 4;

/// Which crashes can take back a queue's acknowledged offsets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReserveKind {
    /// Only `fsync` appends: acknowledged means synced.
    #[default]
    None = 0,
    /// `written` appends: a power cut can take them back.
    Written = 1,
    /// `memory` appends: any crash can take them back.
    Memory = 2,
}

impl ReserveKind {
    fn from_u32(v: u32) -> Option<ReserveKind> {
        match v {
            0 => Some(ReserveKind::None),
            1 => Some(ReserveKind::Written),
            2 => Some(ReserveKind::Memory),
            _ => None,
        }
    }
}

/// One queue's part of a checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCheckpoint {
    pub reserve: ReserveKind,
    /// Next offset covering only batches below the durable position.
    pub next_offset: u64,
    /// Offsets below this may have been acknowledged or seen before they
    /// were durable; the queue never hands them out again (0: none taken).
    pub offset_reserved: u64,
}

/// A decoded checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub synced_position: u64,
    /// The end of the log at a clean stop (everything written and synced);
    /// `None` while the broker runs or after a crash.
    pub clean_end: Option<u64>,
    /// The kernel boot id when it was stored.
    pub boot_id: [u8; 16],
    /// The log stopped after an I/O failure.
    pub storage_failed: bool,
    pub queues: BTreeMap<u32, QueueCheckpoint>,
}

impl Checkpoint {
    /// Bytes of one slot holding this checkpoint, with room to grow.
    fn slot_bytes_needed(&self) -> usize {
        SLOT_HEAD_BYTES + self.queues.len() * ENTRY_BYTES
    }

    /// Encodes into a slot of `slot_bytes` (zero-padded).
    pub fn encode_slot(&self, sequence: u64, slot_bytes: usize) -> Vec<u8> {
        assert!(
            self.slot_bytes_needed() <= slot_bytes,
            "checkpoint does not fit its slot"
        );
        let mut b = vec![0u8; slot_bytes];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(slot_bytes as u32).to_le_bytes());
        b[8..16].copy_from_slice(&sequence.to_le_bytes());
        b[16..24].copy_from_slice(&self.synced_position.to_le_bytes());
        b[24..32].copy_from_slice(&self.clean_end.unwrap_or(u64::MAX).to_le_bytes());
        b[32..48].copy_from_slice(&self.boot_id);
        b[48..52].copy_from_slice(&(self.queues.len() as u32).to_le_bytes());
        let flags = if self.storage_failed {
            FLAG_STORAGE_FAILED
        } else {
            0
        };
        b[52..56].copy_from_slice(&flags.to_le_bytes());
        let mut at = SLOT_HEAD_BYTES;
        for (id, q) in &self.queues {
            b[at..at + 4].copy_from_slice(&id.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&(q.reserve as u32).to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&q.next_offset.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&q.offset_reserved.to_le_bytes());
            at += ENTRY_BYTES;
        }
        let crc = slot_crc(&b[..56], &b[60..at]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a slot: `(sequence, checkpoint)`, or `None` when damaged.
    pub fn decode_slot(b: &[u8]) -> Option<(u64, Checkpoint)> {
        if b.len() < SLOT_HEAD_BYTES {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        if u32_at(0) != MAGIC || u32_at(4) as usize != b.len() {
            return None;
        }
        let n = u32_at(48) as usize;
        let end = n
            .checked_mul(ENTRY_BYTES)
            .and_then(|e| e.checked_add(SLOT_HEAD_BYTES))
            .filter(|&e| e <= b.len())?;
        if slot_crc(&b[..56], &b[60..end]) != u32_at(56) {
            return None;
        }
        let mut queues = BTreeMap::new();
        for c in b[SLOT_HEAD_BYTES..end].chunks_exact(ENTRY_BYTES) {
            let id = u32::from_le_bytes(c[0..4].try_into().unwrap());
            let q = QueueCheckpoint {
                reserve: ReserveKind::from_u32(u32::from_le_bytes(c[4..8].try_into().unwrap()))?,
                next_offset: u64::from_le_bytes(c[8..16].try_into().unwrap()),
                offset_reserved: u64::from_le_bytes(c[16..24].try_into().unwrap()),
            };
            queues.insert(id, q);
        }
        let clean_end = Some(u64_at(24)).filter(|&e| e != u64::MAX);
        Some((
            u64_at(8),
            Checkpoint {
                synced_position: u64_at(16),
                clean_end,
                boot_id: b[32..48].try_into().unwrap(),
                storage_failed: u32_at(52) & FLAG_STORAGE_FAILED != 0,
                queues,
            },
        ))
    }
}

fn slot_crc(head: &[u8], entries: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(entries);
    h.finalize()
}

/// What loading found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointState {
    /// No checkpoint file (a new shard, or it was removed).
    Missing,
    /// A file whose slots are both damaged.
    Damaged,
    /// One slot was damaged (a torn write); the other was used.
    OneSlotDamaged,
    Ok,
}

/// Decodes a whole checkpoint file: the newest intact slot.
pub fn decode_file(b: &[u8]) -> (Option<(u64, Checkpoint, usize)>, CheckpointState) {
    let slot_bytes = b.len() / 2;
    if b.len() < 2 * DMA_ALIGNMENT_BYTES as usize || b.len() % 2 != 0 {
        return (None, CheckpointState::Damaged);
    }
    let a = Checkpoint::decode_slot(&b[..slot_bytes]);
    let c = Checkpoint::decode_slot(&b[slot_bytes..]);
    let state = match (&a, &c) {
        (Some(_), Some(_)) => CheckpointState::Ok,
        (None, None) => CheckpointState::Damaged,
        _ => CheckpointState::OneSlotDamaged,
    };
    let best = [a, c]
        .into_iter()
        .flatten()
        .max_by_key(|(seq, _)| *seq)
        .map(|(seq, cp)| (seq, cp, slot_bytes));
    (best, state)
}

/// The open checkpoint file of one shard. Stores are serialised: one at a
/// time, the next waits, and each checkpoint is built only once its store
/// holds the file (so a later store never writes an older state). After a
/// clean-stop checkpoint nothing else is stored.
pub struct CheckpointFile<I: Io> {
    io: I,
    dir: PathBuf,
    file: RefCell<Option<Rc<I::File>>>,
    slot_bytes: Cell<usize>,
    sequence: Cell<u64>,
    busy: Cell<bool>,
    released: Watch,
    /// A clean-stop checkpoint is stored: it stays the last.
    clean_stored: Cell<bool>,
}

impl<I: Io> CheckpointFile<I> {
    /// Opens (without creating) the checkpoint of `dir` and decodes it.
    pub async fn load(
        io: &I,
        dir: &Path,
    ) -> (CheckpointFile<I>, Option<Checkpoint>, CheckpointState) {
        let path = dir.join(CHECKPOINT_FILE);
        let mut cf = CheckpointFile {
            io: io.clone(),
            dir: dir.to_owned(),
            file: RefCell::new(None),
            slot_bytes: Cell::new(0),
            sequence: Cell::new(0),
            busy: Cell::new(false),
            released: Watch::new(0),
            clean_stored: Cell::new(false),
        };
        let Ok(file) = io.open(&path).await else {
            return (cf, None, CheckpointState::Missing);
        };
        // A read that fails its check is read again: a misdirected or
        // flipped read is not a damaged file.
        let mut decoded = (None, CheckpointState::Damaged);
        for _ in 0..LOAD_READS {
            let whole = match file.size().await {
                Ok(len) if len <= 1 << 30 => file.read_at(0, len as usize).await.ok(),
                _ => None,
            };
            decoded = match whole {
                Some(b) => decode_file(&b),
                None => (None, CheckpointState::Damaged),
            };
            if decoded.1 == CheckpointState::Ok {
                break;
            }
        }
        let (best, state) = decoded;
        match best {
            Some((seq, cp, slot_bytes)) => {
                cf.slot_bytes = Cell::new(slot_bytes);
                cf.sequence = Cell::new(seq);
                *cf.file.get_mut() = Some(Rc::new(file));
                (cf, Some(cp), state)
            }
            None => (cf, None, state),
        }
    }

    /// Stores durably (in place when it fits its slot) the checkpoint
    /// `build` returns once this store has the file, and returns it; `None`
    /// (nothing stored) after a clean-stop checkpoint.
    pub async fn store_with(
        &self,
        build: impl FnOnce() -> Checkpoint,
    ) -> IoResult<Option<Checkpoint>> {
        while self.busy.get() {
            let seen = self.released.get();
            let _ = self.released.wait_for(seen + 1).await;
        }
        if self.clean_stored.get() {
            return Ok(None);
        }
        self.busy.set(true);
        let cp = build();
        let result = self.store_locked(&cp).await;
        if result.is_ok() && cp.clean_end.is_some() {
            self.clean_stored.set(true);
        }
        self.busy.set(false);
        self.released.advance(self.released.get() + 1);
        result.map(|()| Some(cp))
    }

    async fn store_locked(&self, cp: &Checkpoint) -> IoResult<()> {
        let seq = self.sequence.get() + 1;
        let file = self.file.borrow().clone();
        match file {
            Some(file) if cp.slot_bytes_needed() <= self.slot_bytes.get() => {
                let slot_bytes = self.slot_bytes.get();
                let mut buf = self.io.buffer(slot_bytes);
                buf.bytes_mut()
                    .copy_from_slice(&cp.encode_slot(seq, slot_bytes));
                let at = (seq % 2) * slot_bytes as u64;
                let n = file.write_at(buf, at).await?;
                if n != slot_bytes {
                    return Err(IoFailure::new(
                        "write checkpoint",
                        file.path(),
                        IoKind::Other,
                        format!("short write of {n} of {slot_bytes} bytes"),
                    ));
                }
                file.sync().await?;
            }
            _ => self.store_grown(cp, seq).await?,
        }
        self.sequence.set(seq);
        Ok(())
    }

    /// Writes a new, larger file with both slots holding `cp`, then renames
    /// it over the old one.
    async fn store_grown(&self, cp: &Checkpoint, seq: u64) -> IoResult<()> {
        // Room for the queues twice over, so growth is rare.
        let slot_bytes = align_up((cp.slot_bytes_needed() * 2) as u64) as usize;
        let tmp = self.dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        let path = self.dir.join(CHECKPOINT_FILE);
        let file = self.io.create(&tmp).await?;
        let result = async {
            file.allocate(2 * slot_bytes as u64).await?;
            let mut buf = self.io.buffer(2 * slot_bytes);
            let slot = cp.encode_slot(seq, slot_bytes);
            buf.bytes_mut()[..slot_bytes].copy_from_slice(&slot);
            buf.bytes_mut()[slot_bytes..].copy_from_slice(&slot);
            file.write_at(buf, 0).await?;
            file.sync().await?;
            self.io.rename(&tmp, &path).await?;
            self.io.sync_dir(&self.dir).await
        }
        .await;
        if let Err(e) = result {
            let _ = self.io.remove(&tmp).await;
            return Err(e);
        }
        *self.file.borrow_mut() = Some(Rc::new(self.io.open(&path).await?));
        self.slot_bytes.set(slot_bytes);
        Ok(())
    }

    /// Whether `cp` fits the current slots (storing it then allocates nothing).
    pub fn fits(&self, cp: &Checkpoint) -> bool {
        self.file.borrow().is_some() && cp.slot_bytes_needed() <= self.slot_bytes.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            synced_position: 12345,
            clean_end: Some(12345),
            boot_id: [3; 16],
            storage_failed: true,
            queues: [
                (
                    1,
                    QueueCheckpoint {
                        reserve: ReserveKind::None,
                        next_offset: 10,
                        offset_reserved: 0,
                    },
                ),
                (
                    7,
                    QueueCheckpoint {
                        reserve: ReserveKind::Memory,
                        next_offset: 99,
                        offset_reserved: 1 << 20,
                    },
                ),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn slot_round_trip_and_damage_detection() {
        let c = sample();
        let b = c.encode_slot(5, 4096);
        assert_eq!(Checkpoint::decode_slot(&b), Some((5, c.clone())));
        for i in 0..(SLOT_HEAD_BYTES + 2 * ENTRY_BYTES) {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert_eq!(
                Checkpoint::decode_slot(&bad),
                None,
                "flip at {i} undetected"
            );
        }
        let running = Checkpoint {
            clean_end: None,
            ..c
        };
        let b = running.encode_slot(1, 4096);
        assert_eq!(Checkpoint::decode_slot(&b).unwrap().1.clean_end, None);
    }

    #[test]
    fn the_newest_intact_slot_wins() {
        let old = sample();
        let new = Checkpoint {
            synced_position: 99_999,
            ..sample()
        };
        let mut file = old.encode_slot(6, 4096);
        file.extend(new.encode_slot(7, 4096));
        assert_eq!(
            decode_file(&file),
            (Some((7, new, 4096)), CheckpointState::Ok)
        );
        // The newer slot torn: the older one stands.
        file[4096 + 50] ^= 0xff;
        assert_eq!(
            decode_file(&file),
            (Some((6, old, 4096)), CheckpointState::OneSlotDamaged)
        );
        file[50] ^= 0xff;
        assert_eq!(decode_file(&file), (None, CheckpointState::Damaged));
    }
}
