//! A full disk is back-pressure, not a failure: on a 64 MiB filesystem a
//! produce stream gets `storage_full` (nothing acknowledged is lost, reads
//! go on, no half-made segment stays), the broker restarts and serves on
//! the full disk, and produce resumes by itself once space is freed.
//!
//! Needs root (a loop-mounted ext4); CI runs as root. Without root the test
//! says so and returns.

use crate::*;
use keelmq::client::{ClientError, Consumer, ErrorCode, Producer, QueueSelector, Record, SeekTo};
use keelmq::protocol::Durability;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A small ext4 filesystem on a loop device, unmounted on drop.
struct SmallFs {
    image: PathBuf,
    mount: tempfile::TempDir,
}

impl SmallFs {
    fn new(mib: u64) -> Option<SmallFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("disk_full: not root, cannot loop-mount a filesystem; skipped");
            return None;
        }
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(base).unwrap();
        let image = base.join(format!("small-fs-{}.img", free_port()));
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        let mount = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(&image)
            .arg(mount.path()));
        Some(SmallFs { image, mount })
    }

    fn path(&self) -> &Path {
        self.mount.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mount.path())
            .status();
        let _ = std::fs::remove_file(&self.image);
    }
}

fn is_full(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Broker {
            code: ErrorCode::StorageFull,
            ..
        }
    )
}

/// Every message of queue 0 of `topic`, in order.
fn consume_all(addr: &str, topic: &str) -> Vec<u64> {
    let mut c = Consumer::connect(addr).unwrap();
    c.assign(topic, &[0]).unwrap();
    c.seek(SeekTo::Earliest).unwrap();
    let mut got = Vec::new();
    loop {
        let batch = c.poll(Duration::from_millis(700)).unwrap();
        if batch.is_empty() {
            return got;
        }
        for m in batch {
            let text = std::str::from_utf8(&m.payload[..20]).unwrap();
            got.push(text.trim().parse().unwrap());
        }
    }
}

/// Produces single messages from `n` on until the disk is full; returns the
/// next number.
fn produce_until_full(p: &mut Producer, acked: &mut Vec<u64>, mut n: u64) -> u64 {
    loop {
        match p.send_batch("full", QueueSelector::Queue(0), &[message(n)]) {
            Ok(_) => {
                acked.push(n);
                n += 1;
            }
            Err(e) if is_full(&e) => return n,
            Err(e) => panic!("{e}"),
        }
        assert!(n < 1_000_000, "the disk never filled");
    }
}

fn message(n: u64) -> Record {
    Record::new(format!("{n:<20}{}", "p".repeat(2000)))
}

#[test]
fn a_full_disk_refuses_then_resumes_and_loses_nothing() {
    let Some(fs) = SmallFs::new(64) else { return };
    // Most of the space goes to a file an operator can delete later.
    let filler = fs.path().join("filler");
    let free = keelmq::runtime::free_bytes(fs.path()).unwrap();
    std::fs::write(&filler, vec![1u8; (free - (20 << 20)) as usize]).unwrap();
    let data = fs.path().join("data");
    let cfg = "[storage]\nsegment_bytes_max = 4194304\n[limits]\nbatch_bytes_max = 262144\nframe_bytes_max = 524288\n";
    let mut b = Broker::start_with_data(1, Some(cfg), Some(data.clone()));
    b.admin()
        .create_topic("full", 1, Some(Durability::Fsync))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let mut acked = Vec::new();
    let mut n = 0u64;
    let first_full = loop {
        let batch: Vec<Record> = (n..n + 20).map(message).collect();
        match p.send_batch("full", QueueSelector::Queue(0), &batch) {
            Ok(_) => {
                acked.extend(n..n + 20);
                n += 20;
            }
            Err(e) if is_full(&e) => break e,
            Err(e) => panic!("a full disk must answer storage_full, not {e}"),
        }
        assert!(n < 1_000_000, "the disk never filled");
    };
    assert!(!acked.is_empty());
    eprintln!("disk full after {} messages: {first_full}", acked.len());
    // Single messages still fit the active segment (its space is
    // preallocated); then every produce gets storage_full. Reads go on.
    n = produce_until_full(&mut p, &mut acked, n);
    let again = p.send_batch("full", QueueSelector::Queue(0), &[message(n)]);
    assert!(again.as_ref().is_err_and(is_full), "{again:?}");
    assert_eq!(consume_all(&b.addr, "full"), acked, "reads on a full disk");
    let stats = b.admin().stats().unwrap();
    let log = &stats["shards"][0]["log"];
    assert!(log["full"].is_string(), "stats say the disk is full: {log}");
    assert!(log["free_bytes"].as_u64().unwrap() < 8 << 20, "{log}");
    let text = ok_stdout(&b.cli(&["stats"]));
    assert!(
        text.contains("disk_free") && text.contains("FULL"),
        "{text}"
    );
    assert!(text.contains("disk full: "), "{text}");
    // No half-made segment: every segment file has whole pages, the
    // preallocated ones at the size they were made with, and the failed
    // preallocation left no file behind.
    let names: Vec<String> = std::fs::read_dir(data.join("shard-0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    let path = first_full.to_string();
    let failed = path
        .split_whitespace()
        .find(|w| w.ends_with(".log:"))
        .map(|w| w.trim_end_matches(':').to_owned())
        .expect("the error names the segment");
    assert!(
        !Path::new(&failed).exists(),
        "the half-made {failed} stayed"
    );

    // A crash on the full disk: the broker restarts, recovers, serves.
    b.kill9();
    b.restart();
    assert_eq!(
        consume_all(&b.addr, "full"),
        acked,
        "after a restart on a full disk"
    );
    // What little space is left takes a small segment; then storage_full.
    let mut p = Producer::connect(&b.addr).unwrap();
    n = produce_until_full(&mut p, &mut acked, n);

    // An operator frees space: produce resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match p.send_batch("full", QueueSelector::Queue(0), &[message(n)]) {
            Ok(_) => break,
            Err(e) if is_full(&e) => {
                assert!(Instant::now() < deadline, "produce did not resume: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
    acked.push(n);
    for k in n + 1..n + 200 {
        p.send_batch("full", QueueSelector::Queue(0), &[message(k)])
            .unwrap();
        acked.push(k);
    }
    assert_eq!(
        consume_all(&b.addr, "full"),
        acked,
        "nothing acknowledged lost"
    );
}
