//! The shard's commit log: one append-only sequence of batches across
//! fixed-size segment files, written with direct I/O through io_uring.
//!
//! Contract (everything runs on the owning shard's executor):
//! - [`CommitLog::append`] is synchronous: it assigns the batch its log
//!   position and queues it; the batch is then "in memory".
//! - One flusher task writes queued batches in position order, one io_uring
//!   write in flight, rewriting the last partial 4 KiB page each time
//!   (O_DIRECT needs aligned writes). `written` advances when a write
//!   completes. It writes at once when someone waits (`wait_written`,
//!   `wait_synced`), when a full write is queued, or on close; appends
//!   nobody waits on (durability `memory`) wait up to
//!   `unawaited_write_delay` (`storage.memory_write_delay_us`) to share a
//!   write, which keeps the VM exit of a disk submission off the
//!   request-reply path.
//! - One syncer task runs fdatasync when someone waits for durability:
//!   every append that arrived while the previous fdatasync ran is covered
//!   by the next one (group commit). `synced` advances when it returns.
//! - An I/O error fails the log: every waiter and every later append gets
//!   [`LogError::Failed`]; nothing is acknowledged that was not stored.

use bytes::Bytes;
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::segment::{segment_path, SegmentInfo};
use super::{align_down, align_up};
use crate::runtime::{self, DmaFile, Watch};

/// Settings of one shard's log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub dir: PathBuf,
    pub segment_bytes_max: u64,
    pub write_bytes_max: u64,
    /// Longest an append nobody waits on (durability `memory`) waits to
    /// share a write; zero writes at once.
    pub unawaited_write_delay: Duration,
}

/// Why a log operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("storage failed earlier and accepts no writes until restart: {0}")]
    Failed(String),
    #[error("{op} {path}: {message}")]
    Io {
        op: &'static str,
        path: String,
        message: String,
    },
    #[error("the log is closing")]
    Closing,
    #[error("position {0} is not in the log")]
    NotFound(u64),
}

struct Segment {
    info: SegmentInfo,
    file: Option<Rc<DmaFile>>,
}

struct State {
    segments: BTreeMap<u64, Segment>,
    append_pos: u64,
    pending: VecDeque<(u64, Bytes)>,
    /// Bytes of `[align_down(written), written)` as last written.
    tail_page: Vec<u8>,
    dirty: Vec<Rc<DmaFile>>,
    sync_wanted: u64,
    /// Highest position someone waits to see written (or synced).
    write_wanted: u64,
    failure: Option<String>,
    closing: bool,
    /// Positions of the active segment below this are allocated *and
    /// written* (data or zeros), so writes there need no extent conversion
    /// and fdatasync flushes data only.
    zeroed_upto: u64,
    /// A zero write in flight: the flusher must not write into it.
    zeroing: Option<(u64, u64)>,
}

/// How far ahead of the append position the zeroer prepares the segment.
pub const ZERO_AHEAD_BYTES: u64 = 8 << 20;
/// Above this append rate the zeroer pauses.
pub const ZERO_RATE_BYTES_PER_S_MAX: u64 = 64 << 20;
/// Size of one zeroing write.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// One shard's commit log. See the module docs for the contract.
pub struct CommitLog {
    cfg: LogConfig,
    state: RefCell<State>,
    written: Watch,
    synced: Watch,
    /// Event counters that wake the flusher and the syncer.
    write_work: Watch,
    sync_work: Watch,
    /// Bumped whenever a zero write finishes.
    zero_done: Watch,
    fsync_us: RefCell<Histogram<u64>>,
    write_us: RefCell<Histogram<u64>>,
}

fn io_err(op: &'static str, path: &std::path::Path, e: impl std::fmt::Display) -> LogError {
    LogError::Io {
        op,
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

impl CommitLog {
    /// Opens the log over recovered segments (ascending), with the next
    /// append at `end` and `tail_page` the bytes of the last partial page.
    /// Recovery synced every segment, so everything before `end` is durable.
    pub async fn open(
        cfg: LogConfig,
        segments: &[SegmentInfo],
        end: u64,
        tail_page: Vec<u8>,
    ) -> Result<Rc<CommitLog>, LogError> {
        assert_eq!(
            tail_page.len() as u64,
            end - align_down(end),
            "tail page must cover [align_down(end), end)"
        );
        let mut map = BTreeMap::new();
        for s in segments {
            assert_eq!(
                s.capacity % super::DMA_ALIGNMENT_BYTES,
                0,
                "segment capacity unaligned"
            );
            let path = segment_path(&cfg.dir, s.base);
            let file = runtime::open_dma(&path, false)
                .await
                .map_err(|e| io_err("open segment", &path, e))?;
            map.insert(
                s.base,
                Segment {
                    info: *s,
                    file: Some(Rc::new(file)),
                },
            );
        }
        let log = Rc::new(CommitLog {
            cfg,
            state: RefCell::new(State {
                segments: map,
                append_pos: end,
                pending: VecDeque::new(),
                tail_page,
                dirty: Vec::new(),
                sync_wanted: 0,
                write_wanted: 0,
                failure: None,
                closing: false,
                zeroed_upto: align_up(end),
                zeroing: None,
            }),
            written: Watch::new(end),
            synced: Watch::new(end),
            write_work: Watch::new(0),
            sync_work: Watch::new(0),
            zero_done: Watch::new(0),
            fsync_us: RefCell::new(histogram()),
            write_us: RefCell::new(histogram()),
        });
        Ok(log)
    }

    /// Starts the flusher and syncer tasks in task queue `tq`.
    pub fn start(self: &Rc<Self>, tq: runtime::TaskQueueHandle) {
        let me = self.clone();
        runtime::spawn_local_into(async move { me.flusher().await }, tq)
            .expect("task queue exists")
            .detach();
        let me = self.clone();
        runtime::spawn_local_into(async move { me.syncer().await }, tq)
            .expect("task queue exists")
            .detach();
    }

    /// Starts the zeroer in task queue `tq` (a background queue).
    ///
    /// Segments are created with fallocate, which leaves *unwritten*
    /// extents: the first write to each block then converts its extent at
    /// completion and the next fdatasync commits that metadata, which costs
    /// milliseconds per append on ext4. The zeroer writes zeros (and syncs
    /// them) a little ahead of the append position, so appends land on
    /// written blocks and an fdatasync flushes data only.
    pub fn start_zeroer(self: &Rc<Self>, tq: runtime::TaskQueueHandle) {
        let me = self.clone();
        runtime::spawn_local_into(async move { me.zeroer().await }, tq)
            .expect("task queue exists")
            .detach();
    }

    /// The next range to zero, if the active segment needs one now.
    fn zero_range(&self) -> Option<(u64, Rc<DmaFile>, u64, u64)> {
        let mut s = self.state.borrow_mut();
        if s.closing || s.failure.is_some() {
            return None;
        }

        let (base, end, file) = {
            let active = s.segments.values().next_back()?;
            (active.info.base, active.info.end(), active.file.clone()?)
        };
        let from = s.zeroed_upto.max(base).max(align_up(s.append_pos));
        let target = end.min(align_up(s.append_pos) + ZERO_AHEAD_BYTES);
        if from >= target {
            return None;
        }
        let to = target.min(from + ZERO_CHUNK_BYTES);
        s.zeroing = Some((from, to));
        Some((base, file, from, to))
    }

    async fn zeroer(self: Rc<Self>) {
        let mut window = (Instant::now(), self.append_position());
        loop {
            // Under sustained load the zeros would halve the disk's bandwidth
            // for appends that are large and sequential anyway: pause while
            // the log grows faster than ZERO_RATE_BYTES_PER_S_MAX.
            let elapsed = window.0.elapsed();
            if elapsed >= Duration::from_millis(100) {
                let grown = self.append_position().saturating_sub(window.1);
                window = (Instant::now(), self.append_position());
                if grown as f64 / elapsed.as_secs_f64() > ZERO_RATE_BYTES_PER_S_MAX as f64 {
                    runtime::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            let seen = self.write_work.get();
            let Some((base, file, from, to)) = self.zero_range() else {
                if self.state.borrow().closing {
                    return;
                }
                let _ = self.write_work.wait_for(seen + 1).await;
                continue;
            };
            let mut buf = runtime::dma_buffer((to - from) as usize);
            buf.as_bytes_mut().fill(0);
            let res = match file.write_at(buf, from - base).await {
                Ok(_) => file.fdatasync().await,
                Err(e) => Err(e),
            };
            {
                let mut s = self.state.borrow_mut();
                s.zeroing = None;
                if res.is_ok() {
                    s.zeroed_upto = s.zeroed_upto.max(to);
                }
            }
            self.zero_done.advance(self.zero_done.get() + 1);
            if let Err(e) = res {
                // Only an optimisation failed: appends still work (slower).
                tracing::warn!("zeroing ahead of the log failed: {e}");
                return;
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

    /// Assigns a batch of `len` bytes the next log position, lets `stamp`
    /// build the batch for that position, and queues it for writing.
    pub fn append(
        &self,
        len: u64,
        append_time_ms: i64,
        stamp: impl FnOnce(u64) -> Bytes,
    ) -> Result<(u64, Bytes), LogError> {
        let mut s = self.state.borrow_mut();
        if let Some(f) = &s.failure {
            return Err(LogError::Failed(f.clone()));
        }
        if s.closing {
            return Err(LogError::Closing);
        }
        assert!(
            len > 0 && len <= self.cfg.segment_bytes_max,
            "batch of {len} bytes cannot fit a segment"
        );
        let needs_roll = match s.segments.values().next_back() {
            Some(active) => s.append_pos + len > active.info.end(),
            None => true,
        };
        if needs_roll {
            let base = match s.segments.values().next_back() {
                Some(active) => active.info.end(),
                None => align_up(s.append_pos),
            };
            s.segments.insert(
                base,
                Segment {
                    info: SegmentInfo {
                        base,
                        capacity: self.cfg.segment_bytes_max,
                        used: 0,
                        max_append_time_ms: 0,
                    },
                    file: None,
                },
            );
            s.append_pos = base;
            s.zeroed_upto = base;
        }
        let pos = s.append_pos;
        let batch = stamp(pos);
        assert_eq!(batch.len() as u64, len, "stamped batch changed length");
        s.append_pos += len;
        let active = s.segments.values_mut().next_back().expect("active segment");
        active.info.used = pos + len - active.info.base;
        active.info.max_append_time_ms = active.info.max_append_time_ms.max(append_time_ms);
        s.pending.push_back((pos, batch.clone()));
        drop(s);
        self.write_work.advance(self.write_work.get() + 1);
        Ok((pos, batch))
    }

    /// Resolves once every byte before `end` is written (io_uring write done).
    pub async fn wait_written(&self, end: u64) -> Result<(), LogError> {
        if self.written.get() >= end {
            return Ok(());
        }
        self.want_written(end);
        self.written.wait_for(end).await.map_err(|_| self.failure())
    }

    /// Someone waits for `end` to be written: the flusher writes now.
    fn want_written(&self, end: u64) {
        let mut s = self.state.borrow_mut();
        if end > s.write_wanted {
            s.write_wanted = end;
            drop(s);
            self.write_work.advance(self.write_work.get() + 1);
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
        self.sync_work.advance(self.sync_work.get() + 1);
        self.synced.wait_for(end).await.map_err(|_| self.failure())
    }

    fn failure(&self) -> LogError {
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
    /// The failure that stopped the log, if any.
    pub fn failed(&self) -> Option<String> {
        self.state.borrow().failure.clone()
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

    /// Latency histograms (µs) of writes and fdatasyncs.
    pub fn latency_histograms(&self) -> (Histogram<u64>, Histogram<u64>) {
        (
            self.write_us.borrow().clone(),
            self.fsync_us.borrow().clone(),
        )
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
            if position + len as u64 > seg.info.end() {
                return Err(LogError::NotFound(position));
            }
            (seg.file.clone().ok_or(LogError::NotFound(position))?, *base)
        };
        let rr = file
            .read_at(position - base, len)
            .await
            .map_err(|e| io_err("read", &segment_path(&self.cfg.dir, base), e))?;
        if rr.len() < len {
            return Err(LogError::NotFound(position));
        }
        Ok(Bytes::copy_from_slice(&rr[..len]))
    }

    /// Removes whole segments (retention). Never the active one.
    pub async fn delete_segments(&self, bases: &[u64]) -> Result<(), LogError> {
        for &base in bases {
            let seg = {
                let mut s = self.state.borrow_mut();
                let last = *s.segments.keys().next_back().expect("log has segments");
                assert_ne!(base, last, "retention must not delete the active segment");
                let seg = s.segments.remove(&base);
                // Drop every handle on the file (a written-level log never
                // syncs, so `dirty` would otherwise keep it open and the
                // unlinked file's space would never be freed).
                if let Some(file) = seg.as_ref().and_then(|g| g.file.as_ref()) {
                    s.dirty.retain(|f| !Rc::ptr_eq(f, file));
                }
                seg
            };
            if seg.is_some() {
                let path = segment_path(&self.cfg.dir, base);
                let p = path.clone();
                runtime::blocking(move || std::fs::remove_file(p))
                    .await
                    .map_err(|e| io_err("remove segment", &path, e))?;
            }
        }
        Ok(())
    }

    /// Stops accepting appends, writes and syncs everything appended so far.
    pub async fn close(&self) -> Result<(), LogError> {
        let end = {
            let mut s = self.state.borrow_mut();
            s.closing = true;
            s.append_pos
        };
        self.write_work.advance(self.write_work.get() + 1);
        self.wait_written(end).await?;
        self.wait_synced(end).await
    }

    fn fail(&self, e: LogError) {
        tracing::error!("commit log failed: {e}");
        self.state.borrow_mut().failure = Some(e.to_string());
        self.written.close();
        self.synced.close();
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
                let timer = async {
                    runtime::sleep(self.cfg.unawaited_write_delay).await;
                };
                futures_lite::future::or(due, timer).await;
            }
            let seen = self.write_work.get();
            match self.take_run() {
                Some((seg_base, run)) => {
                    if let Err(e) = self.write_run(seg_base, run).await {
                        self.fail(e);
                        return;
                    }
                }
                None if self.state.borrow().closing => return,
                None => {
                    let _ = self.write_work.wait_for(seen + 1).await;
                }
            }
        }
    }

    async fn segment_file(&self, base: u64) -> Result<Rc<DmaFile>, LogError> {
        let capacity = {
            let s = self.state.borrow();
            let seg = &s.segments[&base];
            if let Some(f) = &seg.file {
                return Ok(f.clone());
            }
            seg.info.capacity
        };
        let path = segment_path(&self.cfg.dir, base);
        let file = runtime::open_dma(&path, true)
            .await
            .map_err(|e| io_err("create segment", &path, e))?;
        file.pre_allocate(capacity, false)
            .await
            .map_err(|e| io_err("preallocate segment (is the disk full?)", &path, e))?;
        runtime::sync_dir(&self.cfg.dir)
            .await
            .map_err(|e| io_err("sync directory", &self.cfg.dir, e))?;
        let file = Rc::new(file);
        self.state
            .borrow_mut()
            .segments
            .get_mut(&base)
            .expect("segment")
            .file = Some(file.clone());
        tracing::debug!(base, capacity, "created segment");
        Ok(file)
    }

    async fn write_run(&self, seg_base: u64, run: Vec<(u64, Bytes)>) -> Result<(), LogError> {
        let file = self.segment_file(seg_base).await?;
        let first = run[0].0;
        let written = self.written.get();
        let prefix = if first == written {
            std::mem::take(&mut self.state.borrow_mut().tail_page)
        } else {
            // The first write into a freshly rolled segment.
            assert_eq!(first, seg_base, "gap in the log at {written}..{first}");
            assert!(written <= seg_base, "log went backwards");
            Vec::new()
        };
        let start = align_down(first);
        assert_eq!(
            prefix.len() as u64,
            first - start,
            "tail page does not match the write position"
        );
        let data_len: u64 = run.iter().map(|(_, b)| b.len() as u64).sum();
        let end = first + data_len;
        self.wait_zeroing_clear(start, align_up(end)).await;
        let size = align_up(end - start) as usize;
        let mut buf = runtime::dma_buffer(size);
        {
            let out = buf.as_bytes_mut();
            let mut at = prefix.len();
            out[..at].copy_from_slice(&prefix);
            for (pos, b) in &run {
                debug_assert_eq!(*pos - start, at as u64);
                out[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
            out[at..].fill(0);
        }
        let page = align_down(end);
        let new_tail = buf.as_bytes()[(page - start) as usize..(end - start) as usize].to_vec();
        let t0 = Instant::now();
        let n = file
            .write_at(buf, start - seg_base)
            .await
            .map_err(|e| io_err("write", &segment_path(&self.cfg.dir, seg_base), e))?;
        if n != size {
            return Err(io_err(
                "write",
                &segment_path(&self.cfg.dir, seg_base),
                format!("short write of {n} of {size} bytes"),
            ));
        }
        let _ = self
            .write_us
            .borrow_mut()
            .record(t0.elapsed().as_micros() as u64);
        let want_sync = {
            let mut s = self.state.borrow_mut();
            s.tail_page = new_tail;
            if !s.dirty.iter().any(|f| Rc::ptr_eq(f, &file)) {
                s.dirty.push(file);
            }
            s.sync_wanted > self.synced.get()
        };
        self.written.advance(end);
        if want_sync {
            self.sync_work.advance(self.sync_work.get() + 1);
        }
        Ok(())
    }

    async fn syncer(self: Rc<Self>) {
        loop {
            let seen = self.sync_work.get();
            let synced = self.synced.get();
            let (wanted, written) = (self.state.borrow().sync_wanted, self.written.get());
            if self.written.is_closed() {
                return;
            }
            if wanted > synced && written > synced {
                let files = std::mem::take(&mut self.state.borrow_mut().dirty);
                let t0 = Instant::now();
                for f in files {
                    if let Err(e) = f.fdatasync().await {
                        let path = f.path().map(|p| p.to_path_buf()).unwrap_or_default();
                        self.fail(io_err("fdatasync", &path, e));
                        return;
                    }
                }
                let _ = self
                    .fsync_us
                    .borrow_mut()
                    .record(t0.elapsed().as_micros() as u64);
                self.synced.advance(written);
            } else {
                let _ = self.sync_work.wait_for(seen + 1).await;
            }
        }
    }
}
