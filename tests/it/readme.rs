//! The README works as written: `keelmq serve` with no flags at all, in a
//! fresh working directory (so the default, relative `./keelmq-data` and
//! the default address), then every line of the README's quick start, run
//! by a shell exactly as a newcomer pastes them.

use crate::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The lines of the first ```sh block after `## Quick start`, comments cut.
fn quick_start_lines() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Quick start")
        .nth(1)
        .expect("README has a Quick start section");
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("Quick start has a sh block");
    block
        .lines()
        .map(|l| match l.find(" #") {
            Some(i) => l[..i].trim().to_owned(),
            None => l.trim().to_owned(),
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// Runs one README line with `keelmq` on the PATH, in `cwd`.
fn sh(cwd: &std::path::Path, line: &str) -> std::process::Output {
    let bin = keelmq_bin();
    let bin_dir = std::path::Path::new(&bin).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {line}"))
        .current_dir(cwd)
        .env("PATH", path)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn readme_quick_start_runs_as_written_with_no_flags() {
    let lines = quick_start_lines();
    assert_eq!(lines.len(), 5, "the quick start changed: {lines:?}");
    let cwd = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(cwd.path().join("serve.log")).unwrap();
    // `keelmq serve`, no flags: default data dir ./keelmq-data (relative),
    // default address 127.0.0.1:7400.
    let mut serve = Command::new(keelmq_bin())
        .arg("serve")
        .current_dir(cwd.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let serve_log = || std::fs::read_to_string(cwd.path().join("serve.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while keelmq::client::Admin::connect("127.0.0.1:7400").is_err() {
        if let Some(status) = serve.try_wait().unwrap() {
            panic!("keelmq serve exited with {status}: {}", serve_log());
        }
        assert!(Instant::now() < deadline, "not serving: {}", serve_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let outputs: Vec<_> = lines.iter().map(|l| (l, sh(cwd.path(), l))).collect();
    let _ = serve.kill();
    let _ = serve.wait();
    for (line, out) in &outputs {
        assert!(
            out.status.success(),
            "`{line}` failed: {}\nstdout: {}\nstderr: {}\nbroker: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            serve_log()
        );
    }
    let stdout = |i: usize| String::from_utf8_lossy(&outputs[i].1.stdout).into_owned();
    let stderr = |i: usize| String::from_utf8_lossy(&outputs[i].1.stderr).into_owned();
    assert!(
        stdout(0).contains("created topic orders with 8 queues, durability fsync"),
        "{}",
        stdout(0)
    );
    assert!(
        stderr(1).lines().any(|l| l == "acked 10000"),
        "the README promises 'acked 10000': {}",
        stderr(1)
    );
    assert!(stderr(2).lines().any(|l| l == "acked 1"), "{}", stderr(2));
    let last: serde_json::Value = serde_json::from_str(stdout(3).trim())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {}", stdout(3)));
    assert_eq!(last["topic"], "orders");
    // describe: 8 queues holding all 10,001 messages; then the stats table.
    let describe = stdout(4);
    let latest: u64 = describe
        .lines()
        .skip(2)
        .take(8)
        .map(|l| l.split('\t').nth(4).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(latest, 10_001, "{describe}");
    assert!(
        describe.contains("msgs_in"),
        "stats table missing: {describe}"
    );
    assert!(
        cwd.path().join("keelmq-data").join("shard-0").is_dir(),
        "the default data dir is ./keelmq-data"
    );
}
