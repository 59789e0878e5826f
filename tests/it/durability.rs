//! Durability is a promise: what was acknowledged survives `kill -9`.

use crate::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Pipes 1..=n into `keelmq produce`, kills the broker with SIGKILL once at
/// least `kill_after` messages are stored, restarts it, and checks the
/// queue holds exactly 1..=K with K >= acked.
fn kill_mid_stream(durability: &str, n: u64, kill_after: u64) {
    let mut b = Broker::start(2, None);
    ok_stdout(&b.cli(&[
        "topic",
        "create",
        "k",
        "--queues",
        "1",
        "--durability",
        durability,
    ]));
    let mut producer = Command::new(keelmq_bin())
        .args([
            "produce", "--topic", "k", "--queue", "0", "--broker", &b.addr,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = producer.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let mut w = std::io::BufWriter::new(&mut stdin);
        for i in 1..=n {
            if writeln!(w, "{i}").is_err() {
                return;
            }
        }
    });
    wait_until(Duration::from_secs(60), "messages to be stored", || {
        let d = b.admin().describe_topic("k").ok()?;
        (d.offsets[0].latest >= kill_after).then_some(())
    });
    b.kill9();
    let out = producer.wait_with_output().unwrap();
    feeder.join().unwrap();
    let acked = acked(&out);
    // The broker may store (and show) a batch whose ack it never sent.
    assert!(acked > 0, "nothing was acknowledged before the kill");
    assert!(
        acked < n,
        "the broker was killed after the stream ended; raise n"
    );

    b.restart();
    assert!(b.log().contains("shard 0 recovery:"), "{}", b.log());
    let out = ok_stdout(&b.cli(&[
        "consume",
        "--topic",
        "k",
        "--from",
        "earliest",
        "--timeout-ms",
        "1500",
    ]));
    let got: Vec<u64> = out.lines().map(|l| l.parse().unwrap()).collect();
    let k = got.len() as u64;
    assert!(
        k >= acked,
        "lost acknowledged messages: kept {k}, acked {acked}"
    );
    assert!(got.iter().copied().eq(1..=k), "not exactly 1..{k} in order");
}

#[test]
fn fsync_topic_keeps_every_acknowledged_message_after_kill_9() {
    kill_mid_stream("fsync", 3_000_000, 100_000);
}

#[test]
fn written_topic_keeps_every_acknowledged_message_after_kill_9() {
    kill_mid_stream("written", 3_000_000, 100_000);
}

#[test]
fn sigterm_flushes_memory_level_messages() {
    let mut b = Broker::start(2, None);
    ok_stdout(&b.cli(&[
        "topic",
        "create",
        "m",
        "--queues",
        "4",
        "--durability",
        "memory",
    ]));
    let input: String = (1..=20_000).map(|i| format!("{i}\n")).collect();
    let out = b.cli_stdin(&["produce", "--topic", "m"], &input);
    assert_eq!(acked(&out), 20_000);
    let status = b.stop();
    assert!(status.success(), "unclean exit {status}: {}", b.log());
    assert!(b.log().contains("stopped cleanly"), "{}", b.log());
    b.restart();
    assert!(b.log().contains("clean tail"), "{}", b.log());
    let out = ok_stdout(&b.cli(&[
        "consume",
        "--topic",
        "m",
        "--count",
        "20000",
        "--timeout-ms",
        "3000",
    ]));
    assert_eq!(out.lines().count(), 20_000);
}

#[test]
fn a_memory_topic_never_reuses_an_acknowledged_offset_after_kill_9() {
    let mut b = Broker::start(1, None);
    b.admin()
        .create_topic("mem", 1, Some(keelmq::protocol::Durability::Memory))
        .unwrap();
    let mut p = keelmq::client::Producer::connect(&b.addr).unwrap();
    let mut last = 0;
    for i in 0..500 {
        let r = p
            .send("mem", keelmq::client::Record::new(format!("m{i}")))
            .unwrap();
        last = r.offset;
    }
    // Acknowledged in memory, maybe never written: a crash may lose them,
    // but their offsets are never handed out again.
    b.kill9();
    b.restart();
    let mut p = keelmq::client::Producer::connect(&b.addr).unwrap();
    let r = p.send("mem", keelmq::client::Record::new("after")).unwrap();
    assert!(
        r.offset > last,
        "offset {} reused after the crash (acknowledged up to {last})",
        r.offset
    );
}
