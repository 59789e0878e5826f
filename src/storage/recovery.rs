//! Recovery: after any stop, find every genuine batch of a shard's log,
//! cut only a torn tail, skip (and report, with positions) damaged bytes
//! anywhere else, and hand back what the log and the indexes need.
//!
//! Rules:
//! - A batch is *genuine* when its header MAC checks under its segment's
//!   key, its stamped log position is where it lies, and its length, body
//!   CRC and reserved fields check. A producer's payload can hold any bytes
//!   but never a genuine batch (it cannot compute the MAC), so the search
//!   for the next batch after damaged bytes cannot be fooled.
//! - Where the log was torn or damaged, the scan looks for the next genuine
//!   batch (in the segment, skipping zero pages fast), which makes a *hole*.
//! - A hole is a torn tail only if it starts in the last
//!   `unsynced_bytes_max` of the log: the writer never starts a write past
//!   `synced + unsynced_bytes_max`, so nothing older can have been lost to a
//!   crash or a power cut. The checkpoint's synced position and the index
//!   snapshots, when present, raise that bound; they are never needed. The
//!   first hole at or past the bound cuts the log there (genuine batches
//!   after it, never acknowledged at a level that promises them, are
//!   discarded so every queue stays a prefix of what was sent); holes below
//!   it are corruption: only their bytes are lost, reported with positions.
//! - Zeros where batches should be are damage like any other: a segment's
//!   data ends where the next segment's header says (`prev_end`), so roll
//!   padding is never confused with lost batches.
//! - After a cut the torn bytes are overwritten with zeros in place (no
//!   allocation: recovery works on a full disk) and synced, so no stale
//!   batch can reappear behind a later, shorter rewrite; later segments are
//!   removed.
//! - Index snapshots cover the sealed part of the log: their segments are
//!   not read (only the last listed batch, to check the snapshot against
//!   the log), so restart time follows what was written since the last
//!   snapshot, not the retained log.
//! - Reads that fail a check are read again before the bytes count as
//!   damaged (a misdirected or flipped read is not damage on disk).

use bytes::Bytes;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::checkpoint::{Checkpoint, CheckpointFile, CheckpointState};
use super::commit_log::OpenSegment;
use super::index_snapshot::{self, Snapshot};
use super::io::{Io, IoBuffer, IoFailure, IoFile, IoResult};
use super::segment::{
    index_path, parse_file_name, segment_path, SegmentHeader, SegmentInfo, SEGMENT_HEADER_BYTES,
};
use super::{align_down, align_up, BatchEntry};
use crate::batch::{
    check_stored, check_stored_header, SegmentKey, BATCH_HEADER_BYTES, BATCH_MAGIC,
};

/// Bytes read per call while scanning.
const READ_WINDOW_BYTES: usize = 1 << 20;
/// How often a read that fails a check is retried before the bytes count
/// as damaged.
const READ_RETRIES: u32 = 3;
/// How often a batch found by the scan is probed again before the bytes
/// the writer keeps may leave it out as damaged.
const VERIFY_READS: u32 = 4 * READ_RETRIES;

/// What recovery needs to know of the writer.
#[derive(Clone, Debug)]
pub struct RecoveryConfig {
    pub dir: PathBuf,
    pub shard: u16,
    /// The writer's unsynced window now (segment headers say what it was).
    pub unsynced_bytes_max: u64,
}

/// A damaged range that was skipped.
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

/// What recovery did, for the one log line.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub segments: usize,
    pub batches: u64,
    pub messages: u64,
    /// Batches taken from index snapshots instead of a scan.
    pub snapshot_batches: u64,
    /// Log bytes read by the scan.
    pub scanned_bytes: u64,
    pub torn: Option<TornTail>,
    pub corrupt: Vec<CorruptRange>,
    /// Genuine batches after the cut, dropped so queues stay prefixes.
    pub discarded_batches: u64,
    pub removed_segments: Vec<(u64, &'static str)>,
    /// Segments kept whose header page is damaged (their batches are lost).
    pub unreadable_segments: Vec<u64>,
    pub offset_gaps: u64,
    pub checkpoint: Option<CheckpointState>,
    /// The log ends before the checkpoint's synced position: synced data
    /// was lost (a device that did not keep what it acknowledged).
    pub synced_lost: Option<(u64, u64)>,
    pub snapshots_distrusted: Vec<u64>,
    pub retried_reads: u64,
    /// The checkpoint marks a storage failure of an earlier run (or of a
    /// recovery): completed writes may have been lost, so `written` queues
    /// resume past their reservations.
    pub storage_failed: bool,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} segments, {} batches, {} messages ({} from index snapshots, {} bytes scanned)",
            self.segments, self.batches, self.messages, self.snapshot_batches, self.scanned_bytes
        )?;
        match &self.torn {
            Some(t) => write!(
                f,
                "; cut torn tail at position {} ({})",
                t.position, t.reason
            )?,
            None => write!(f, "; clean tail")?,
        }
        if self.discarded_batches > 0 {
            write!(
                f,
                "; discarded {} unsynced batches after the cut",
                self.discarded_batches
            )?;
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
        for (base, why) in &self.removed_segments {
            write!(f, "; removed segment {base} ({why})")?;
        }
        for base in &self.unreadable_segments {
            write!(f, "; SEGMENT {base} UNREADABLE (header page damaged)")?;
        }
        if let Some((end, synced)) = self.synced_lost {
            write!(
                f,
                "; SYNCED DATA LOST: the log ends at {end} but {synced} was synced"
            )?;
        }
        for base in &self.snapshots_distrusted {
            write!(
                f,
                "; index snapshot of segment {base} did not match the log, rescanned"
            )?;
        }
        match self.checkpoint {
            Some(CheckpointState::Missing) => write!(f, "; no checkpoint")?,
            Some(CheckpointState::Damaged) => write!(f, "; checkpoint damaged (not needed)")?,
            Some(CheckpointState::OneSlotDamaged) => {
                write!(f, "; one checkpoint slot damaged, the other used")?
            }
            _ => {}
        }
        if self.storage_failed {
            write!(
                f,
                "; STORAGE FAILED before this start (written queues resume past their reservations)"
            )?;
        }
        if self.retried_reads > 0 {
            write!(
                f,
                "; {} reads retried after a failed check",
                self.retried_reads
            )?;
        }
        Ok(())
    }
}

/// Why recovery could not run.
#[derive(Debug, Clone, thiserror::Error)]
#[error("recovery: {0}")]
pub struct RecoveryError(#[from] pub IoFailure);

/// The index snapshot state of one recovered segment, for the writer of
/// later snapshot blocks.
pub struct SnapshotState<F> {
    pub base: u64,
    /// The open `.idx` file and where its next block goes (`None`: none yet).
    pub file: Option<(Rc<F>, u64)>,
    /// Every batch below this is in the snapshot file.
    pub covered_end: u64,
    pub sealed: bool,
}

/// Everything recovery found in a shard directory.
pub struct Recovered<I: Io> {
    pub segments: Vec<OpenSegment<I::File>>,
    /// Every genuine batch, in log order.
    pub batches: Vec<BatchEntry>,
    /// End of valid data: where the next append goes.
    pub end_position: u64,
    /// Bytes of the last segment in `[align_down(end), end)`, for the writer.
    pub tail_page: Vec<u8>,
    pub checkpoint: Checkpoint,
    pub checkpoint_file: CheckpointFile<I>,
    pub snapshots: Vec<SnapshotState<I::File>>,
    pub report: RecoveryReport,
}

/// Positional reads of one segment through a window, re-reading once a
/// check failed.
struct Reader<'a, F: IoFile> {
    file: &'a F,
    capacity: u64,
    window_at: u64,
    window: Bytes,
    scanned: u64,
    retried: u64,
}

impl<'a, F: IoFile> Reader<'a, F> {
    fn new(file: &'a F, capacity: u64) -> Self {
        Reader {
            file,
            capacity,
            window_at: 0,
            window: Bytes::new(),
            scanned: 0,
            retried: 0,
        }
    }

    /// Up to `len` bytes at `at` (relative to the segment).
    async fn get(&mut self, at: u64, len: usize) -> IoResult<Bytes> {
        let end = (at + len as u64).min(self.capacity);
        if at >= self.window_at && end <= self.window_at + self.window.len() as u64 {
            let from = (at - self.window_at) as usize;
            return Ok(self.window.slice(from..from + (end - at) as usize));
        }
        let want = len
            .max(READ_WINDOW_BYTES)
            .min((self.capacity - at) as usize);
        self.window = read_retrying(self.file, at, want).await?;
        self.window_at = at;
        self.scanned += self.window.len() as u64;
        Ok(self
            .window
            .slice(..(self.window.len()).min((end - at) as usize)))
    }

    fn forget(&mut self) {
        self.window = Bytes::new();
    }
}

enum Probe {
    Genuine(BatchEntry),
    /// The header bytes are all zero.
    Zero,
    Invalid(String),
}

/// Whether a genuine batch starts at `at` (relative), checked against
/// `limit` (relative end of where batches may lie).
async fn probe_once<F: IoFile>(
    r: &mut Reader<'_, F>,
    base: u64,
    key: &SegmentKey,
    at: u64,
    limit: u64,
) -> IoResult<Probe> {
    if at + BATCH_HEADER_BYTES as u64 > limit {
        return Ok(Probe::Invalid("no room for a batch header".into()));
    }
    let head = r.get(at, BATCH_HEADER_BYTES).await?;
    if head.len() < BATCH_HEADER_BYTES {
        return Ok(Probe::Invalid("short read".into()));
    }
    if head.iter().all(|&b| b == 0) {
        return Ok(Probe::Zero);
    }
    let h = match check_stored_header(&head, key) {
        Ok(h) => h,
        Err(e) => return Ok(Probe::Invalid(e.to_string())),
    };
    if h.log_position != base + at {
        return Ok(Probe::Invalid(format!(
            "batch stamped for position {} found at {}",
            h.log_position,
            base + at
        )));
    }
    if at + u64::from(h.batch_len) > limit {
        return Ok(Probe::Invalid(format!(
            "batch of {} bytes runs past the segment's data",
            h.batch_len
        )));
    }
    let whole = r.get(at, h.batch_len as usize).await?;
    if whole.len() < h.batch_len as usize {
        return Ok(Probe::Invalid("short read".into()));
    }
    Ok(match check_stored(&whole, key) {
        Ok(h) => Probe::Genuine(BatchEntry {
            position: base + at,
            len: h.batch_len,
            queue_id: h.queue_id,
            base_offset: h.base_offset,
            count: h.record_count,
            append_time_ms: h.append_time_ms,
            tags: crate::batch::tag_summary(&whole),
            max_priority: crate::batch::summary(&whole).max_priority,
            attributes: h.attributes,
            view_len: if h.is_reference() { h.extra.max(1) } else { 0 },
        }),
        Err(e) => Probe::Invalid(e.to_string()),
    })
}

/// [`probe_once`], re-reading before bytes count as damaged or as zeros
/// (a misdirected read can return either).
async fn probe<F: IoFile>(
    r: &mut Reader<'_, F>,
    base: u64,
    key: &SegmentKey,
    at: u64,
    limit: u64,
) -> IoResult<Probe> {
    let mut p = probe_once(r, base, key, at, limit).await?;
    let first_genuine = matches!(p, Probe::Genuine(_));
    for _ in 0..READ_RETRIES {
        if matches!(p, Probe::Genuine(_)) {
            break;
        }
        r.forget();
        p = probe_once(r, base, key, at, limit).await?;
    }
    if !first_genuine && matches!(p, Probe::Genuine(_)) {
        // A read that failed its check was a bad read, not bad bytes.
        r.retried += 1;
    }
    Ok(p)
}

/// `len` bytes at `at` read fresh until two reads agree (at most a few
/// tries): what a search concludes "holds no batch" must not rest on one
/// read that may have been misdirected.
async fn agreed_chunk<F: IoFile>(r: &mut Reader<'_, F>, at: u64, len: usize) -> IoResult<Bytes> {
    r.forget();
    let mut last = r.get(at, len).await?;
    for _ in 0..READ_RETRIES {
        r.forget();
        let again = r.get(at, len).await?;
        if again == last {
            return Ok(again);
        }
        last = again;
    }
    Ok(last)
}

/// The next genuine batch after `from` (relative) and below `limit`; also
/// the end of the last non-zero page seen (torn bytes to clear).
async fn find_next_genuine<F: IoFile>(
    r: &mut Reader<'_, F>,
    base: u64,
    key: &SegmentKey,
    from: u64,
    limit: u64,
) -> IoResult<(Option<BatchEntry>, u64)> {
    let magic = BATCH_MAGIC.to_le_bytes();
    let finder = memchr::memmem::Finder::new(&magic);
    let mut nonzero_end = 0u64;
    let mut at = from + 1;
    while at + BATCH_HEADER_BYTES as u64 <= limit {
        let chunk = agreed_chunk(r, at, READ_WINDOW_BYTES).await?;
        if chunk.len() < BATCH_HEADER_BYTES {
            break;
        }
        if let Some(last) = last_nonzero(&chunk) {
            nonzero_end = at + last as u64 + 1;
        }
        let mut i = 0;
        while let Some(j) = finder.find(&chunk[i..]) {
            let m = i + j;
            i = m + 1;
            // The magic sits at byte 8 of a header.
            let Some(cand) = (at + m as u64).checked_sub(8).filter(|&c| c > from) else {
                continue;
            };
            // `chunk` holds its bytes even when `probe` moves the window.
            if let Probe::Genuine(e) = probe(r, base, key, cand, limit).await? {
                return Ok((Some(e), nonzero_end));
            }
        }
        at += (chunk.len() - BATCH_HEADER_BYTES + 1) as u64;
    }
    Ok((None, nonzero_end))
}

/// Index of the last non-zero byte (word at a time: segments are mostly
/// zeros past their data).
fn last_nonzero(b: &[u8]) -> Option<usize> {
    // SAFETY: every bit pattern is a valid u64.
    let (head, words, tail) = unsafe { b.align_to::<u64>() };
    if let Some(i) = tail.iter().rposition(|&x| x != 0) {
        return Some(head.len() + words.len() * 8 + i);
    }
    if let Some(w) = words.iter().rposition(|&x| x != 0) {
        let at = head.len() + w * 8;
        return b[at..at + 8].iter().rposition(|&x| x != 0).map(|i| at + i);
    }
    head.iter().rposition(|&x| x != 0)
}

/// The bytes of `[from, to)` (absolute) of a segment as its genuine
/// batches hold them, each batch read back and checked (zeros where no
/// batch lies), and the batches that no longer check (zeros too: the
/// caller drops them as damaged). What the writer will rewrite (the last
/// partial page) must never come from an unchecked read: a misdirected or
/// flipped read written back would damage a good batch.
async fn verified_bytes<F: IoFile>(
    file: &F,
    seg: &SegmentInfo,
    batches: &[BatchEntry],
    from: u64,
    to: u64,
) -> IoResult<(Vec<u8>, Vec<BatchEntry>)> {
    let mut out = vec![0u8; (to - from) as usize];
    let mut failed = Vec::new();
    let mut r = Reader::new(file, seg.capacity);
    for b in batches.iter().filter(|b| b.position < to && b.end() > from) {
        let at = b.position - seg.base;
        let mut ok = false;
        for _ in 0..VERIFY_READS {
            r.forget();
            if let Probe::Genuine(e) = probe(&mut r, seg.base, &seg.key, at, seg.capacity).await? {
                ok = e == *b;
                break;
            }
        }
        if !ok {
            failed.push(*b);
            continue;
        }
        let bytes = r.get(at, b.len as usize).await?;
        let lo = b.position.max(from);
        let hi = b.end().min(to);
        out[(lo - from) as usize..(hi - from) as usize]
            .copy_from_slice(&bytes[(lo - b.position) as usize..(hi - b.position) as usize]);
    }
    Ok((out, failed))
}

/// Drops batches that stopped checking since the scan found them: their
/// bytes are damaged (only theirs are lost).
fn drop_failed(
    out_batches: &mut Vec<BatchEntry>,
    failed: &[BatchEntry],
    report: &mut RecoveryReport,
) {
    for f in failed {
        out_batches.retain(|e| e != f);
        report.offset_gaps += u64::from(f.count);
        report.corrupt.push(CorruptRange {
            start: f.position,
            end: f.end(),
            reason: "the batch no longer checks when read back".into(),
        });
    }
}

/// A read, tried again (a few times) when it fails: a failed read is not
/// yet a failed disk. One that keeps failing fails the recovery, naming
/// the file.
async fn read_retrying<F: IoFile>(file: &F, pos: u64, len: usize) -> IoResult<Bytes> {
    let mut tries = 0;
    loop {
        match file.read_at(pos, len).await {
            Ok(b) => return Ok(b),
            Err(e) if tries == READ_RETRIES => return Err(e),
            Err(_) => tries += 1,
        }
    }
}

/// `len` bytes at `pos` of `file`, read until two reads agree (at most a
/// few tries).
async fn agreed_read<F: IoFile>(file: &F, pos: u64, len: usize) -> IoResult<Bytes> {
    let mut last = read_retrying(file, pos, len).await?;
    for _ in 0..READ_RETRIES {
        let again = read_retrying(file, pos, len).await?;
        if again == last {
            return Ok(again);
        }
        last = again;
    }
    Ok(last)
}

/// One segment's scan.
#[derive(Default)]
struct SegmentScan {
    found: Vec<Found>,
    /// End of the last bytes that are not zero (absolute).
    nonzero_end: u64,
}

enum Found {
    Batch(BatchEntry),
    /// Damaged bytes `[start, end)` followed by more genuine batches (or by
    /// the segment's known data end).
    Hole {
        start: u64,
        end: u64,
        reason: String,
    },
    /// No genuine batch at or after `start`: the end of the segment's data.
    /// `torn`: the bytes there are not zeros.
    End {
        start: u64,
        torn: Option<String>,
    },
    /// The segment's header page is unreadable (no key: none of its
    /// batches can be checked). Damage below the durable bound; at or past
    /// it, a torn header write, which cuts the log at the segment's base.
    Unreadable {
        base: u64,
    },
}

/// Scans `[from, limit)` of one segment (relative). `known_end`: the data
/// end is known (next segment's header, sealed snapshot), so zeros before
/// it are damage; otherwise zeros end the data.
#[allow(clippy::too_many_arguments)]
async fn scan_segment<F: IoFile>(
    r: &mut Reader<'_, F>,
    base: u64,
    key: &SegmentKey,
    from: u64,
    limit: u64,
    known_end: bool,
    is_last: bool,
    clean_end: Option<u64>,
) -> IoResult<SegmentScan> {
    let mut scan = SegmentScan {
        nonzero_end: base + from,
        ..SegmentScan::default()
    };
    let mut at = from;
    while at < limit {
        if limit - at < BATCH_HEADER_BYTES as u64 {
            // No room for another batch: zeros are the segment's end.
            let rest = r.get(at, (limit - at) as usize).await?;
            let zeros = rest.iter().all(|&b| b == 0);
            scan.found.push(match (zeros, known_end) {
                (true, false) => Found::End {
                    start: base + at,
                    torn: None,
                },
                (_, true) => Found::Hole {
                    start: base + at,
                    end: base + limit,
                    reason: "bytes before the segment's known end hold no batch".into(),
                },
                (false, false) => Found::End {
                    start: base + at,
                    torn: Some("torn bytes after the last batch".into()),
                },
            });
            return Ok(scan);
        }
        let p = probe(r, base, key, at, limit).await?;
        let reason = match p {
            Probe::Genuine(e) => {
                at += u64::from(e.len);
                scan.nonzero_end = scan.nonzero_end.max(e.end());
                scan.found.push(Found::Batch(e));
                continue;
            }
            Probe::Zero if clean_end == Some(base + at) => {
                // A clean stop ended the log exactly here.
                scan.found.push(Found::End {
                    start: base + at,
                    torn: None,
                });
                return Ok(scan);
            }
            Probe::Zero if !known_end && !is_last => {
                // Roll padding (the next segment does not say where this
                // one's data ended).
                scan.found.push(Found::End {
                    start: base + at,
                    torn: None,
                });
                return Ok(scan);
            }
            Probe::Zero => None,
            Probe::Invalid(reason) => Some(reason),
        };
        let (next, nonzero) = find_next_genuine(r, base, key, at, limit).await?;
        scan.nonzero_end = scan.nonzero_end.max(base + nonzero.min(limit));
        match next {
            Some(e) => {
                scan.found.push(Found::Hole {
                    start: base + at,
                    end: e.position,
                    reason: reason.unwrap_or_else(|| "zeros where batches should be".into()),
                });
                at = e.position - base;
            }
            None if known_end => {
                scan.found.push(Found::Hole {
                    start: base + at,
                    end: base + limit,
                    reason: reason.unwrap_or_else(|| "zeros where batches should be".into()),
                });
                return Ok(scan);
            }
            None => {
                let torn = reason.or_else(|| {
                    (nonzero > at).then(|| "torn bytes after the last batch".to_owned())
                });
                scan.found.push(Found::End {
                    start: base + at,
                    torn,
                });
                return Ok(scan);
            }
        }
    }
    scan.found.push(Found::End {
        start: base + limit,
        torn: None,
    });
    Ok(scan)
}

/// A segment file found on disk.
struct SegmentFile<F> {
    base: u64,
    file: Rc<F>,
    capacity: u64,
    header: Option<SegmentHeader>,
    /// The header page reads as zeros: never written.
    zero_page: bool,
    snapshot: Option<(Rc<F>, Snapshot)>,
}

/// Tracks each queue's next expected offset over batches in log order.
#[derive(Default)]
struct OffsetTracker {
    /// queue → (next offset, damaged ranges seen before its last batch)
    next: HashMap<u32, (u64, usize)>,
    /// Damaged ranges seen so far.
    damage: usize,
    gaps: u64,
}

impl OffsetTracker {
    /// Whether `e` continues its queue (an offset that repeats is
    /// refused). A gap after damage counts as lost messages; a gap with no
    /// damage between is a queue resuming past its reservation after a
    /// crash.
    fn accept(&mut self, e: &BatchEntry) -> Result<(), String> {
        if let Some(&(n, damage)) = self.next.get(&e.queue_id) {
            if e.base_offset < n {
                return Err(format!(
                    "queue {} offset {} repeats (expected {n})",
                    e.queue_id, e.base_offset
                ));
            }
            if damage != self.damage {
                self.gaps += e.base_offset - n;
            }
        }
        self.next.insert(e.queue_id, (e.next_offset(), self.damage));
        Ok(())
    }

    fn damaged(&mut self) {
        self.damage += 1;
    }
}

/// What recovery found in the log (the checkpoint aside).
struct RecoveredLog<F> {
    segments: Vec<OpenSegment<F>>,
    batches: Vec<BatchEntry>,
    end_position: u64,
    tail_page: Vec<u8>,
    snapshots: Vec<SnapshotState<F>>,
    report: RecoveryReport,
}

/// Recovers the shard directory of `cfg`.
///
/// A recovery that fails part way (a failed sync may have lost writes the
/// last run completed) marks the storage failure in the checkpoint, best
/// effort, so the next one resumes `written` queues past their reservation.
pub async fn recover<I: Io>(io: &I, cfg: &RecoveryConfig) -> Result<Recovered<I>, RecoveryError> {
    io.create_dir_all(&cfg.dir).await?;
    let (checkpoint_file, checkpoint, cp_state) = CheckpointFile::load(io, &cfg.dir).await;
    match recover_log(io, cfg, checkpoint.as_ref(), cp_state).await {
        Ok(log) => Ok(Recovered {
            segments: log.segments,
            batches: log.batches,
            end_position: log.end_position,
            tail_page: log.tail_page,
            checkpoint: checkpoint.unwrap_or_default(),
            checkpoint_file,
            snapshots: log.snapshots,
            report: log.report,
        }),
        Err(e) => {
            if let Some(cp) = checkpoint.filter(|c| !c.storage_failed) {
                let marked = checkpoint_file
                    .store_with(|| Checkpoint {
                        storage_failed: true,
                        clean_end: None,
                        ..cp
                    })
                    .await;
                if let Err(m) = marked {
                    tracing::warn!(
                        shard = cfg.shard,
                        "cannot mark the storage failure in the checkpoint: {m}"
                    );
                }
            }
            Err(e)
        }
    }
}

async fn recover_log<I: Io>(
    io: &I,
    cfg: &RecoveryConfig,
    checkpoint: Option<&Checkpoint>,
    cp_state: CheckpointState,
) -> Result<RecoveredLog<I::File>, RecoveryError> {
    let dir = &cfg.dir;
    let mut report = RecoveryReport {
        checkpoint: Some(cp_state),
        storage_failed: checkpoint.is_some_and(|c| c.storage_failed),
        ..RecoveryReport::default()
    };
    let mut files = open_segments(io, dir, &mut report).await?;
    let clean_end = checkpoint.and_then(|c| c.clean_end);
    let synced_claim = checkpoint.map_or(0, |c| c.synced_position);

    // Scan every segment (from its snapshot's end when it has one).
    let mut scans: Vec<SegmentScan> = Vec::with_capacity(files.len());
    let mut snap_end = 0u64;
    let mut u = cfg.unsynced_bytes_max;
    for i in 0..files.len() {
        let next_prev_end = files
            .get(i + 1)
            .and_then(|n| n.header)
            .map(|h| h.prev_end)
            .filter(|&p| p > files[i].base && p <= files[i].base + files[i].capacity);
        let seg = &files[i];
        let Some(header) = seg.header else {
            scans.push(SegmentScan {
                found: vec![Found::Unreadable { base: seg.base }],
                nonzero_end: seg.base,
            });
            continue;
        };
        if i + 2 >= files.len() {
            u = u.max(header.unsynced_bytes_max);
        }
        let mut r = Reader::new(&*seg.file, seg.capacity);
        let mut scan = SegmentScan::default();
        let mut from = SEGMENT_HEADER_BYTES;
        let mut known_end = next_prev_end;
        if let Some((_, snap)) = &seg.snapshot {
            let trusted = match snap.entries.last() {
                Some(last) => matches!(
                    probe(&mut r, seg.base, &header.key, last.position - seg.base, seg.capacity)
                        .await?,
                    Probe::Genuine(e) if e == *last
                ),
                None => true,
            };
            if trusted && snap.covered_end >= seg.base + SEGMENT_HEADER_BYTES {
                report.snapshot_batches += snap.entries.len() as u64;
                scan.found
                    .extend(snap.entries.iter().copied().map(Found::Batch));
                from = snap.covered_end - seg.base;
                snap_end = snap_end.max(snap.covered_end);
                if snap.sealed {
                    known_end = Some(snap.covered_end);
                }
            } else {
                report.snapshots_distrusted.push(seg.base);
            }
        }
        let limit = known_end.map_or(seg.capacity, |e| e - seg.base);
        let is_last = i + 1 == files.len();
        let rest = scan_segment(
            &mut r,
            seg.base,
            &header.key,
            from,
            limit,
            known_end.is_some(),
            is_last,
            clean_end,
        )
        .await?;
        scan.found.extend(rest.found);
        scan.nonzero_end = rest.nonzero_end;
        // The next segment's header names where this one's data ended; one
        // that points elsewhere follows a missing segment (never made by
        // the log, which removes segments oldest first, and after a cut
        // newest first): the rest of the log is a hole.
        if let Some(next) = files.get(i + 1) {
            let follows = next
                .header
                .is_none_or(|h| h.prev_end > seg.base && h.prev_end <= seg.base + seg.capacity);
            if !follows {
                let data_end = scan
                    .found
                    .iter()
                    .filter_map(|f| match f {
                        Found::Batch(e) => Some(e.end()),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(seg.base + SEGMENT_HEADER_BYTES);
                scan.found.push(Found::Hole {
                    start: data_end,
                    end: next.base,
                    reason: format!("a segment is missing before segment {}", next.base),
                });
            }
        }
        report.scanned_bytes += r.scanned;
        report.retried_reads += r.retried;
        scans.push(scan);
    }

    // Where can a crash have torn the log? Only in the last unsynced window.
    let lve = scans
        .iter()
        .flat_map(|s| s.found.iter())
        .filter_map(|f| match f {
            Found::Batch(e) => Some(e.end()),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let durable = synced_claim.max(lve.saturating_sub(u)).max(snap_end);
    if synced_claim > lve && lve > 0 {
        report.synced_lost = Some((lve, synced_claim));
    }

    let mut out_batches = Vec::new();
    let mut offsets = OffsetTracker::default();
    let mut cut: Option<(usize, u64, String)> = None;
    'segments: for (i, scan) in scans.iter().enumerate() {
        for f in &scan.found {
            match f {
                Found::Batch(e) => match offsets.accept(e) {
                    Ok(()) => out_batches.push(*e),
                    Err(reason) if e.position < durable => {
                        offsets.damaged();
                        report.corrupt.push(CorruptRange {
                            start: e.position,
                            end: e.end(),
                            reason,
                        })
                    }
                    Err(reason) => {
                        cut = Some((i, e.position, reason));
                        break 'segments;
                    }
                },
                Found::Hole { start, end, reason } if *start < durable => {
                    offsets.damaged();
                    report.corrupt.push(CorruptRange {
                        start: *start,
                        end: *end,
                        reason: reason.clone(),
                    })
                }
                Found::Hole { start, reason, .. } => {
                    cut = Some((i, *start, reason.clone()));
                    break 'segments;
                }
                Found::End {
                    start,
                    torn: Some(reason),
                } if i + 1 < scans.len() && *start < durable => report.corrupt.push(CorruptRange {
                    start: *start,
                    end: files[i].base + files[i].capacity,
                    reason: reason.clone(),
                }),
                Found::End {
                    start,
                    torn: Some(reason),
                } => {
                    cut = Some((i, *start, reason.clone()));
                    break 'segments;
                }
                Found::End { torn: None, .. } => {}
                // Reported as an unreadable segment when it is kept.
                Found::Unreadable { base } if *base < durable => offsets.damaged(),
                Found::Unreadable { base } => {
                    cut = Some((i, *base, "segment header page unreadable".into()));
                    break 'segments;
                }
            }
        }
    }
    report.offset_gaps = offsets.gaps;

    // Apply a cut: later segments go, torn bytes are zeroed in place.
    let mut keep = files.len();
    if let Some((i, position, reason)) = cut {
        report.discarded_batches = scans[i..]
            .iter()
            .flat_map(|s| s.found.iter())
            .filter(|f| matches!(f, Found::Batch(e) if e.position >= position))
            .count() as u64;
        // The segment that ends the log now, and where.
        let last = match files[i].header {
            Some(_) => {
                keep = i + 1;
                Some((i, position))
            }
            None => {
                // A torn header: the segment goes with the ones after it,
                // and the one before ends the log at its last batch.
                keep = i;
                i.checked_sub(1).map(|j| {
                    let seg = &files[j];
                    let end = out_batches
                        .iter()
                        .rev()
                        .find(|e| e.position >= seg.base && e.position < seg.base + seg.capacity)
                        .map_or(seg.base + SEGMENT_HEADER_BYTES, |e| e.end());
                    (j, end)
                })
            }
        };
        if let Some((j, end)) = last {
            let seg = &files[j];
            if let Some(h) = &seg.header {
                let clear_to = scans[j].nonzero_end.max(end).min(seg.base + seg.capacity);
                let info = SegmentInfo {
                    base: seg.base,
                    capacity: seg.capacity,
                    used: 0,
                    max_append_time_ms: 0,
                    key: h.key,
                };
                let (keep_bytes, failed) =
                    verified_bytes(&*seg.file, &info, &out_batches, align_down(end), end).await?;
                drop_failed(&mut out_batches, &failed, &mut report);
                zero_range(io, &*seg.file, seg.base, end, clear_to, &keep_bytes).await?;
            }
        }
        report.torn = Some(TornTail { position, reason });
    }
    // Newest first: a removal cut short leaves the log a prefix of itself.
    for seg in files.drain(keep..).rev() {
        remove_segment(io, dir, seg.base).await?;
        report
            .removed_segments
            .push((seg.base, "after the torn tail"));
    }
    if keep < scans.len() {
        scans.truncate(keep);
    }

    // Every kept segment that was scanned may hold data written but not
    // synced before the stop: make it durable before it counts as synced.
    let mut segments = Vec::with_capacity(files.len());
    let mut snapshots = Vec::new();
    for (seg, scan) in files.into_iter().zip(&scans) {
        let Some(header) = seg.header else {
            report.unreadable_segments.push(seg.base);
            segments.push(OpenSegment {
                info: SegmentInfo {
                    base: seg.base,
                    capacity: seg.capacity,
                    used: seg.capacity,
                    max_append_time_ms: 0,
                    key: SegmentKey([0; 16]),
                },
                file: seg.file,
                sealed: true,
            });
            continue;
        };
        let mine =
            &out_batches[..out_batches.partition_point(|e| e.position < seg.base + seg.capacity)];
        let mine = &mine[mine.partition_point(|e| e.position < seg.base)..];
        let used = mine
            .last()
            .map_or(SEGMENT_HEADER_BYTES, |e| e.end() - seg.base);
        let max_ms = mine.iter().map(|e| e.append_time_ms).max().unwrap_or(0);
        let sealed = seg.snapshot.as_ref().is_some_and(|(_, s)| s.sealed);
        if !sealed && !scan.found.is_empty() {
            seg.file.sync().await?;
        }
        snapshots.push(match &seg.snapshot {
            Some((f, s)) if !report.snapshots_distrusted.contains(&seg.base) => SnapshotState {
                base: seg.base,
                file: Some((f.clone(), s.file_len)),
                covered_end: s.covered_end,
                sealed: s.sealed,
            },
            _ => SnapshotState {
                base: seg.base,
                file: None,
                covered_end: seg.base + SEGMENT_HEADER_BYTES,
                sealed: false,
            },
        });
        segments.push(OpenSegment {
            info: SegmentInfo {
                base: seg.base,
                capacity: seg.capacity,
                used,
                max_append_time_ms: max_ms,
                key: header.key,
            },
            file: seg.file,
            sealed,
        });
    }
    for s in &snapshots {
        if s.file.is_none() {
            // A distrusted or missing snapshot starts again from scratch.
            let _ = io.remove(&index_path(dir, s.base)).await;
        }
    }

    let (end_position, tail_page) = match segments.last() {
        Some(last) => {
            let end = last.info.data_end();
            let page = align_down(end).max(last.info.base);
            let tail = if end > page && !last.sealed {
                let (bytes, failed) =
                    verified_bytes(&*last.file, &last.info, &out_batches, page, end).await?;
                drop_failed(&mut out_batches, &failed, &mut report);
                bytes
            } else {
                vec![0; (end - page) as usize]
            };
            (end, tail)
        }
        None => (0, Vec::new()),
    };
    report.segments = segments.len();
    report.batches = out_batches.len() as u64;
    report.messages = out_batches.iter().map(|b| u64::from(b.count)).sum();
    Ok(RecoveredLog {
        segments,
        batches: out_batches,
        end_position,
        tail_page,
        snapshots,
        report,
    })
}

/// Opens every segment of `dir` with its header and snapshot; removes
/// never-used segment files (an all-zero header page: prepared ahead, or
/// crashed during creation) at the end, and stray temp files.
async fn open_segments<I: Io>(
    io: &I,
    dir: &Path,
    report: &mut RecoveryReport,
) -> Result<Vec<SegmentFile<I::File>>, RecoveryError> {
    let names = io.list_dir(dir).await?;
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_file_name(n, "log"))
        .collect();
    bases.sort_unstable();
    for n in &names {
        if n.ends_with(".tmp") {
            let _ = io.remove(&dir.join(n)).await;
        }
        if let Some(b) = parse_file_name(n, "idx") {
            if bases.binary_search(&b).is_err() {
                let _ = io.remove(&dir.join(n)).await;
            }
        }
    }
    let mut files = Vec::with_capacity(bases.len());
    for &base in &bases {
        let path = segment_path(dir, base);
        let file = io.open(&path).await?;
        let capacity = align_down(file.size().await?);
        let mut header = None;
        let mut zero_page = true;
        if capacity >= SEGMENT_HEADER_BYTES {
            for _ in 0..=READ_RETRIES {
                let page = agreed_read(&file, 0, SEGMENT_HEADER_BYTES as usize).await?;
                header = SegmentHeader::decode_page(&page).filter(|h| h.base == base);
                zero_page = page.iter().all(|&b| b == 0);
                if header.is_some() {
                    break;
                }
                report.retried_reads += 1;
            }
        }
        let snapshot = match header {
            Some(_) => {
                index_snapshot::load(io, &index_path(dir, base), base + SEGMENT_HEADER_BYTES)
                    .await
                    .map(|(f, s)| (Rc::new(f), s))
                    .filter(|(_, s)| s.covered_end <= base + capacity)
            }
            None => None,
        };
        files.push(SegmentFile {
            base,
            file: Rc::new(file),
            capacity,
            header,
            zero_page,
            snapshot,
        });
    }
    // Never-used files at the end (a prepared next segment, a creation cut
    // short): no header was ever written, so they hold no data.
    while let Some(last) = files.last() {
        let unused =
            last.capacity < SEGMENT_HEADER_BYTES || (last.header.is_none() && last.zero_page);
        if !unused {
            break;
        }
        let seg = files.pop().expect("last");
        drop(seg.file);
        remove_segment(io, dir, seg.base).await?;
        report
            .removed_segments
            .push((seg.base, "prepared, never written"));
    }
    Ok(files)
}

async fn remove_segment<I: Io>(io: &I, dir: &Path, base: u64) -> IoResult<()> {
    io.remove(&segment_path(dir, base)).await?;
    let _ = io.remove(&index_path(dir, base)).await;
    io.sync_dir(dir).await
}

/// Overwrites `[from, to)` (absolute) of a segment with zeros, keeping
/// `keep` (the checked bytes of `[align_down(from), from)`), and syncs it.
/// In place: no allocation.
async fn zero_range<I: Io>(
    io: &I,
    file: &I::File,
    base: u64,
    from: u64,
    to: u64,
    keep: &[u8],
) -> IoResult<()> {
    if to <= from {
        return Ok(());
    }
    let page = align_down(from);
    assert_eq!(
        keep.len() as u64,
        from - page,
        "kept bytes cover the page start"
    );
    let end = align_up(to);
    let mut at = page;
    while at < end {
        let n = (end - at).min(READ_WINDOW_BYTES as u64);
        let mut buf = io.buffer(n as usize);
        if at == page {
            buf.bytes_mut()[..keep.len()].copy_from_slice(keep);
        }
        file.write_at(buf, at - base).await?;
        at += n;
    }
    file.sync().await
}

#[cfg(test)]
mod tests;
