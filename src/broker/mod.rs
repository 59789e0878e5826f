//! The broker process: checks that the machine can run it, locks the data
//! directory, starts one pinned executor per shard, and stops them cleanly
//! on SIGTERM or Ctrl-C (in-flight writes finish and are synced).

pub mod connection;
pub mod handlers;
pub mod placement;
pub mod push;
pub mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::runtime::{memlock_limit_bytes, ExecutorSpec};
use crate::shard::mesh::build_mesh;
use crate::shard::metadata::Metadata;
use crate::shard::ShardSpec;

/// Why the broker cannot start; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("data directory {path} is not usable: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("data directory {path} is in use by another keelmq process ({holder}); stop it or choose another --data-dir")]
    Locked { path: PathBuf, holder: String },
    #[error("{0}")]
    Metadata(String),
    #[error("RLIMIT_MEMLOCK is {limit} bytes but {shards} shards need {needed} bytes of io memory; raise it (`ulimit -l {hint_kib}`, or memlock in /etc/security/limits.conf) or set runtime.io_memory_bytes lower")]
    MemLock {
        limit: u64,
        shards: u16,
        needed: u64,
        hint_kib: u64,
    },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("{0}")]
    Shard(String),
}

/// The smallest io memory glommio accepts per executor.
const IO_MEMORY_BYTES_MIN: u64 = 512 * 1024;
/// The largest io memory the automatic sizing picks per executor.
const IO_MEMORY_BYTES_AUTO_MAX: u64 = 64 << 20;
/// Memlock headroom kept for io_uring rings and other locked memory.
const MEMLOCK_RESERVE_BYTES: u64 = 1 << 20;

/// Per-shard io memory that fits RLIMIT_MEMLOCK.
pub fn io_memory_per_shard(config: &Config, shards: u16) -> Result<u64, StartError> {
    let limit = memlock_limit_bytes();
    let n = u64::from(shards);
    let wanted = config.runtime.io_memory_bytes;
    match (limit, wanted) {
        (None, 0) => Ok(IO_MEMORY_BYTES_AUTO_MAX),
        (None, w) => Ok(w),
        (Some(limit), 0) => {
            let per = limit.saturating_sub(MEMLOCK_RESERVE_BYTES) / n / 4096 * 4096;
            let per = per.min(IO_MEMORY_BYTES_AUTO_MAX);
            if per < IO_MEMORY_BYTES_MIN {
                let needed = IO_MEMORY_BYTES_MIN * n + MEMLOCK_RESERVE_BYTES;
                return Err(StartError::MemLock {
                    limit,
                    shards,
                    needed,
                    hint_kib: needed.div_ceil(1024),
                });
            }
            Ok(per)
        }
        (Some(limit), w) => {
            let needed = w.max(IO_MEMORY_BYTES_MIN) * n + MEMLOCK_RESERVE_BYTES;
            if needed > limit {
                return Err(StartError::MemLock {
                    limit,
                    shards,
                    needed,
                    hint_kib: needed.div_ceil(1024),
                });
            }
            Ok(w.max(IO_MEMORY_BYTES_MIN))
        }
    }
}

/// Holds the data directory's lock for the life of the process.
pub struct DataDirLock(#[allow(dead_code)] std::fs::File);

/// Creates, checks and locks the data directory.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, StartError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::io::AsRawFd;
    let bad = |reason: String| StartError::DataDir {
        path: dir.to_owned(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create it: {e}")))?;
    // access(2), not a probe file: a full disk must not stop a restart.
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| bad("the path holds a NUL byte".into()))?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(bad(format!("not writable: {e}")));
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("LOCK"))
        .map_err(|e| bad(format!("cannot open LOCK: {e}")))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        let holder = match holder.trim() {
            "" => "unknown pid".to_owned(),
            pid => format!("pid {pid}"),
        };
        return Err(StartError::Locked {
            path: dir.to_owned(),
            holder,
        });
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(DataDirLock(f))
}

/// Resolves the listen address (port 0 picks a free port) and refuses one
/// where a server already answers: the shards bind with SO_REUSEPORT, which
/// would otherwise silently share the port with another broker.
fn check_listen(addr: SocketAddr) -> Result<SocketAddr, StartError> {
    let taken = |reason: String| StartError::Listen { addr, reason };
    if addr.port() == 0 {
        let l = std::net::TcpListener::bind(addr).map_err(|e| taken(e.to_string()))?;
        return l.local_addr().map_err(|e| taken(e.to_string()));
    }
    let mut probe = addr;
    if probe.ip().is_unspecified() {
        probe.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    // A broker killed a moment ago can leave its listener open for a while
    // (io_uring releases the files of a dead process asynchronously), so a
    // listener must persist for a few seconds to count as taken.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(300)).is_ok() {
        if std::time::Instant::now() >= deadline {
            return Err(taken(
                "a server already listens there (is another broker running? choose --listen)"
                    .into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(addr)
}

/// Warns when `storage.segment_bytes_max` does not fit the space the data
/// dir's filesystem has free: each shard creates its next segment at the
/// size that fits then (so two fit per shard: the active one and the one
/// prepared ahead), never below the smallest segment a batch fits, and
/// back at the configured size once space is free. Never refuses to
/// start: a restart on a full disk recovers and serves reads, and appends
/// get `storage_full` until space is freed.
fn fit_segments_to_disk(config: &Config, shards: u16) {
    let Ok(free) = crate::runtime::free_bytes(&config.broker.data_dir) else {
        return;
    };
    let configured = config.storage.segment_bytes_max;
    let fit = crate::storage::align_down(free / (2 * u64::from(shards)));
    if fit >= configured {
        return;
    }
    let min = config.segment_bytes_min();
    let size = fit.max(min);
    tracing::warn!(
        "storage.segment_bytes_max {configured} does not fit the {free} bytes free on {} for {shards} shards: new segments shrink to fit (now {size} bytes){}",
        config.broker.data_dir.display(),
        if fit < min {
            " (the smallest a batch fits; appends get storage_full until space is freed)"
        } else {
            ""
        }
    );
}

/// Raises the soft RLIMIT_NOFILE to the hard one (connections are files),
/// and warns when even that cannot hold `connections_max` on every shard.
fn raise_open_files_limit(config: &Config, shards: u16) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return;
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    let wanted = u64::from(config.limits.connections_max) * u64::from(shards);
    if r.rlim_cur != libc::RLIM_INFINITY && r.rlim_cur < wanted {
        tracing::warn!(
            "RLIMIT_NOFILE is {} but {shards} shards x limits.connections_max {} = {wanted}: connections past it are refused (raise `ulimit -n`)",
            r.rlim_cur,
            config.limits.connections_max
        );
    }
}

fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a set we own; threads spawned after
    // this inherit the mask, so only the waiting thread sees the signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Runs the broker until SIGTERM / Ctrl-C. Returns after a clean stop.
pub fn run(mut config: Config) -> Result<(), StartError> {
    config.validate()?;
    let _lock = lock_data_dir(&config.broker.data_dir)?;
    // Resolved once, here: every later path (segments, checkpoints, the
    // directory syncs io_uring does) is absolute, whatever the working
    // directory or the form of --data-dir.
    config.broker.data_dir =
        std::fs::canonicalize(&config.broker.data_dir).map_err(|e| StartError::DataDir {
            path: config.broker.data_dir.clone(),
            reason: format!("cannot resolve it: {e}"),
        })?;
    let data_dir = config.broker.data_dir.clone();
    let placement = placement::shard_cores(&config);
    if let Some(d) = &placement.disk_irq {
        tracing::info!(
            "shards on cores {:?}: the data disk's completion interrupts ({}) land on {:?}",
            placement.cores.iter().flatten().collect::<Vec<_>>(),
            d.device,
            d.cores.iter().map(|&(c, _)| c).collect::<Vec<_>>()
        );
    }
    let cores = placement.cores;
    let shard_count = cores.len() as u16;
    let metadata = match Metadata::load(&data_dir).map_err(StartError::Metadata)? {
        Some(m) if m.shard_count != shard_count => {
            return Err(StartError::Metadata(format!(
                "data directory {} was created with {} shards; start with --shards {} (queues are bound to their shard's log)",
                data_dir.display(),
                m.shard_count,
                m.shard_count
            )))
        }
        Some(m) => m,
        None => {
            let m = Metadata::new(shard_count);
            m.store(&data_dir).map_err(|e| StartError::DataDir {
                path: data_dir.clone(),
                reason: format!("cannot write metadata: {e}"),
            })?;
            m
        }
    };
    fit_segments_to_disk(&config, shard_count);
    let io_memory = io_memory_per_shard(&config, shard_count)?;
    raise_open_files_limit(&config, shard_count);
    let listen = check_listen(config.broker.listen)?;
    let sigset = block_stop_signals();
    let shutdown = Arc::new(AtomicBool::new(false));
    let config = Arc::new(config);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    for (i, (cpu, mesh)) in cores.iter().zip(build_mesh(cores.len())).enumerate() {
        let spec = ShardSpec {
            id: i as u16,
            shard_count,
            config: config.clone(),
            listen,
            metadata: metadata.clone(),
            mesh,
            ready: ready_tx.clone(),
            shutdown: shutdown.clone(),
        };
        let exec = ExecutorSpec {
            name: format!("keelmq-shard-{i}"),
            cpu: *cpu,
            spin_before_park: Duration::from_micros(config.runtime.spin_before_park_us),
            preempt_timer: Duration::from_micros(config.runtime.preempt_timer_us),
            io_memory_bytes: io_memory as usize,
            ring_depth: config.runtime.ring_depth as usize,
        };
        let h = exec
            .spawn(move |tq| serve::run(spec, tq))
            .map_err(|e| StartError::Shard(format!("cannot start shard thread: {e}")))?;
        handles.push(h);
    }
    drop(ready_tx);
    for _ in 0..shard_count {
        match ready_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(StartError::Shard(e)),
            Err(_) => return Err(StartError::Shard("a shard stopped during startup".into())),
        }
    }
    tracing::info!(
        "keelmq {} serving on {listen} with {shard_count} shards (io memory {} KiB each), data in {}",
        env!("CARGO_PKG_VERSION"),
        io_memory / 1024,
        data_dir.display()
    );
    let stop = shutdown.clone();
    std::thread::Builder::new()
        .name("keelmq-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait on the set blocked above.
            unsafe { libc::sigwait(&sigset, &mut sig) };
            tracing::info!("signal {sig} received: stopping");
            stop.store(true, Ordering::Relaxed);
        })
        .map_err(|e| StartError::Shard(format!("cannot start signal thread: {e}")))?;
    let mut failure = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a shard panicked".to_owned()),
        }
        shutdown.store(true, Ordering::Relaxed);
    }
    match failure {
        Some(e) => Err(StartError::Shard(e)),
        None => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
    }
}
