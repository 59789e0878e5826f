//! The broker's implementation of the I/O seam: glommio `DmaFile`s
//! (O_DIRECT through io_uring) for every file of the log, glommio timers
//! and task queues, std::fs for directory calls on glommio's blocking pool
//! (io_uring does not cover them). Every glommio name comes through
//! `crate::runtime`.

use bytes::Bytes;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::io::{Io, IoBuffer, IoFailure, IoFile, IoResult, TaskClass};
use crate::runtime::{self, DmaBuffer, DmaFile, OpenOptions, TaskQueues};

/// One shard's storage environment on its glommio executor.
#[derive(Clone)]
pub struct UringIo {
    tq: TaskQueues,
}

impl UringIo {
    /// The environment whose tasks run in `tq`. Must be used on the
    /// executor that owns `tq`.
    pub fn new(tq: TaskQueues) -> UringIo {
        UringIo { tq }
    }
}

/// A file opened for direct I/O.
pub struct UringFile {
    file: DmaFile,
    path: PathBuf,
}

impl IoBuffer for DmaBuffer {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_bytes_mut()
    }
    fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

fn failure<T>(op: &'static str, path: &Path, e: runtime::GlommioError<T>) -> IoFailure {
    IoFailure::from_errno(op, path, e.raw_os_error(), e.to_string())
}

impl IoFile for UringFile {
    type Buffer = DmaBuffer;

    async fn write_at(&self, buf: DmaBuffer, pos: u64) -> IoResult<usize> {
        self.file
            .write_at(buf, pos)
            .await
            .map_err(|e| failure("write", &self.path, e))
    }

    async fn read_at(&self, pos: u64, len: usize) -> IoResult<Bytes> {
        let rr = self
            .file
            .read_at(pos, len)
            .await
            .map_err(|e| failure("read", &self.path, e))?;
        Ok(Bytes::copy_from_slice(&rr[..]))
    }

    async fn sync(&self) -> IoResult<()> {
        self.file
            .fdatasync()
            .await
            .map_err(|e| failure("fdatasync", &self.path, e))
    }

    async fn write_then_sync(
        &self,
        buf: DmaBuffer,
        pos: u64,
        written: impl FnOnce(&IoResult<usize>),
    ) -> IoResult<()> {
        // Linked in the kernel (vendor/glommio/PATCHES.md): the fdatasync
        // starts as the write completes, without a turn of the executor.
        self.file
            .write_at_then_sync(buf, pos, |w| {
                written(&w.as_ref().map(|n| *n).map_err(|e| {
                    IoFailure::from_errno("write", &self.path, e.raw_os_error(), e.to_string())
                }))
            })
            .await
            .map_err(|e| failure("fdatasync", &self.path, e))
    }

    async fn allocate(&self, len: u64) -> IoResult<()> {
        self.file
            .pre_allocate(len, false)
            .await
            .map_err(|e| failure("preallocate", &self.path, e))
    }

    async fn size(&self) -> IoResult<u64> {
        self.file
            .file_size()
            .await
            .map_err(|e| failure("stat", &self.path, e))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

async fn blocking_io<T: Send + 'static>(
    op: &'static str,
    path: &Path,
    f: impl FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
) -> IoResult<T> {
    let p = path.to_owned();
    runtime::blocking(move || f(&p))
        .await
        .map_err(|e| IoFailure::from_io(op, path, &e))
}

impl Io for UringIo {
    type Buffer = DmaBuffer;
    type File = UringFile;

    fn buffer(&self, len: usize) -> DmaBuffer {
        let mut b = runtime::dma_buffer(len);
        b.as_bytes_mut().fill(0);
        b
    }

    fn buffer_to_fill(&self, len: usize) -> DmaBuffer {
        runtime::dma_buffer(len)
    }

    async fn create(&self, path: &Path) -> IoResult<UringFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(path)
            .await
            .map_err(|e| failure("create", path, e))?;
        Ok(UringFile {
            file,
            path: path.to_owned(),
        })
    }

    async fn open(&self, path: &Path) -> IoResult<UringFile> {
        let file = runtime::open_dma(path, false)
            .await
            .map_err(|e| IoFailure::from_io("open", path, &e))?;
        Ok(UringFile {
            file,
            path: path.to_owned(),
        })
    }

    async fn remove(&self, path: &Path) -> IoResult<()> {
        blocking_io("remove", path, |p| std::fs::remove_file(p)).await
    }

    async fn rename(&self, from: &Path, to: &Path) -> IoResult<()> {
        let to = to.to_owned();
        blocking_io("rename", from, move |p| std::fs::rename(p, to)).await
    }

    async fn sync_dir(&self, dir: &Path) -> IoResult<()> {
        runtime::sync_dir(dir)
            .await
            .map_err(|e| IoFailure::from_io("sync directory", dir, &e))
    }

    async fn create_dir_all(&self, dir: &Path) -> IoResult<()> {
        blocking_io("create directory", dir, |p| std::fs::create_dir_all(p)).await
    }

    async fn list_dir(&self, dir: &Path) -> IoResult<Vec<String>> {
        blocking_io("list directory", dir, |p| {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(p)? {
                if let Some(n) = entry?.file_name().to_str() {
                    names.push(n.to_owned());
                }
            }
            Ok(names)
        })
        .await
    }

    async fn free_bytes(&self, dir: &Path) -> IoResult<u64> {
        blocking_io("statvfs", dir, runtime::free_bytes).await
    }

    fn now_ms(&self) -> i64 {
        runtime::now_ms()
    }

    #[allow(clippy::manual_async_fn)] // the timer must not borrow `self`
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + 'static {
        async move {
            runtime::sleep(d).await;
        }
    }

    fn spawn(&self, class: TaskClass, f: impl Future<Output = ()> + 'static) {
        let tq = match class {
            TaskClass::Data => self.tq.data,
            TaskClass::Background => self.tq.background,
        };
        runtime::spawn_local_into(f, tq)
            .expect("task queue exists")
            .detach();
    }

    fn random_key(&self) -> [u8; 16] {
        runtime::random_bytes()
    }

    fn boot_id(&self) -> [u8; 16] {
        runtime::boot_id()
    }
}
