//! The I/O seam of one shard's storage: everything the commit log, the
//! checkpoint, the index snapshots and recovery do to files, to time and to
//! tasks goes through [`Io`] and [`IoFile`].
//!
//! In the broker the implementation is [`super::uring::UringIo`]: glommio
//! `DmaFile`s (O_DIRECT through io_uring), glommio timers and task queues,
//! std::fs for directory calls on the blocking pool. In tests a seeded
//! simulator (`storage::sim`) implements the same traits over in-memory
//! disks that tear writes at sector granularity, lose unsynced writes at a
//! simulated power cut, misdirect and flip bits in reads, fail any call
//! with EIO or ENOSPC, complete calls out of order, and restart at any
//! instant; it runs the real log code on a deterministic executor.
//!
//! Contract of [`IoFile`]: write positions and lengths are multiples of
//! [`super::DMA_ALIGNMENT_BYTES`]; a write that returned is visible to
//! later reads and survives a process crash; only a `sync` that *started*
//! after the write completed makes it survive a power cut. Reads may be of
//! any position and length (short at the end of the file).

#![allow(async_fn_in_trait)] // single-threaded executors: no Send bounds wanted

use bytes::Bytes;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

/// What kind of failure an I/O call met: the distinction that decides what
/// the log does next (back-pressure, or stop writing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// ENOSPC or EDQUOT: the filesystem is full. Retriable once space is
    /// freed; nothing is lost.
    NoSpace,
    /// EIO: the device failed. After a failed write or fdatasync nothing
    /// past the last good sync is assumed durable (the fsyncgate lesson).
    Device,
    /// ENOENT.
    NotFound,
    /// Any other errno (kept in [`IoFailure::errno`]).
    Other,
}

impl IoKind {
    /// Classifies an errno.
    pub fn from_errno(errno: Option<i32>) -> IoKind {
        match errno {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => IoKind::NoSpace,
            Some(libc::EIO) => IoKind::Device,
            Some(libc::ENOENT) => IoKind::NotFound,
            _ => IoKind::Other,
        }
    }
}

/// A failed I/O call: which operation, on which path, of what kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{op} {path}: {message}")]
pub struct IoFailure {
    pub op: &'static str,
    pub path: String,
    pub kind: IoKind,
    pub errno: Option<i32>,
    pub message: String,
}

impl IoFailure {
    /// From an errno (when the OS gave one) and its message.
    pub fn from_errno(
        op: &'static str,
        path: &Path,
        errno: Option<i32>,
        message: impl Into<String>,
    ) -> IoFailure {
        IoFailure {
            op,
            path: path.display().to_string(),
            kind: IoKind::from_errno(errno),
            errno,
            message: message.into(),
        }
    }

    /// From a std error.
    pub fn from_io(op: &'static str, path: &Path, e: &std::io::Error) -> IoFailure {
        let errno = e.raw_os_error().or(match e.kind() {
            std::io::ErrorKind::StorageFull => Some(libc::ENOSPC),
            std::io::ErrorKind::NotFound => Some(libc::ENOENT),
            _ => None,
        });
        IoFailure::from_errno(op, path, errno, e.to_string())
    }

    /// A failure of `kind` described by `message` (short writes, bad data).
    pub fn new(op: &'static str, path: &Path, kind: IoKind, message: impl Into<String>) -> Self {
        IoFailure {
            op,
            path: path.display().to_string(),
            kind,
            errno: None,
            message: message.into(),
        }
    }

    /// With the operation and path of the caller (keeps kind and errno).
    pub fn at(mut self, op: &'static str, path: &Path) -> IoFailure {
        self.op = op;
        self.path = path.display().to_string();
        self
    }
}

/// Result of an I/O call.
pub type IoResult<T> = Result<T, IoFailure>;

/// Which task queue a storage task runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskClass {
    /// Writes, syncs, segment preparation: latency matters.
    Data,
    /// Zeroing ahead, checkpoints, index snapshots: low shares.
    Background,
}

/// An aligned, writable buffer for [`IoFile::write_at`].
pub trait IoBuffer {
    /// The bytes, for filling.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// The bytes.
    fn bytes(&self) -> &[u8];
}

/// An open file of the log: a segment, the checkpoint, an index snapshot.
pub trait IoFile {
    /// The buffer type writes take.
    type Buffer: IoBuffer;
    /// Writes `buf` at `pos` (both aligned); returns the bytes written.
    async fn write_at(&self, buf: Self::Buffer, pos: u64) -> IoResult<usize>;
    /// Reads up to `len` bytes at `pos` (fewer at the end of the file).
    async fn read_at(&self, pos: u64, len: usize) -> IoResult<Bytes>;
    /// fdatasync: every write completed before the call started survives
    /// a power cut once this returns `Ok`.
    async fn sync(&self) -> IoResult<()>;
    /// [`IoFile::write_at`], then, if the write succeeded, [`IoFile::sync`].
    /// `written` gets the write's result as soon as it is known, before the
    /// sync is awaited; the sync's result is returned (an error when the
    /// write failed). Both have finished when it returns. An
    /// implementation may hand both to the kernel at once (io_uring links
    /// the fdatasync behind the write), never reorder them.
    async fn write_then_sync(
        &self,
        buf: Self::Buffer,
        pos: u64,
        written: impl FnOnce(&IoResult<usize>),
    ) -> IoResult<()> {
        let w = self.write_at(buf, pos).await;
        let ok = w.is_ok();
        written(&w);
        if ok {
            self.sync().await
        } else {
            Err(IoFailure::new(
                "fdatasync",
                self.path(),
                IoKind::Other,
                "not started: the write before it failed",
            ))
        }
    }
    /// Allocates blocks for `0..len` (fallocate), growing the file to `len`.
    async fn allocate(&self, len: u64) -> IoResult<()>;
    /// The file's size.
    async fn size(&self) -> IoResult<u64>;
    /// Path, for messages.
    fn path(&self) -> &Path;
}

/// The environment of one shard's storage: files, directories, time, tasks.
/// Cheap to clone; lives on one executor.
pub trait Io: Clone + 'static {
    /// The buffer type of this environment's files.
    type Buffer: IoBuffer;
    /// An open file.
    type File: IoFile<Buffer = Self::Buffer> + 'static;

    /// An aligned buffer of `len` bytes (a multiple of the alignment), zeroed.
    fn buffer(&self, len: usize) -> Self::Buffer;
    /// An aligned buffer of `len` bytes whose contents are unspecified: for
    /// a caller that writes every byte (the flusher; zeroing first would
    /// double its memory traffic).
    fn buffer_to_fill(&self, len: usize) -> Self::Buffer;
    /// Creates `path` empty (replacing a leftover of that name).
    async fn create(&self, path: &Path) -> IoResult<Self::File>;
    /// Opens an existing `path` for reading and writing.
    async fn open(&self, path: &Path) -> IoResult<Self::File>;
    /// Removes `path`.
    async fn remove(&self, path: &Path) -> IoResult<()>;
    /// Renames `from` over `to` atomically.
    async fn rename(&self, from: &Path, to: &Path) -> IoResult<()>;
    /// Makes creations, renames and removals in `dir` durable.
    async fn sync_dir(&self, dir: &Path) -> IoResult<()>;
    /// Creates `dir` and its parents.
    async fn create_dir_all(&self, dir: &Path) -> IoResult<()>;
    /// The names of the entries of `dir`.
    async fn list_dir(&self, dir: &Path) -> IoResult<Vec<String>>;
    /// Bytes an unprivileged writer can still allocate on `dir`'s filesystem.
    async fn free_bytes(&self, dir: &Path) -> IoResult<u64>;
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Resolves after `d`.
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + 'static;
    /// Runs `f` as a task of `class` on this executor.
    fn spawn(&self, class: TaskClass, f: impl Future<Output = ()> + 'static);
    /// 16 unpredictable bytes (segment keys).
    fn random_key(&self) -> [u8; 16];
    /// The kernel's id of this boot: it changes when the machine restarts,
    /// so a power cut since a checkpoint can be told from a process crash.
    fn boot_id(&self) -> [u8; 16];
}
