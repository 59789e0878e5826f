//! Recovery: scan a shard's segments after any stop, keep every valid
//! batch, cut a torn tail, skip (and report) corruption in the durable part
//! of the log, and hand back what the indexes need.
//!
//! The scan reads through the [`ReadAt`] seam, so tests drive it with
//! in-memory images and injected faults; the broker drives it with real
//! files, off the executor (blocking preads), before the shard serves.
//!
//! Rules:
//! - A batch is valid when its header CRC, length and body CRC check and its
//!   base offset continues its queue.
//! - An all-zero header ends a segment's data. In a non-last segment that is
//!   the padding left by a roll.
//! - An invalid batch (or zeros) below the checkpoint's durable position is
//!   corruption: the scan looks for the next valid batch in the segment,
//!   skips the damaged bytes and reports them.
//! - Anything invalid above the durable position is a torn tail: the log is
//!   cut there, the rest of the segment zeroed, later segments removed.

use crate::batch::{
    check_stored, check_stored_header, BatchHeader, BATCH_HEADER_BYTES, BATCH_MAGIC,
};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use super::checkpoint::Checkpoint;
use super::segment::{list_segments, segment_path, SegmentInfo};
use super::{align_down, DMA_ALIGNMENT_BYTES};

/// Positional reads of one segment's bytes.
pub trait ReadAt {
    /// Fills as much of `buf` as the source holds at `pos`; returns bytes read.
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl ReadAt for [u8] {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let pos = (pos as usize).min(self.len());
        let n = buf.len().min(self.len() - pos);
        buf[..n].copy_from_slice(&self[pos..pos + n]);
        Ok(n)
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], pos + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// A batch found by recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveredBatch {
    pub position: u64,
    pub len: u32,
    pub queue_id: u32,
    pub base_offset: u64,
    pub count: u32,
    pub append_time_ms: i64,
}

/// A skipped damaged range below the durable position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptRange {
    pub start: u64,
    pub end: u64,
    pub reason: String,
}

/// Where and why the log was cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub position: u64,
    pub reason: String,
}

/// The scan of one segment.
#[derive(Debug)]
pub struct SegmentScan {
    /// Bytes of the segment holding data (relative to its base).
    pub used: u64,
    pub torn: Option<TornTail>,
    pub corrupt: Vec<CorruptRange>,
    pub max_append_time_ms: i64,
}

/// Tracks each queue's next expected offset during a scan.
#[derive(Default)]
pub struct OffsetTracker {
    next: HashMap<u32, u64>,
    /// Offsets skipped because corrupt batches were dropped.
    pub gaps: u64,
}

impl OffsetTracker {
    /// Whether `h` continues its queue; a gap is allowed only in the
    /// durable region (where it means a corrupt batch was skipped).
    fn accept(&mut self, h: &BatchHeader, durable: bool) -> Result<(), String> {
        match self.next.get(&h.queue_id) {
            Some(&n) if h.base_offset < n => Err(format!(
                "queue {} offset {} repeats (expected {n})",
                h.queue_id, h.base_offset
            )),
            Some(&n) if h.base_offset > n && !durable => Err(format!(
                "queue {} offset {} skips from {n}",
                h.queue_id, h.base_offset
            )),
            Some(&n) => {
                self.gaps += h.base_offset - n;
                self.next.insert(h.queue_id, h.next_offset());
                Ok(())
            }
            None => {
                self.next.insert(h.queue_id, h.next_offset());
                Ok(())
            }
        }
    }
}

enum Probe {
    Valid(BatchHeader),
    Zero,
    Invalid(String),
}

fn probe(src: &(impl ReadAt + ?Sized), at: u64, capacity: u64) -> std::io::Result<Probe> {
    if at + BATCH_HEADER_BYTES as u64 > capacity {
        return Ok(Probe::Zero);
    }
    let mut head = [0u8; BATCH_HEADER_BYTES];
    let n = src.read_at(at, &mut head)?;
    if n < BATCH_HEADER_BYTES {
        return Ok(Probe::Invalid(format!("short read of {n} header bytes")));
    }
    if head.iter().all(|&b| b == 0) {
        return Ok(Probe::Zero);
    }
    let h = match check_stored_header(&head) {
        Ok(h) => h,
        Err(e) => return Ok(Probe::Invalid(e.to_string())),
    };
    if at + u64::from(h.batch_len) > capacity {
        return Ok(Probe::Invalid(format!(
            "batch of {} bytes runs past the segment end",
            h.batch_len
        )));
    }
    let mut whole = vec![0u8; h.batch_len as usize];
    let n = src.read_at(at, &mut whole)?;
    if n < whole.len() {
        return Ok(Probe::Invalid(format!("batch truncated at {n} bytes")));
    }
    Ok(match check_stored(&whole) {
        Ok(h) => Probe::Valid(h),
        Err(e) => Probe::Invalid(e.to_string()),
    })
}

/// Finds the next position after `from` in the segment where a valid batch
/// starts (looking for the magic, then checking both CRCs).
fn find_next_valid(
    src: &(impl ReadAt + ?Sized),
    from: u64,
    capacity: u64,
) -> std::io::Result<Option<u64>> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let magic = BATCH_MAGIC.to_le_bytes();
    let mut at = from + 1;
    while at + (BATCH_HEADER_BYTES as u64) <= capacity {
        let n = src.read_at(at, &mut buf)?;
        if n < BATCH_HEADER_BYTES {
            return Ok(None);
        }
        for i in 0..=n - BATCH_HEADER_BYTES {
            if buf[i + 8..i + 10] == magic {
                if let Probe::Valid(_) = probe(src, at + i as u64, capacity)? {
                    return Ok(Some(at + i as u64));
                }
            }
        }
        at += (n - BATCH_HEADER_BYTES + 1) as u64;
    }
    Ok(None)
}

/// Scans one segment. `durable_end` is the checkpoint's synced position
/// (absolute); `is_last` says no later segment exists. `found` receives each
/// valid batch in log order.
pub fn scan_segment(
    src: &(impl ReadAt + ?Sized),
    base: u64,
    capacity: u64,
    durable_end: u64,
    is_last: bool,
    offsets: &mut OffsetTracker,
    found: &mut dyn FnMut(RecoveredBatch),
) -> std::io::Result<SegmentScan> {
    let mut scan = SegmentScan {
        used: 0,
        torn: None,
        corrupt: Vec::new(),
        max_append_time_ms: 0,
    };
    let mut at = 0u64;
    loop {
        let durable = base + at < durable_end;
        let reason = match probe(src, at, capacity)? {
            Probe::Valid(h) if h.log_position != base + at => format!(
                "batch stamped for position {} found at {}",
                h.log_position,
                base + at
            ),
            Probe::Valid(h) => match offsets.accept(&h, durable) {
                Ok(()) => {
                    found(RecoveredBatch {
                        position: base + at,
                        len: h.batch_len,
                        queue_id: h.queue_id,
                        base_offset: h.base_offset,
                        count: h.record_count,
                        append_time_ms: h.append_time_ms,
                    });
                    scan.max_append_time_ms = scan.max_append_time_ms.max(h.append_time_ms);
                    at += u64::from(h.batch_len);
                    scan.used = at;
                    continue;
                }
                Err(reason) => reason,
            },
            Probe::Zero if !durable || !is_last => break,
            Probe::Zero => "zeroed bytes inside the durable part of the log".to_owned(),
            Probe::Invalid(reason) => reason,
        };
        if durable {
            if let Some(next) = find_next_valid(src, at, capacity)? {
                scan.corrupt.push(CorruptRange {
                    start: base + at,
                    end: base + next,
                    reason,
                });
                at = next;
                continue;
            }
        }
        if is_last || !durable {
            scan.torn = Some(TornTail {
                position: base + at,
                reason,
            });
        } else {
            scan.corrupt.push(CorruptRange {
                start: base + at,
                end: base + capacity,
                reason,
            });
        }
        break;
    }
    Ok(scan)
}

/// Everything recovery found in a shard directory.
#[derive(Debug, Default)]
pub struct Recovered {
    pub segments: Vec<SegmentInfo>,
    pub batches: Vec<RecoveredBatch>,
    /// End of valid data: where the next append goes.
    pub end_position: u64,
    /// Bytes of the last segment in `[align_down(end), end)`, for the writer.
    pub tail_page: Vec<u8>,
    pub checkpoint: Checkpoint,
    pub report: RecoveryReport,
}

/// What recovery did, for the one log line.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub batches: u64,
    pub messages: u64,
    pub torn: Option<TornTail>,
    pub corrupt: Vec<CorruptRange>,
    pub removed_segments: Vec<u64>,
    pub offset_gaps: u64,
    pub checkpoint_damaged: bool,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} segments, {} batches, {} messages",
            self.segments, self.batches, self.messages
        )?;
        match &self.torn {
            Some(t) => write!(
                f,
                "; cut torn tail at position {} ({})",
                t.position, t.reason
            )?,
            None => write!(f, "; clean tail")?,
        }
        for c in &self.corrupt {
            write!(
                f,
                "; SKIPPED CORRUPT bytes {}..{} ({})",
                c.start, c.end, c.reason
            )?;
        }
        if self.offset_gaps > 0 {
            write!(f, "; {} messages lost to corruption", self.offset_gaps)?;
        }
        if !self.removed_segments.is_empty() {
            write!(
                f,
                "; removed segments after the tail {:?}",
                self.removed_segments
            )?;
        }
        if self.checkpoint_damaged {
            write!(f, "; checkpoint damaged, treated whole log as tail")?;
        }
        Ok(())
    }
}

/// Why recovery could not run.
#[derive(Debug, thiserror::Error)]
#[error("recovery of {path}: {op}: {source}")]
pub struct RecoveryError {
    pub path: String,
    pub op: &'static str,
    pub source: std::io::Error,
}

/// Recovers the shard directory `dir` (blocking I/O: run off the executor).
pub fn recover_dir(dir: &Path) -> Result<Recovered, RecoveryError> {
    let err = |op: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| RecoveryError { path, op, source }
    };
    std::fs::create_dir_all(dir).map_err(err("create directory", dir))?;
    let (checkpoint, damaged) = Checkpoint::load(dir);
    let bases = list_segments(dir).map_err(err("list segments", dir))?;
    let mut out = Recovered {
        checkpoint,
        ..Recovered::default()
    };
    out.report.checkpoint_damaged = damaged;
    let mut offsets = OffsetTracker::default();
    let mut cut_at: Option<usize> = None;
    for (i, &base) in bases.iter().enumerate() {
        let path = segment_path(dir, base);
        let file = std::fs::File::open(&path).map_err(err("open segment", &path))?;
        let capacity = file.metadata().map_err(err("stat segment", &path))?.len();
        let capacity = align_down(capacity);
        if capacity == 0 {
            // Created but never preallocated: a crash during a roll.
            cut_at = Some(i);
            break;
        }
        let is_last = i + 1 == bases.len();
        let batches = &mut out.batches;
        let scan = scan_segment(
            &file,
            base,
            capacity,
            out.checkpoint.synced_position,
            is_last,
            &mut offsets,
            &mut |b| batches.push(b),
        )
        .map_err(err("read segment", &path))?;
        // Written-level data may sit in the device cache: make all of it
        // durable before the log reports it as synced.
        file.sync_data().map_err(err("sync segment", &path))?;
        out.segments.push(SegmentInfo {
            base,
            capacity,
            used: scan.used,
            max_append_time_ms: scan.max_append_time_ms,
        });
        out.report.corrupt.extend(scan.corrupt);
        if let Some(torn) = scan.torn {
            out.report.torn = Some(torn);
            cut_at = Some(i + 1);
            break;
        }
    }
    if let Some(keep) = cut_at {
        for &base in &bases[keep..] {
            let path = segment_path(dir, base);
            std::fs::remove_file(&path).map_err(err("remove segment", &path))?;
            out.report.removed_segments.push(base);
        }
    }
    if let Some(last) = out.segments.last() {
        let path = segment_path(dir, last.base);
        out.end_position = last.base + last.used;
        out.tail_page = zero_after(&path, last.used).map_err(err("zero tail", &path))?;
    }
    out.report.segments = out.segments.len();
    out.report.batches = out.batches.len() as u64;
    out.report.messages = out.batches.iter().map(|b| u64::from(b.count)).sum();
    out.report.offset_gaps = offsets.gaps;
    Ok(out)
}

/// Zeroes a segment from `used` to its end (so stale or torn bytes are never
/// read again), syncs it, and returns the bytes of its last partial page.
fn zero_after(path: &Path, used: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let page = align_down(used);
    let mut tail = vec![0u8; (used - page) as usize];
    ReadAt::read_at(&file, page, &mut tail)?;
    let zero_from = page + DMA_ALIGNMENT_BYTES;
    // Zero the rest of the partial page by hand, whole pages by fallocate
    // (which keeps the blocks allocated, so appends stay in place).
    if used < len {
        let partial = zero_from.min(len) - used;
        file.write_all_at(&vec![0u8; partial as usize], used)?;
    }
    if zero_from < len {
        // SAFETY: plain fallocate on a file descriptor we own.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE,
                zero_from as i64,
                (len - zero_from) as i64,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // Some filesystems lack ZERO_RANGE: write zeros instead.
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
            let zeros = vec![0u8; 1 << 20];
            let mut at = zero_from;
            while at < len {
                let n = (len - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
        }
    }
    file.sync_data()?;
    Ok(tail)
}

#[cfg(test)]
mod tests;
