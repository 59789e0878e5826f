//! Integration tests: each starts the real `keelmq` binary on a free port in
//! a temp dir and drives it with the Rust client, the CLI, or raw sockets.

mod bad_input;
mod config;
mod disk_full;
mod durability;
mod filters;
mod forged;
mod groups;
mod limits;
mod net_fuzz;
mod priority;
mod produce;
mod readme;
mod retention;
mod schedule;
mod seek;
mod tidy;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keelmq::client::Admin;

/// Path of the broker binary cargo built for these tests
/// (`KEELMQ_TEST_BIN` runs them against another build, such as an older
/// one, to see a test fail on the behaviour it guards against).
pub fn keelmq_bin() -> String {
    std::env::var("KEELMQ_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_keelmq").to_owned())
}

/// A port nobody listens on right now, below the kernel's ephemeral range
/// (so no client connection of another test can be holding it).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() as u16).wrapping_mul(7919) % 10_000;
    loop {
        let port = 20_000 + (seed + NEXT.fetch_add(1, Ordering::Relaxed) * 13) % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` until it returns `Some` or `limit` passes.
pub fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running broker in its own temp dir.
pub struct Broker {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub shards: u16,
    pub config: Option<PathBuf>,
    /// Where the data lives (default: `dir/data`).
    data: Option<PathBuf>,
    child: Option<Child>,
    starts: u32,
}

impl Broker {
    /// Starts a broker with `shards` shards and an optional TOML config.
    pub fn start(shards: u16, config_toml: Option<&str>) -> Broker {
        Broker::start_with_data(shards, config_toml, None)
    }

    /// Starts a broker whose data directory is `data` (else in its temp dir).
    pub fn start_with_data(
        shards: u16,
        config_toml: Option<&str>,
        data: Option<PathBuf>,
    ) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let config = config_toml.map(|text| {
            let p = dir.path().join("test.toml");
            std::fs::write(&p, text).unwrap();
            p
        });
        let mut b = Broker {
            addr: format!("127.0.0.1:{}", free_port()),
            dir,
            shards,
            config,
            data,
            child: None,
            starts: 0,
        };
        b.launch();
        b
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// The broker's resident memory in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("broker running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("broker-{}.log", self.starts))
    }

    /// The broker's log of the current run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn launch(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut cmd = Command::new(keelmq_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(&self.addr)
            .arg("--shards")
            .arg(self.shards.to_string());
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("KEELMQ_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("broker exited at startup with {status}: {}", self.log());
            }
            match Admin::connect(&self.addr) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "broker on {} not ready: {e}\nlog: {}",
                        self.addr,
                        self.log()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// A fresh admin connection.
    pub fn admin(&self) -> Admin {
        Admin::connect(&self.addr).unwrap()
    }

    /// `kill -9` the broker and reap it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("broker running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM the broker and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("broker running");
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not stop on SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the broker again on the same data dir and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the broker first");
        self.launch();
    }

    /// Runs the CLI against this broker.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with_stdin(&self.addr, args, None)
    }

    /// Runs the CLI with `stdin` piped in.
    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> Output {
        cli_with_stdin(&self.addr, args, Some(stdin))
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cli_with_stdin(addr: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(keelmq_bin());
    cmd.args(args).arg("--broker").arg(addr);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        let input = input.to_owned();
        std::thread::spawn(move || {
            let _ = s.write_all(input.as_bytes());
        });
    }
    child.wait_with_output().unwrap()
}

/// Asserts a CLI run succeeded and returns its stdout.
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The `acked N` count a `keelmq produce` run printed.
pub fn acked(out: &Output) -> u64 {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find_map(|l| l.strip_prefix("acked "))
        .unwrap_or_else(|| panic!("no 'acked N' line in: {err}"))
        .trim()
        .parse()
        .unwrap()
}

/// Segment files of one shard.
pub fn segment_files(data_dir: &Path, shard: u16) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data_dir.join(format!("shard-{shard}")))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}
