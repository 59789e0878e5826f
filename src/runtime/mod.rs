//! The one place that touches glommio: executors, DMA files, TCP, timers,
//! cross-core channels. A later move to another io_uring runtime changes
//! this module and nothing else.

pub mod executor;
pub mod oneshot;
pub mod split;
pub mod watch;

pub use executor::{memlock_limit_bytes, ExecutorSpec, TaskQueues};
pub use glommio::channels::channel_mesh::{Full as MeshFull, MeshBuilder, Receivers, Senders};
pub use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
pub use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
pub use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
pub use glommio::net::{TcpListener, TcpStream};
pub use glommio::sync::{Semaphore, StaticPermit};
pub use glommio::timer::{sleep, Timer};
pub use glommio::GlommioError;
pub use glommio::TaskQueueHandle;
pub use glommio::{spawn_local, spawn_local_into, Task};
pub use oneshot::{oneshot, OneshotReceiver, OneshotSender};
pub use split::{split, ReadHalf, WriteHalf};
pub use watch::{Watch, WatchClosed};

/// Runs `f` on the executor's blocking thread pool so it cannot stall the
/// executor (std::fs calls for small metadata files, recovery scans).
pub async fn blocking<F, R>(f: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    glommio::executor().spawn_blocking(f).await
}

/// Syncs a directory so a file created or renamed in it survives a crash.
///
/// glommio opens directories with `openat(-1, path)`, which fails with
/// EBADF for a relative path (it is not `AT_FDCWD`), so the path is made
/// absolute first.
pub async fn sync_dir(path: &std::path::Path) -> std::io::Result<()> {
    let path = std::path::absolute(path)?;
    let dir = glommio::io::Directory::open(&path)
        .await
        .map_err(std::io::Error::from)?;
    dir.sync().await.map_err(std::io::Error::from)?;
    dir.close().await.map_err(std::io::Error::from)
}

/// Opens (creating if asked) a file for direct I/O.
pub async fn open_dma(path: &std::path::Path, create: bool) -> std::io::Result<DmaFile> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .dma_open(path)
        .await
        .map_err(std::io::Error::from)
}

/// Reads a non-empty file in `dir` with direct I/O: an existing segment
/// (`*.log`) when there is one, which needs no free space, else a 4 KiB
/// probe file written for the purpose.
///
/// Call once per executor before any other DMA file on that disk: glommio
/// probes whether the device supports polled I/O with a read of the first
/// DMA file it opens, and caches the answer per device and thread. Probed
/// on an empty file that read succeeds trivially, glommio wrongly enables
/// polled reads, and every later read fails with EOPNOTSUPP on devices
/// without poll queues (virtio disks). A real read makes the probe honest,
/// and proves that the directory supports direct I/O at all.
pub async fn probe_direct_io(dir: &std::path::Path) -> std::io::Result<()> {
    let d = dir.to_owned();
    let existing = blocking(move || {
        std::fs::read_dir(&d).ok()?.flatten().find_map(|e| {
            let p = e.path();
            let big = e.metadata().is_ok_and(|m| m.len() >= 4096);
            (p.extension().is_some_and(|x| x == "log") && big).then_some(p)
        })
    })
    .await;
    if let Some(path) = existing {
        let file = open_dma(&path, false).await?;
        let read = file.read_at(0, 4096).await.map_err(std::io::Error::from);
        let _ = file.close().await;
        return match read {
            Ok(r) if r.len() == 4096 => Ok(()),
            Ok(_) => Err(std::io::Error::other("direct I/O read came back short")),
            Err(e) => Err(e),
        };
    }
    let path = dir.join(format!(
        ".dio-probe-{}",
        std::process::id() as u64 * 1000 + glommio::executor().id() as u64
    ));
    let p = path.clone();
    blocking(move || std::fs::write(&p, vec![0x5au8; 4096])).await?;
    tracing::debug!("probe: file written");
    let result = async {
        let file = open_dma(&path, false).await?;
        tracing::debug!("probe: file opened");
        let read = file.read_at(0, 4096).await.map_err(std::io::Error::from);
        let _ = file.close().await;
        match read {
            Ok(r) if r.len() == 4096 && r.iter().all(|&b| b == 0x5a) => Ok(()),
            Ok(_) => Err(std::io::Error::other(
                "direct I/O read back the wrong bytes",
            )),
            Err(e) => Err(e),
        }
    }
    .await;
    let _ = std::fs::remove_file(&path);
    result
}

/// Allocates an aligned buffer from the executor's io memory.
pub fn dma_buffer(size: usize) -> DmaBuffer {
    glommio::allocate_dma_buffer(size)
}

/// Binds a listening socket that every shard can bind at once
/// (SO_REUSEPORT: the kernel spreads connections over the shards) and that
/// rebinds right after a restart (SO_REUSEADDR: TIME_WAIT does not block).
/// Must run on the executor that will accept on it.
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    // SAFETY: the descriptor is a bound, listening TCP socket we own, and
    // ownership moves into the glommio listener.
    Ok(unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) })
}

/// Bytes an unprivileged writer can still allocate on the filesystem of
/// `path` (statvfs `f_bavail * f_frsize`). Blocking: a plain syscall.
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path holds a NUL byte"))?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// 16 bytes from the kernel's CSPRNG (getrandom(2)).
pub fn random_bytes() -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut got = 0;
    while got < out.len() {
        // SAFETY: getrandom writes at most the remaining bytes into `out`.
        let n = unsafe { libc::getrandom(out[got..].as_mut_ptr().cast(), out.len() - got, 0) };
        if n > 0 {
            got += n as usize;
        } else {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::Interrupted,
                "getrandom failed: {e}"
            );
        }
    }
    out
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`, a UUID that
/// changes at every boot), read once; all zeros where the kernel has none.
pub fn boot_id() -> [u8; 16] {
    static ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let hex: Vec<u8> = text
            .bytes()
            .filter(u8::is_ascii_hexdigit)
            .map(|c| (c as char).to_digit(16).unwrap() as u8)
            .collect();
        let mut id = [0u8; 16];
        if hex.len() == 32 {
            for (i, b) in id.iter_mut().enumerate() {
                *b = hex[2 * i] << 4 | hex[2 * i + 1];
            }
        }
        id
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
