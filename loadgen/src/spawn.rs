//! `--spawn`: start `keelmq serve` in a temp dir on a free port, and stop it
//! at the end.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A broker this process started.
pub struct Spawned {
    pub addr: String,
    pub data_dir: tempfile::TempDir,
    child: Child,
}

/// The `keelmq` binary: beside this executable, else on PATH.
pub fn keelmq_binary() -> PathBuf {
    if let Ok(me) = std::env::current_exe() {
        let beside = me.with_file_name("keelmq");
        if beside.exists() {
            return beside;
        }
    }
    PathBuf::from("keelmq")
}

impl Spawned {
    /// Starts a broker with `shards` shards and an optional profile; its
    /// shards pin themselves (see [`Spawned::shard_cores`]).
    pub fn start(
        shards: u16,
        profile: Option<&str>,
        dir_in: Option<&std::path::Path>,
    ) -> Result<Spawned> {
        let data_dir = match dir_in {
            Some(d) => tempfile::tempdir_in(d)?,
            None => tempfile::tempdir()?,
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let bin = keelmq_binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--shards")
            .arg(shards.to_string())
            .arg("--listen")
            .arg(&addr)
            .arg("--data-dir")
            .arg(data_dir.path().join("data"));
        if let Some(p) = profile {
            cmd.arg("--profile").arg(p);
        }
        let log = std::fs::File::create(data_dir.path().join("broker.log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it with `cargo build --release`)",
                    bin.display()
                )
            })?;
        let mut s = Spawned {
            addr,
            data_dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = s.child.try_wait()? {
                let log = std::fs::read_to_string(s.data_dir.path().join("broker.log"))
                    .unwrap_or_default();
                bail!("broker exited with {status}: {log}");
            }
            if keelmq::client::Admin::connect(&s.addr).is_ok() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("broker did not start within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The cores the broker's shards are pinned to, in shard order, read
    /// from their threads' affinity: the broker chooses them (with fewer
    /// shards than cores, the ones taking the data disk's interrupts), so
    /// the loadgen asks rather than assumes. Unpinned shards are left out.
    pub fn shard_cores(&self) -> Vec<usize> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return Vec::new();
        };
        // Shard index to core (glommio's helper threads share a shard's
        // name and core).
        let by_shard: std::collections::BTreeMap<u32, usize> = tasks
            .filter_map(|t| {
                let t = t.ok()?;
                let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
                let shard: u32 = comm.trim().strip_prefix("keelmq-shard-")?.parse().ok()?;
                let tid: libc::pid_t = t.file_name().to_str()?.parse().ok()?;
                // SAFETY: a zeroed cpu_set_t is valid; the kernel fills it.
                let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                let size = std::mem::size_of::<libc::cpu_set_t>();
                // SAFETY: `set` is a live cpu_set_t of `size` bytes.
                if unsafe { libc::sched_getaffinity(tid, size, &mut set) } != 0 {
                    return None;
                }
                // SAFETY: CPU_ISSET reads within the set for c < CPU_SETSIZE.
                let on: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                    .collect();
                (on.len() == 1).then(|| (shard, on[0]))
            })
            .collect();
        by_shard.into_values().collect()
    }

    /// [`Spawned::shard_cores`] once every one of `shards` shards has
    /// pinned itself (a connection may be accepted by the first shard up
    /// before the others are), or what is known after 5 s.
    pub fn wait_shard_cores(&self, shards: u16) -> Vec<usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let cores = self.shard_cores();
            if cores.len() >= usize::from(shards) || Instant::now() > deadline {
                return cores;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Broker memory (resident set), bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
