//! The shard's commit log: one append-only sequence of batches across
//! fixed-size segment files, written with direct I/O through the I/O seam.
//!
//! Contract (everything runs on the owning shard's executor):
//! - [`CommitLog::admission`] says whether an append of some length can be
//!   taken now, must wait ([`CommitLog::wait_admission`]), or is refused
//!   (disk full, storage failed, closing). [`CommitLog::append`] is
//!   synchronous: it assigns the batch its log position and queues it.
//! - Appends wait while more than `pending_bytes_max` bytes are appended
//!   but not written (the bound on memory when producers outrun the disk),
//!   and at a segment roll until the next segment is ready. A preparer task
//!   creates the next segment (create, fallocate, directory sync) when the
//!   active one is half full, so a roll costs nothing on the append path;
//!   if the disk is full it removes the half-made file and appends that need
//!   the new segment are refused with [`LogError::Full`] until space is free
//!   (it retries every [`FULL_RETRY_MS`] and whenever retention frees space).
//! - One flusher task writes queued batches in position order, one write in
//!   flight, rewriting the last partial 4 KiB page each time (O_DIRECT needs
//!   aligned writes); a segment's header page goes out with its first
//!   batches. `written` advances when a write completes. It writes at once
//!   when someone waits, when a full write is queued, or on close; appends
//!   nobody waits on (durability `memory`) wait up to
//!   `unawaited_write_delay` to share a write.
//! - A write never starts past `synced + unsynced_bytes_max`: the flusher
//!   asks for a sync first. So after a power cut at any instant only the
//!   last `unsynced_bytes_max` of the log can be torn or lost, which is how
//!   recovery tells a torn tail from corruption without any checkpoint.
//! - One syncer task runs fdatasync when someone waits for durability:
//!   every append whose write completed before the fdatasync started is
//!   covered (group commit); `synced` advances to what was written then.
//!   While someone waits for durability the flusher does not start the
//!   next write until the fdatasync its last write asked for is done: a
//!   disk that serves one request at a time (virtio-blk here) makes a
//!   write and a flush in flight together each wait for the other, so
//!   overlapping them made both slower (10k/s, 100 B: write 155 -> 115 µs,
//!   fdatasync 170 -> 105 µs, ack p50 710-830 -> 490-550 µs), and under
//!   saturation the next write, bigger, still carries everything that
//!   arrived (8 producers: 2.35-2.61M -> 2.55-2.78M msg/s).
//! - When someone waits for durability, nobody for the write alone at
//!   `written` (the linked fdatasync's dispatch would preempt the shard
//!   before it sees the write), no other fdatasync of the log's files is
//!   in flight and every byte before the write's segment is synced, the
//!   flusher hands the fdatasync to the kernel with
//!   its write ([`IoFile::write_then_sync`]: io_uring links it behind the
//!   write, so it starts as the write completes, without a turn of the
//!   executor) and advances `synced` itself: every unsynced byte is in
//!   this file and written by then. `written` advances as soon as the
//!   write is seen complete, before the fdatasync. A segment's first write
//!   (its header) and writes with an older segment still unsynced go the
//!   syncer's way.
//! - One fdatasync of the log's files at a time (flusher, syncer, zeroer;
//!   `SyncHold`): the kernel may report a failed writeback to one
//!   fdatasync alone, and that failure must stop the log before another
//!   sync's success advances `synced`.
//!   Measured at 10k/s: ack p99 3.2-3.8 ms in 6 of 6 runs against 3.1-63
//!   ms, p50 and 8-producer throughput unchanged (docs/BENCHMARKS.md).
//! - ENOSPC on a write keeps the batches queued, refuses new appends with
//!   [`LogError::Full`], and retries; nothing is lost or acknowledged early.
//!   Any other write or fdatasync failure stops the log for writes
//!   ([`LogError::Failed`]): every waiter and later append gets the error,
//!   nothing past the last good fdatasync is acknowledged at `fsync`, and a
//!   failed fdatasync is never retried (its data is not assumed durable).
//!   Reads go on.

use bytes::Bytes;
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::io::{Io, IoBuffer, IoFailure, IoFile, IoKind, TaskClass};
use super::segment::{segment_path, SegmentHeader, SegmentInfo, SEGMENT_HEADER_BYTES};
use super::{align_down, align_up};
use crate::batch::SegmentKey;
use crate::runtime::Watch;

/// Settings of one shard's log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub dir: PathBuf,
    pub shard: u16,
    /// Capacity of new segments (a multiple of 4 KiB), unless the disk has
    /// less free: then the size that fits (two segments per shard on the
    /// disk), at least `segment_bytes_min`.
    pub segment_bytes: u64,
    /// Smallest segment a batch fits in.
    pub segment_bytes_min: u64,
    /// Shards whose logs share the disk.
    pub disk_shards: u16,
    pub write_bytes_max: u64,
    /// Longest an append nobody waits on (durability `memory`) waits to
    /// share a write; zero writes at once.
    pub unawaited_write_delay: Duration,
    /// Most bytes appended but not yet written; appends beyond it wait.
    pub pending_bytes_max: u64,
    /// Most bytes written but not yet synced: a write never starts past
    /// `synced + unsynced_bytes_max`.
    pub unsynced_bytes_max: u64,
}

/// Why a log operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The filesystem is full: the append was not taken. Retriable once
    /// space is freed; the log resumes by itself.
    #[error("storage full: {0}")]
    Full(IoFailure),
    /// The log takes no more writes after an I/O failure (until restart);
    /// reads go on.
    #[error("storage failed and takes no writes until restart: {0}")]
    Failed(IoFailure),
    /// A read failed (the log itself is unaffected).
    #[error(transparent)]
    Read(IoFailure),
    /// The append could not be taken within the time the caller waited.
    #[error("busy: {0}")]
    Busy(&'static str),
    #[error("the log is closing")]
    Closing,
    #[error("position {0} is not in the log")]
    NotFound(u64),
}

/// What [`CommitLog::admission`] says of an append.
#[derive(Debug)]
pub enum Admission {
    Now,
    /// Try again later (the reason, for the `busy` error).
    Wait(&'static str),
    Refused(LogError),
}

/// How long to wait before retrying a write or a segment creation that met
/// a full disk.
pub const FULL_RETRY_MS: u64 = 200;
/// How long `close` waits for queued batches on a full disk.
const CLOSE_FULL_WAIT: Duration = Duration::from_secs(5);

/// How far ahead of the append position the zeroer prepares the segment.
pub const ZERO_AHEAD_BYTES: u64 = 8 << 20;
/// Above this append rate the zeroer pauses.
pub const ZERO_RATE_BYTES_PER_S_MAX: u64 = 64 << 20;
/// Size of one zeroing write.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

struct Segment<F> {
    info: SegmentInfo,
    /// End of the previous segment's data, for the header page.
    prev_end: u64,
    file: Rc<F>,
    /// The header page is on disk (written with the first batches).
    header_written: bool,
    /// Takes no more batches.
    sealed: bool,
}

/// The next segment, prepared ahead of the roll.
enum Spare<F> {
    Missing,
    /// Being created; `after` is the full-disk failure it retries, still
    /// what [`CommitLog::full`] reports until the creation succeeds.
    Creating {
        after: Option<IoFailure>,
    },
    Ready(Segment<F>),
    /// Creation met a full disk; retried at `retry_at_ms` or when space is
    /// freed.
    Full {
        failure: IoFailure,
        retry_at_ms: i64,
    },
}

struct State<F> {
    segments: BTreeMap<u64, Segment<F>>,
    spare: Spare<F>,
    /// An append waits for the spare: prepare it now.
    spare_wanted: bool,
    append_pos: u64,
    pending: VecDeque<(u64, Bytes)>,
    /// Bytes in `pending`.
    pending_bytes: u64,
    /// Bytes of `[align_down(written), written)` as last written.
    tail_page: Vec<u8>,
    dirty: Vec<Rc<F>>,
    sync_wanted: u64,
    /// Highest position someone waits to see written (or synced).
    write_wanted: u64,
    /// Highest position someone waits to see written, and only that
    /// (`wait_written`): such a write goes without a linked fdatasync,
    /// whose dispatch would hold the shard off the write's completion.
    written_waited: u64,
    /// Writes stopped for good after this failure.
    failure: Option<IoFailure>,
    /// A write met ENOSPC and is being retried; appends are refused.
    write_full: Option<IoFailure>,
    closing: bool,
    /// Positions of the active segment below this are allocated *and
    /// written* (data or zeros), so writes there need no extent conversion
    /// and fdatasync flushes data only.
    zeroed_upto: u64,
    /// A zero write in flight: the flusher must not write into it.
    zeroing: Option<(u64, u64)>,
    /// An fdatasync of the log's files is in flight ([`SyncHold`]).
    syncing: bool,
}

/// A segment recovery handed over, with its open file.
pub struct OpenSegment<F> {
    pub info: SegmentInfo,
    pub file: Rc<F>,
    /// Takes no more batches (its index snapshot says its data ends, or
    /// its header is unreadable): the next append rolls.
    pub sealed: bool,
}

/// One shard's commit log. See the module docs for the contract.
pub struct CommitLog<I: Io> {
    io: I,
    cfg: LogConfig,
    state: RefCell<State<I::File>>,
    written: Watch,
    synced: Watch,
    /// Event counters that wake the flusher, the syncer and the preparer.
    write_work: Watch,
    sync_work: Watch,
    prepare_work: Watch,
    /// Bumped whenever a waiting append may now be taken (or refused).
    admit_changed: Watch,
    /// Bumped whenever a zero write finishes.
    zero_done: Watch,
    /// Reaches 1 when the log stops for a failure.
    failed_event: Watch,
    fsync_us: RefCell<Histogram<u64>>,
    write_us: RefCell<Histogram<u64>>,
    /// Where an append's time goes: append -> written -> synced.
    stages: RefCell<Stages>,
}

/// Most appends (and writes) whose times the stage histograms keep while
/// they wait; past it the newest go unmeasured.
const STAGE_TIMES_MAX: usize = 65_536;

/// The stages of the write path, timed: when each append (by its end) was
/// taken and when each write (by its end) completed, until the write and
/// the fdatasync covering them complete.
struct Stages {
    appended: VecDeque<(u64, Instant)>,
    written: VecDeque<(u64, Instant)>,
    /// µs from an append to the completion of the write holding it.
    append_written_us: Histogram<u64>,
    /// µs from a write's completion to the fdatasync that covers it.
    written_synced_us: Histogram<u64>,
}

impl Stages {
    fn new() -> Stages {
        Stages {
            appended: VecDeque::new(),
            written: VecDeque::new(),
            append_written_us: histogram(),
            written_synced_us: histogram(),
        }
    }

    /// Appends ending at or before `end` are written (so is the write).
    fn wrote(&mut self, end: u64, now: Instant) {
        reached(&mut self.appended, end, now, &mut self.append_written_us);
        if self.written.len() < STAGE_TIMES_MAX {
            self.written.push_back((end, now));
        }
    }

    /// Writes ending at or before `end` are synced.
    fn synced(&mut self, end: u64, now: Instant) {
        reached(&mut self.written, end, now, &mut self.written_synced_us);
    }
}

/// Takes the times of everything ending at or before `end` off `times`,
/// recording how long each waited until `now` (µs).
fn reached(times: &mut VecDeque<(u64, Instant)>, end: u64, now: Instant, h: &mut Histogram<u64>) {
    while let Some(&(e, t)) = times.front() {
        if e > end {
            break;
        }
        times.pop_front();
        let _ = h.record(now.duration_since(t).as_micros() as u64);
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

fn bump(w: &Watch) {
    w.advance(w.get() + 1);
}

/// What a failed write leaves to the flusher.
/// What a completed write leaves to record ([`CommitLog::finish_write`]).
struct WriteDone<F> {
    seg_base: u64,
    file: Rc<F>,
    /// Bytes of the last page up to `end`, as written.
    new_tail: Vec<u8>,
    data_len: u64,
    end: u64,
    /// Bytes the write must have written.
    size: usize,
}

/// One fdatasync of the log's files at a time (the syncer's, the
/// zeroer's, or the flusher's linked one): a failed fdatasync may report
/// lost writes to its caller alone, and the failure must stop the log
/// before another sync's success advances `synced` (and a disk that serves
/// one request at a time gains nothing from two). Released on drop.
struct SyncHold<'a, I: Io>(&'a CommitLog<I>);

impl<'a, I: Io> SyncHold<'a, I> {
    fn take(log: &'a CommitLog<I>) -> Self {
        let mut s = log.state.borrow_mut();
        debug_assert!(!s.syncing, "two fdatasyncs of the log at once");
        s.syncing = true;
        SyncHold(log)
    }
}

impl<I: Io> Drop for SyncHold<'_, I> {
    fn drop(&mut self) {
        self.0.state.borrow_mut().syncing = false;
        bump(&self.0.sync_work);
    }
}

enum WriteError {
    /// ENOSPC: the batches go back to the front of the queue.
    NoSpace(IoFailure, Vec<(u64, Bytes)>, Option<Vec<u8>>),
    Failed(IoFailure),
}

impl<I: Io> CommitLog<I> {
    /// The log over recovered segments (ascending), with the next append at
    /// `end` and `tail_page` the bytes of the last partial page. Recovery
    /// synced every segment, so everything before `end` is durable.
    pub fn open(
        io: I,
        cfg: LogConfig,
        segments: Vec<OpenSegment<I::File>>,
        end: u64,
        tail_page: Vec<u8>,
    ) -> Rc<CommitLog<I>> {
        assert_eq!(
            tail_page.len() as u64,
            end - align_down(end),
            "tail page must cover [align_down(end), end)"
        );
        assert!(
            cfg.unsynced_bytes_max >= 2 * cfg.write_bytes_max,
            "unsynced window smaller than two writes"
        );
        let mut map = BTreeMap::new();
        for s in segments {
            assert_eq!(
                s.info.capacity % super::DMA_ALIGNMENT_BYTES,
                0,
                "segment capacity unaligned"
            );
            map.insert(
                s.info.base,
                Segment {
                    info: s.info,
                    prev_end: 0,
                    file: s.file,
                    header_written: true,
                    sealed: s.sealed,
                },
            );
        }
        if let Some(last) = map.values().next_back() {
            assert!(end >= last.info.data_start() && end <= last.info.end());
        }
        Rc::new(CommitLog {
            io,
            cfg,
            state: RefCell::new(State {
                segments: map,
                spare: Spare::Missing,
                spare_wanted: false,
                append_pos: end,
                pending: VecDeque::new(),
                pending_bytes: 0,
                tail_page,
                dirty: Vec::new(),
                sync_wanted: 0,
                write_wanted: 0,
                written_waited: 0,
                failure: None,
                write_full: None,
                closing: false,
                zeroed_upto: align_up(end),
                zeroing: None,
                syncing: false,
            }),
            written: Watch::new(end),
            synced: Watch::new(end),
            write_work: Watch::new(0),
            sync_work: Watch::new(0),
            prepare_work: Watch::new(0),
            admit_changed: Watch::new(0),
            zero_done: Watch::new(0),
            failed_event: Watch::new(0),
            fsync_us: RefCell::new(histogram()),
            write_us: RefCell::new(histogram()),
            stages: RefCell::new(Stages::new()),
        })
    }

    /// Starts the flusher, syncer and preparer (data queue) and, with
    /// `zero_ahead`, the zeroer (background queue).
    ///
    /// Segments are created with fallocate, which leaves *unwritten*
    /// extents: the first write to each block then converts its extent at
    /// completion and the next fdatasync commits that metadata, which costs
    /// milliseconds per append on ext4. The zeroer writes zeros (and syncs
    /// them) a little ahead of the append position, so appends land on
    /// written blocks and an fdatasync flushes data only.
    pub fn start(self: &Rc<Self>, zero_ahead: bool) {
        let me = self.clone();
        self.io
            .spawn(TaskClass::Data, async move { me.flusher().await });
        let me = self.clone();
        self.io
            .spawn(TaskClass::Data, async move { me.syncer().await });
        let me = self.clone();
        self.io
            .spawn(TaskClass::Data, async move { me.preparer().await });
        if zero_ahead {
            let me = self.clone();
            self.io
                .spawn(TaskClass::Background, async move { me.zeroer().await });
        }
    }

    fn needs_roll(s: &State<I::File>, len: u64) -> bool {
        match s.segments.values().next_back() {
            Some(active) => active.sealed || s.append_pos + len > active.info.end(),
            None => true,
        }
    }

    /// Whether an append of `len` bytes can be taken now.
    pub fn admission(&self, len: u64) -> Admission {
        let mut s = self.state.borrow_mut();
        if let Some(f) = &s.failure {
            return Admission::Refused(LogError::Failed(f.clone()));
        }
        if s.closing {
            return Admission::Refused(LogError::Closing);
        }
        if let Some(f) = &s.write_full {
            return Admission::Refused(LogError::Full(f.clone()));
        }
        if s.pending_bytes > 0 && s.pending_bytes + len > self.cfg.pending_bytes_max {
            return Admission::Wait("memory_pending_bytes_max reached: the disk is behind");
        }
        if !Self::needs_roll(&s, len) {
            return Admission::Now;
        }
        match &s.spare {
            Spare::Ready(seg) if SEGMENT_HEADER_BYTES + len <= seg.info.capacity => Admission::Now,
            Spare::Ready(_) => {
                // Prepared small (the disk was nearly full) and too small
                // for this batch: prepare one that fits.
                let Spare::Ready(small) = std::mem::replace(&mut s.spare, Spare::Missing) else {
                    unreachable!("matched above");
                };
                s.spare_wanted = true;
                drop(s);
                drop(small);
                bump(&self.prepare_work);
                Admission::Wait("preparing the next segment")
            }
            Spare::Full { failure, .. } => Admission::Refused(LogError::Full(failure.clone())),
            Spare::Missing | Spare::Creating { .. } => {
                if !s.spare_wanted {
                    s.spare_wanted = true;
                    drop(s);
                    bump(&self.prepare_work);
                }
                Admission::Wait("preparing the next segment")
            }
        }
    }

    /// Waits (up to `limit`) until an append of `len` bytes can be taken.
    pub async fn wait_admission(&self, len: u64, limit: Duration) -> Result<(), LogError> {
        let deadline_ms = self.io.now_ms() + limit.as_millis() as i64;
        loop {
            let seen = self.admit_changed.get();
            match self.admission(len) {
                Admission::Now => return Ok(()),
                Admission::Refused(e) => return Err(e),
                Admission::Wait(why) => {
                    let left_ms = deadline_ms - self.io.now_ms();
                    if left_ms <= 0 {
                        return Err(LogError::Busy(why));
                    }
                    let timer = self.io.sleep(Duration::from_millis(left_ms as u64));
                    self.admit_changed.wait_for_within(seen + 1, timer).await;
                }
            }
        }
    }

    /// Assigns a batch of `len` bytes the next log position, lets `stamp`
    /// build the batch for that position under its segment's key, and queues
    /// it for writing. Fails unless [`CommitLog::admission`] says `Now`.
    pub fn append(
        &self,
        len: u64,
        append_time_ms: i64,
        stamp: impl FnOnce(u64, &SegmentKey) -> Bytes,
    ) -> Result<(u64, Bytes), LogError> {
        match self.admission(len) {
            Admission::Now => {}
            Admission::Wait(why) => return Err(LogError::Busy(why)),
            Admission::Refused(e) => return Err(e),
        }
        let mut s = self.state.borrow_mut();
        assert!(len > 0, "empty batch");
        if Self::needs_roll(&s, len) {
            self.roll(&mut s);
        }
        let pos = s.append_pos;
        let active = s.segments.values_mut().next_back().expect("active segment");
        assert!(
            pos >= active.info.data_start(),
            "append inside a header page"
        );
        assert!(pos + len <= active.info.end(), "append past its segment");
        let batch = stamp(pos, &active.info.key);
        assert_eq!(batch.len() as u64, len, "stamped batch changed length");
        active.info.used = pos + len - active.info.base;
        active.info.max_append_time_ms = active.info.max_append_time_ms.max(append_time_ms);
        let half_full = active.info.used * 2 >= active.info.capacity;
        s.append_pos += len;
        s.pending_bytes += len;
        s.pending.push_back((pos, batch.clone()));
        let spare_missing = matches!(s.spare, Spare::Missing);
        drop(s);
        {
            let mut st = self.stages.borrow_mut();
            if st.appended.len() < STAGE_TIMES_MAX {
                st.appended.push_back((pos + len, Instant::now()));
            }
        }
        bump(&self.write_work);
        if half_full && spare_missing {
            bump(&self.prepare_work);
        }
        Ok((pos, batch))
    }

    /// Makes the spare the active segment (admission checked it is ready).
    fn roll(&self, s: &mut State<I::File>) {
        let Spare::Ready(mut seg) = std::mem::replace(&mut s.spare, Spare::Missing) else {
            panic!("roll without a ready segment");
        };
        seg.prev_end = match s.segments.values().next_back() {
            Some(_) => s.append_pos,
            None => seg.info.base,
        };
        assert!(
            seg.prev_end <= seg.info.base,
            "next segment overlaps the log"
        );
        s.append_pos = seg.info.data_start();
        s.zeroed_upto = seg.info.base;
        s.spare_wanted = false;
        s.segments.insert(seg.info.base, seg);
        bump(&self.prepare_work);
    }

    /// Resolves once every byte before `end` is written (io_uring write done).
    pub async fn wait_written(&self, end: u64) -> Result<(), LogError> {
        if self.written.get() >= end {
            return Ok(());
        }
        {
            let mut s = self.state.borrow_mut();
            s.written_waited = s.written_waited.max(end);
        }
        self.want_written(end);
        self.written.wait_for(end).await.map_err(|_| self.stopped())
    }

    /// Someone waits for `end` to be written: the flusher writes now.
    fn want_written(&self, end: u64) {
        let mut s = self.state.borrow_mut();
        if end > s.write_wanted {
            s.write_wanted = end;
            drop(s);
            bump(&self.write_work);
        }
    }

    /// Resolves once every byte before `end` is durable (fdatasync done).
    pub async fn wait_synced(&self, end: u64) -> Result<(), LogError> {
        if self.synced.get() >= end {
            return Ok(());
        }
        {
            let mut s = self.state.borrow_mut();
            s.sync_wanted = s.sync_wanted.max(end);
        }
        self.want_written(end);
        bump(&self.sync_work);
        self.synced.wait_for(end).await.map_err(|_| self.stopped())
    }

    /// The error for a waiter whose watch closed.
    fn stopped(&self) -> LogError {
        match &self.state.borrow().failure {
            Some(f) => LogError::Failed(f.clone()),
            None => LogError::Closing,
        }
    }

    /// Position the next append gets (end of appended data).
    pub fn append_position(&self) -> u64 {
        self.state.borrow().append_pos
    }
    /// End of written data.
    pub fn written_position(&self) -> u64 {
        self.written.get()
    }
    /// End of durable data.
    pub fn synced_position(&self) -> u64 {
        self.synced.get()
    }
    /// Bytes appended but not yet written.
    pub fn pending_bytes(&self) -> u64 {
        self.state.borrow().pending_bytes
    }
    /// The failure that stopped writes, if any.
    pub fn failed(&self) -> Option<IoFailure> {
        self.state.borrow().failure.clone()
    }
    /// Why appends are refused for lack of space, if they are.
    pub fn full(&self) -> Option<IoFailure> {
        let s = self.state.borrow();
        match (&s.write_full, &s.spare) {
            (Some(f), _)
            | (None, Spare::Full { failure: f, .. })
            | (None, Spare::Creating { after: Some(f) }) => Some(f.clone()),
            _ => None,
        }
    }

    /// Segments, ascending.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.state
            .borrow()
            .segments
            .values()
            .map(|s| s.info)
            .collect()
    }

    /// The key of the segment holding `position`.
    pub fn key_at(&self, position: u64) -> Option<SegmentKey> {
        let s = self.state.borrow();
        let (_, seg) = s.segments.range(..=position).next_back()?;
        (position < seg.info.end()).then_some(seg.info.key)
    }

    /// Latency histograms (µs) of writes and fdatasyncs.
    pub fn latency_histograms(&self) -> (Histogram<u64>, Histogram<u64>) {
        (
            self.write_us.borrow().clone(),
            self.fsync_us.borrow().clone(),
        )
    }

    /// Stage histograms (µs): append -> written (the write holding it
    /// completed), written -> synced (the fdatasync covering that write
    /// completed).
    pub fn stage_histograms(&self) -> (Histogram<u64>, Histogram<u64>) {
        let st = self.stages.borrow();
        (st.append_written_us.clone(), st.written_synced_us.clone())
    }

    /// Reads `len` bytes at `position` from its segment file. The caller
    /// serves unwritten positions from the tail cache.
    pub async fn read(&self, position: u64, len: usize) -> Result<Bytes, LogError> {
        let (file, base) = {
            let s = self.state.borrow();
            let (base, seg) = s
                .segments
                .range(..=position)
                .next_back()
                .ok_or(LogError::NotFound(position))?;
            if position < seg.info.data_start() || position + len as u64 > seg.info.end() {
                return Err(LogError::NotFound(position));
            }
            (seg.file.clone(), *base)
        };
        let b = file
            .read_at(position - base, len)
            .await
            .map_err(LogError::Read)?;
        if b.len() < len {
            return Err(LogError::NotFound(position));
        }
        Ok(b)
    }

    /// Removes whole segments (retention). Never the active one. Space
    /// freed wakes a preparer that met a full disk.
    pub async fn delete_segments(&self, bases: &[u64]) -> Result<(), IoFailure> {
        for &base in bases {
            let seg = {
                let mut s = self.state.borrow_mut();
                let last = *s.segments.keys().next_back().expect("log has segments");
                assert_ne!(base, last, "retention must not delete the active segment");
                let seg = s.segments.remove(&base);
                // Drop every handle on the file (a written-level log syncs
                // rarely, so `dirty` would otherwise keep it open and the
                // unlinked file's space would not come back).
                if let Some(g) = &seg {
                    s.dirty.retain(|f| !Rc::ptr_eq(f, &g.file));
                }
                seg
            };
            if seg.is_some() {
                self.io.remove(&segment_path(&self.cfg.dir, base)).await?;
            }
        }
        self.space_freed();
        Ok(())
    }

    /// Space may be free again (retention, a deleted topic, an operator):
    /// a segment creation that met a full disk is retried now.
    pub fn space_freed(&self) {
        let mut s = self.state.borrow_mut();
        if let Spare::Full { retry_at_ms, .. } = &mut s.spare {
            *retry_at_ms = 0;
            drop(s);
            bump(&self.prepare_work);
        }
    }

    /// Stops accepting appends, writes and syncs everything appended so far.
    pub async fn close(&self) -> Result<(), LogError> {
        let end = {
            let mut s = self.state.borrow_mut();
            s.closing = true;
            s.append_pos
        };
        bump(&self.write_work);
        bump(&self.prepare_work);
        bump(&self.admit_changed);
        let written = async { self.wait_written(end).await.map(|_| true) };
        let gave_up = async {
            loop {
                self.io.sleep(CLOSE_FULL_WAIT).await;
                if self.state.borrow().write_full.is_some() {
                    return Ok(false);
                }
            }
        };
        if !futures_lite::future::or(written, gave_up).await? {
            let f = self.full().expect("full");
            return Err(LogError::Full(f));
        }
        self.wait_synced(end).await
    }

    /// A failure elsewhere in the shard's storage (the checkpoint) stops
    /// the log's writes too.
    pub fn fail_external(&self, e: IoFailure) {
        self.fail(e);
    }

    fn fail(&self, e: IoFailure) {
        tracing::error!(
            shard = self.cfg.shard,
            "commit log stops taking writes: {e}"
        );
        self.state.borrow_mut().failure.get_or_insert(e);
        self.written.close();
        self.synced.close();
        bump(&self.admit_changed);
        bump(&self.prepare_work);
        self.failed_event.advance(1);
    }

    /// Resolves once the log stopped for a failure.
    pub async fn wait_failed(&self) {
        let _ = self.failed_event.wait_for(1).await;
    }

    /// Creates segment files ahead of the roll.
    async fn preparer(self: Rc<Self>) {
        loop {
            let seen = self.prepare_work.get();
            let (base, retry_in) = {
                let s = self.state.borrow();
                if s.closing || s.failure.is_some() {
                    return;
                }
                let active = s.segments.values().next_back();
                let wanted = s.spare_wanted
                    || active.is_none_or(|a| a.sealed || a.info.used * 2 >= a.info.capacity);
                let base = match active {
                    Some(a) => a.info.end(),
                    None => align_up(s.append_pos),
                };
                match &s.spare {
                    Spare::Missing if wanted => (Some(base), None),
                    Spare::Full { retry_at_ms, .. } => {
                        let now = self.io.now_ms();
                        if now >= *retry_at_ms {
                            (Some(base), None)
                        } else {
                            (None, Some((*retry_at_ms - now) as u64))
                        }
                    }
                    _ => (None, None),
                }
            };
            let Some(base) = base else {
                match retry_in {
                    Some(ms) => {
                        let timer = self.io.sleep(Duration::from_millis(ms));
                        self.prepare_work.wait_for_within(seen + 1, timer).await;
                    }
                    None => {
                        let _ = self.prepare_work.wait_for(seen + 1).await;
                    }
                }
                continue;
            };
            {
                let mut s = self.state.borrow_mut();
                let after = match &s.spare {
                    Spare::Full { failure, .. } => Some(failure.clone()),
                    _ => None,
                };
                s.spare = Spare::Creating { after };
            }
            let created = self.create_segment(base).await;
            let mut s = self.state.borrow_mut();
            match created {
                Ok(seg) => {
                    if matches!(s.spare, Spare::Creating { after: Some(_) }) {
                        tracing::debug!(shard = self.cfg.shard, base, "segment ready");
                    }
                    s.spare = Spare::Ready(seg);
                }
                Err(f) if f.kind == IoKind::NoSpace => {
                    if !matches!(s.spare, Spare::Full { .. }) {
                        tracing::warn!(
                            shard = self.cfg.shard,
                            "cannot create the next segment, the disk is full ({f}); appends that need it get storage_full until space is freed"
                        );
                    }
                    s.spare = Spare::Full {
                        failure: f,
                        retry_at_ms: self.io.now_ms() + FULL_RETRY_MS as i64,
                    };
                }
                Err(f) => {
                    s.spare = Spare::Missing;
                    drop(s);
                    self.fail(f);
                    return;
                }
            }
            drop(s);
            bump(&self.admit_changed);
        }
    }

    /// The size of the next segment: the configured one, or what fits the
    /// free space (two per shard on the disk), at least the minimum.
    async fn next_segment_bytes(&self) -> u64 {
        let configured = self.cfg.segment_bytes;
        let Ok(free) = self.io.free_bytes(&self.cfg.dir).await else {
            return configured;
        };
        let fit = align_down(free / (2 * u64::from(self.cfg.disk_shards.max(1))));
        configured.min(fit.max(self.cfg.segment_bytes_min))
    }

    /// Creates and preallocates a segment file; removes it if that fails.
    async fn create_segment(&self, base: u64) -> Result<Segment<I::File>, IoFailure> {
        let capacity = self.next_segment_bytes().await;
        let path = segment_path(&self.cfg.dir, base);
        let file = self.io.create(&path).await?;
        let made = async {
            file.allocate(capacity).await?;
            self.io.sync_dir(&self.cfg.dir).await
        }
        .await;
        if let Err(e) = made {
            drop(file);
            let _ = self.io.remove(&path).await;
            let _ = self.io.sync_dir(&self.cfg.dir).await;
            return Err(e);
        }
        tracing::debug!(shard = self.cfg.shard, base, capacity, "created segment");
        Ok(Segment {
            info: SegmentInfo {
                base,
                capacity,
                used: SEGMENT_HEADER_BYTES,
                max_append_time_ms: 0,
                key: SegmentKey(self.io.random_key()),
            },
            prev_end: 0,
            file: Rc::new(file),
            header_written: false,
            sealed: false,
        })
    }

    /// The next range to zero, if the active segment needs one now.
    fn zero_range(&self) -> Option<(u64, Rc<I::File>, u64, u64)> {
        let mut s = self.state.borrow_mut();
        if s.closing || s.failure.is_some() {
            return None;
        }
        let (base, end, file) = {
            let active = s.segments.values().next_back()?;
            (active.info.base, active.info.end(), active.file.clone())
        };
        let from = s
            .zeroed_upto
            .max(base + SEGMENT_HEADER_BYTES)
            .max(align_up(s.append_pos));
        let target = end.min(align_up(s.append_pos) + ZERO_AHEAD_BYTES);
        if from >= target {
            return None;
        }
        // Top up only once the lead has shrunk by a whole chunk (or the
        // segment's end is in reach): topping up after every append wrote
        // one page of zeros and one fdatasync per page of log, 500 a second
        // at 10,000 appends of 100 B, each holding a disk that serves one
        // request at a time for ~280 µs (BENCHMARKS.md).
        if target - from < ZERO_CHUNK_BYTES && target < end {
            return None;
        }
        let to = target.min(from + ZERO_CHUNK_BYTES);
        s.zeroing = Some((from, to));
        Some((base, file, from, to))
    }

    async fn zeroer(self: Rc<Self>) {
        // The I/O seam's clock: the simulation replays it exactly.
        let mut window = (self.io.now_ms(), self.append_position());
        loop {
            // Under sustained load the zeros would halve the disk's bandwidth
            // for appends that are large and sequential anyway: pause while
            // the log grows faster than ZERO_RATE_BYTES_PER_S_MAX.
            let elapsed_ms = self.io.now_ms().saturating_sub(window.0);
            if elapsed_ms >= 100 {
                let grown = self.append_position().saturating_sub(window.1);
                window = (self.io.now_ms(), self.append_position());
                if grown as f64 / (elapsed_ms as f64 / 1000.0) > ZERO_RATE_BYTES_PER_S_MAX as f64 {
                    self.io.sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            let seen = self.write_work.get();
            let Some((base, file, from, to)) = self.zero_range() else {
                if self.state.borrow().closing || self.failed().is_some() {
                    return;
                }
                let _ = self.write_work.wait_for(seen + 1).await;
                continue;
            };
            let buf = self.io.buffer((to - from) as usize);
            let written = file.write_at(buf, from - base).await;
            let hold = match &written {
                Ok(_) => Some(self.sync_turn().await),
                Err(_) => None,
            };
            let synced = match &written {
                Ok(_) => Some(file.sync().await),
                Err(_) => None,
            };
            {
                let mut s = self.state.borrow_mut();
                s.zeroing = None;
                if matches!(synced, Some(Ok(()))) {
                    s.zeroed_upto = s.zeroed_upto.max(to);
                }
            }
            bump(&self.zero_done);
            match (written, synced) {
                (_, Some(Err(e))) => {
                    // The zeroer's fdatasync is on the file the batches go
                    // to: its failure may have lost completed batch writes,
                    // and the kernel reports it only once, so a later sync
                    // could pass. Like any failed sync, it stops the log
                    // (before the sync turn passes on).
                    self.fail(e);
                    drop(hold);
                    return;
                }
                (Err(e), _) => {
                    // Only an optimisation failed (a full disk, a bad
                    // sector ahead): appends still work, slower.
                    tracing::warn!(
                        shard = self.cfg.shard,
                        "zeroing ahead of the log stops: {e}"
                    );
                    return;
                }
                _ => {}
            }
        }
    }

    /// Waits until no zero write overlaps `[from, to)`.
    async fn wait_zeroing_clear(&self, from: u64, to: u64) {
        loop {
            let seen = self.zero_done.get();
            match self.state.borrow().zeroing {
                Some((a, b)) if a < to && from < b => {}
                _ => return,
            }
            let _ = self.zero_done.wait_for(seen + 1).await;
        }
    }

    fn take_run(&self) -> Option<(u64, Vec<(u64, Bytes)>)> {
        let mut s = self.state.borrow_mut();
        let first = s.pending.front()?.0;
        let seg_base = *s
            .segments
            .range(..=first)
            .next_back()
            .expect("segment for pending batch")
            .0;
        let seg_end = s.segments[&seg_base].info.end();
        let mut run = Vec::new();
        let mut bytes = 0u64;
        while let Some((pos, b)) = s.pending.front() {
            let len = b.len() as u64;
            if *pos + len > seg_end || (!run.is_empty() && bytes + len > self.cfg.write_bytes_max) {
                break;
            }
            bytes += len;
            run.push(s.pending.pop_front().unwrap());
        }
        Some((seg_base, run))
    }

    /// Whether the pending batches should be written now: someone waits for
    /// them, a full write is queued, or the log is closing. Otherwise they
    /// are only "in memory" (nobody waits) and may wait up to
    /// `unawaited_write_delay` to share a write.
    fn write_due(&self) -> bool {
        let s = self.state.borrow();
        let Some(&(first, _)) = s.pending.front() else {
            return false;
        };
        s.closing
            || self.cfg.unawaited_write_delay.is_zero()
            || s.write_wanted > self.written.get()
            || s.append_pos - first >= self.cfg.write_bytes_max
            || s.pending_bytes * 2 >= self.cfg.pending_bytes_max
    }

    async fn flusher(self: Rc<Self>) {
        loop {
            if !self.write_due() && !self.state.borrow().pending.is_empty() {
                // Each write costs this VM a virtio notification (a VM exit
                // of ~20 µs on the shard's core) plus a completion
                // interrupt. Appends nobody waits on (durability `memory`)
                // wait a little to share one write, and so the exit does
                // not land between a request and its reply.
                let due = async {
                    loop {
                        let seen = self.write_work.get();
                        if self.write_due() {
                            return;
                        }
                        let _ = self.write_work.wait_for(seen + 1).await;
                    }
                };
                let timer = self.io.sleep(self.cfg.unawaited_write_delay);
                futures_lite::future::or(due, timer).await;
            }
            let seen = self.write_work.get();
            let Some((seg_base, run)) = self.take_run() else {
                if self.state.borrow().closing {
                    return;
                }
                let _ = self.write_work.wait_for(seen + 1).await;
                continue;
            };
            match self.write_run(seg_base, run).await {
                Ok(()) => {
                    self.write_space_back();
                    // Someone waits for this write to be durable: the next
                    // write waits for that fdatasync, and takes everything
                    // that arrived meanwhile (module docs).
                    let target = self.state.borrow().sync_wanted.min(self.written.get());
                    if target > self.synced.get() {
                        bump(&self.sync_work);
                        let _ = self.synced.wait_for(target).await;
                    }
                }
                Err(WriteError::NoSpace(f, run, prefix)) => {
                    self.requeue(f, run, prefix);
                    self.io.sleep(Duration::from_millis(FULL_RETRY_MS)).await;
                }
                Err(WriteError::Failed(f)) => {
                    self.fail(f);
                    return;
                }
            }
        }
    }

    /// A write met ENOSPC: its batches go back first in line, appends are
    /// refused until a retry succeeds.
    fn requeue(&self, f: IoFailure, run: Vec<(u64, Bytes)>, tail_page: Option<Vec<u8>>) {
        let mut s = self.state.borrow_mut();
        for b in run.into_iter().rev() {
            s.pending.push_front(b);
        }
        if let Some(t) = tail_page {
            s.tail_page = t;
        }
        if s.write_full.is_none() {
            tracing::warn!(
                shard = self.cfg.shard,
                "a write met a full disk ({f}); appends get storage_full until it succeeds"
            );
        }
        s.write_full = Some(f);
        drop(s);
        bump(&self.admit_changed);
    }

    fn write_space_back(&self) {
        let mut s = self.state.borrow_mut();
        if s.write_full.take().is_some() {
            tracing::info!(
                shard = self.cfg.shard,
                "the disk has space again: writes resumed"
            );
            drop(s);
            bump(&self.admit_changed);
        }
    }

    /// Waits until a write ending at `end` may start: at most
    /// `unsynced_bytes_max` past the synced position.
    async fn wait_unsynced_window(&self, end: u64) -> Result<(), IoFailure> {
        while end > self.synced.get() + self.cfg.unsynced_bytes_max {
            {
                let mut s = self.state.borrow_mut();
                s.sync_wanted = s.sync_wanted.max(self.written.get());
            }
            bump(&self.sync_work);
            if self
                .synced
                .wait_for(end - self.cfg.unsynced_bytes_max)
                .await
                .is_err()
            {
                let f = self.failed();
                return Err(f.unwrap_or_else(|| {
                    IoFailure::new("write", &self.cfg.dir, IoKind::Other, "log closed")
                }));
            }
        }
        Ok(())
    }

    async fn write_run(&self, seg_base: u64, run: Vec<(u64, Bytes)>) -> Result<(), WriteError> {
        let (file, header) = {
            let s = self.state.borrow();
            let seg = &s.segments[&seg_base];
            let header = (!seg.header_written).then(|| {
                SegmentHeader {
                    shard: self.cfg.shard,
                    base: seg.info.base,
                    prev_end: seg.prev_end,
                    key: seg.info.key,
                    created_ms: self.io.now_ms(),
                    unsynced_bytes_max: self.cfg.unsynced_bytes_max,
                }
                .encode_page()
            });
            (seg.file.clone(), header)
        };
        let first = run[0].0;
        let written = self.written.get();
        let mut taken_tail = None;
        let fresh_segment = header.is_some();
        let prefix = match header {
            Some(page) => {
                // The first write into a freshly rolled segment.
                assert_eq!(
                    first,
                    seg_base + SEGMENT_HEADER_BYTES,
                    "a segment's first batch follows its header page"
                );
                assert!(written <= seg_base, "log went backwards");
                page
            }
            None => {
                assert_eq!(first, written, "gap in the log at {written}..{first}");
                let t = std::mem::take(&mut self.state.borrow_mut().tail_page);
                taken_tail = Some(t.clone());
                t
            }
        };
        let start = first - prefix.len() as u64;
        assert_eq!(
            align_down(start),
            start,
            "write does not start on a page boundary"
        );
        let data_len: u64 = run.iter().map(|(_, b)| b.len() as u64).sum();
        let end = first + data_len;
        if let Err(f) = self.wait_unsynced_window(end).await {
            return Err(WriteError::Failed(f));
        }
        self.wait_zeroing_clear(start, align_up(end)).await;
        let size = align_up(end - start) as usize;
        let mut buf = self.io.buffer_to_fill(size);
        {
            let out = buf.bytes_mut();
            let mut at = prefix.len();
            out[..at].copy_from_slice(&prefix);
            for (pos, b) in &run {
                debug_assert_eq!(*pos - start, at as u64);
                out[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
            // The file is a prefix of the log followed by zeros.
            out[at..].fill(0);
        }
        let page = align_down(end);
        let new_tail = buf.bytes()[(page - start) as usize..(end - start) as usize].to_vec();
        let done = WriteDone {
            seg_base,
            file: file.clone(),
            new_tail,
            data_len,
            end,
            size,
        };
        // Someone waits for durability, nobody for this write alone (the
        // kernel dispatches a linked fdatasync on the shard's core as the
        // write completes, before the shard sees it: 20 µs), no other
        // fdatasync of the log's files is in flight, and every byte before
        // this write's segment is durable: the fdatasync goes with the write
        // (linked in the kernel)
        // and covers every byte up to `end`, since every unsynced byte is
        // in this file and written by then (module docs).
        let linked = {
            let s = self.state.borrow();
            !fresh_segment
                && !s.syncing
                && s.written_waited <= self.written.get()
                && self.synced.get() >= seg_base
                && s.sync_wanted > self.synced.get()
        };
        let t0 = Instant::now();
        let pos = start - seg_base;
        if !linked {
            let w = file.write_at(buf, pos).await;
            return match self.finish_write(&w, t0, done) {
                Ok((want_sync, _)) => {
                    if want_sync {
                        bump(&self.sync_work);
                    }
                    Ok(())
                }
                Err((f, true)) => Err(WriteError::NoSpace(f, run, taken_tail)),
                Err((f, false)) => Err(WriteError::Failed(f)),
            };
        }
        let _hold = SyncHold::take(self);
        let mut finished = None;
        let synced = file
            .write_then_sync(buf, pos, |w| {
                // `written` advances now: waiters at `written` do not wait
                // for the fdatasync.
                finished = Some(self.finish_write(w, t0, done));
            })
            .await;
        let wrote_at = match finished.expect("write_then_sync reports the write") {
            Ok((_, at)) => at,
            Err((f, true)) => return Err(WriteError::NoSpace(f, run, taken_tail)),
            Err((f, false)) => return Err(WriteError::Failed(f)),
        };
        // Never retried: after a failed fdatasync the data is not assumed
        // durable, whatever a retry says.
        synced.map_err(WriteError::Failed)?;
        self.sync_done(end, wrote_at).map_err(WriteError::Failed)
    }

    /// After a write completed: checks it, then records it (tail page,
    /// pending bytes, dirty file, `written`). Returns whether a sync is
    /// wanted and when the write was seen complete, or the failure (`true`:
    /// the disk is full).
    fn finish_write(
        &self,
        w: &Result<usize, IoFailure>,
        t0: Instant,
        d: WriteDone<I::File>,
    ) -> Result<(bool, Instant), (IoFailure, bool)> {
        let now = Instant::now();
        let n = match w {
            Ok(n) => *n,
            Err(f) => return Err((f.clone(), f.kind == IoKind::NoSpace)),
        };
        if n != d.size {
            return Err((
                IoFailure::new(
                    "write",
                    d.file.path(),
                    IoKind::Other,
                    format!("short write of {n} of {} bytes", d.size),
                ),
                false,
            ));
        }
        let _ = self
            .write_us
            .borrow_mut()
            .record(now.duration_since(t0).as_micros() as u64);
        let want_sync = {
            let mut s = self.state.borrow_mut();
            s.tail_page = d.new_tail;
            s.pending_bytes -= d.data_len;
            if let Some(seg) = s.segments.get_mut(&d.seg_base) {
                seg.header_written = true;
            }
            if !s.dirty.iter().any(|f| Rc::ptr_eq(f, &d.file)) {
                s.dirty.push(d.file);
            }
            s.sync_wanted > self.synced.get()
        };
        self.written.advance(d.end);
        self.stages.borrow_mut().wrote(d.end, now);
        bump(&self.admit_changed);
        Ok((want_sync, now))
    }

    /// An fdatasync begun after the write seen complete at `since` covered
    /// everything up to `end` and succeeded: `synced` advances, unless the
    /// log failed meanwhile (another fdatasync of these files failed: the
    /// kernel may have reported lost writes to it alone, so this success
    /// proves nothing).
    fn sync_done(&self, end: u64, since: Instant) -> Result<(), IoFailure> {
        if let Some(f) = self.failed() {
            return Err(f);
        }
        let _ = self
            .fsync_us
            .borrow_mut()
            .record(since.elapsed().as_micros() as u64);
        self.synced.advance(end);
        self.stages.borrow_mut().synced(end, Instant::now());
        Ok(())
    }

    /// Waits until no fdatasync of the log's files is in flight and holds
    /// that until the returned guard drops.
    async fn sync_turn(&self) -> SyncHold<'_, I> {
        loop {
            let seen = self.sync_work.get();
            if !self.state.borrow().syncing {
                return SyncHold::take(self);
            }
            let _ = self.sync_work.wait_for(seen + 1).await;
        }
    }

    async fn syncer(self: Rc<Self>) {
        loop {
            let seen = self.sync_work.get();
            let synced = self.synced.get();
            // What is written now is what this fdatasync covers: a write
            // completing while it runs waits for the next one.
            let (wanted, written) = (self.state.borrow().sync_wanted, self.written.get());
            if self.written.is_closed() {
                return;
            }
            if wanted > synced && written > synced && !self.state.borrow().syncing {
                let _hold = SyncHold::take(&self);
                let files = std::mem::take(&mut self.state.borrow_mut().dirty);
                let t0 = Instant::now();
                for f in files {
                    if let Err(e) = f.sync().await {
                        // Never retried: after a failed fdatasync the data
                        // is not assumed durable, whatever a retry says.
                        self.fail(e);
                        return;
                    }
                }
                if self.sync_done(written, t0).is_err() {
                    return;
                }
            } else {
                let _ = self.sync_work.wait_for(seen + 1).await;
            }
        }
    }
}
