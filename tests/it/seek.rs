//! Retroactive consumption: seek by offset, by timestamp, to latest.

use crate::*;
use keelmq::client::{Consumer, Producer, QueueSelector, Record, SeekTo};
use keelmq::protocol::{Durability, OffsetSpec};
use std::time::Duration;

fn drain(c: &mut Consumer, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let got = c.poll(Duration::from_secs(5)).unwrap();
        assert!(!got.is_empty(), "timed out after {out:?}");
        out.extend(
            got.into_iter()
                .map(|m| String::from_utf8(m.payload.to_vec()).unwrap()),
        );
    }
    out
}

#[test]
fn seek_by_timestamp_offset_and_latest() {
    let b = Broker::start(2, None);
    b.admin()
        .create_topic("s", 2, Some(Durability::Written))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let before: Vec<Record> = (0..50).map(|i| Record::new(format!("old-{i}"))).collect();
    p.send_batch("s", QueueSelector::Queue(1), &before).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let cut = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    std::thread::sleep(Duration::from_millis(30));
    for i in 0..20 {
        p.send_batch(
            "s",
            QueueSelector::Queue(1),
            &[Record::new(format!("new-{i}"))],
        )
        .unwrap();
    }

    let mut admin = b.admin();
    assert_eq!(
        admin
            .list_offset("s", 1, OffsetSpec::Timestamp(cut))
            .unwrap(),
        50
    );
    assert_eq!(
        admin.list_offset("s", 1, OffsetSpec::Timestamp(0)).unwrap(),
        0
    );
    assert_eq!(
        admin
            .list_offset("s", 1, OffsetSpec::Timestamp(i64::MAX))
            .unwrap(),
        70
    );
    assert_eq!(admin.list_offset("s", 1, OffsetSpec::Latest).unwrap(), 70);

    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign("s", &[1]).unwrap();
    c.seek(SeekTo::Timestamp(cut)).unwrap();
    let got = drain(&mut c, 20);
    assert_eq!(got, (0..20).map(|i| format!("new-{i}")).collect::<Vec<_>>());

    c.seek(SeekTo::Offset(45)).unwrap();
    let got = drain(&mut c, 10);
    assert_eq!(
        got[0], "old-45",
        "an offset inside a batch skips its earlier records"
    );
    assert_eq!(got[5], "new-0");

    c.seek(SeekTo::Latest).unwrap();
    assert!(c.poll(Duration::from_millis(100)).unwrap().is_empty());

    // The CLI takes the same positions.
    let out = ok_stdout(&b.cli(&[
        "consume",
        "--topic",
        "s",
        "--queue",
        "1",
        "--from",
        &format!("time:{cut}"),
        "--timeout-ms",
        "500",
    ]));
    assert_eq!(out.lines().count(), 20);
    assert_eq!(out.lines().next(), Some("new-0"));
    let out = ok_stdout(&b.cli(&[
        "consume",
        "--topic",
        "s",
        "--queue",
        "1",
        "--from",
        "offset:68",
        "--json",
        "--timeout-ms",
        "500",
    ]));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["offset"], 68);
    assert_eq!(lines[1]["payload"], "new-19");
    let out = b.cli(&["consume", "--topic", "s", "--from", "yesterday"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from must be"));
}

#[test]
fn fetching_past_the_end_is_an_error_and_the_consumer_recovers() {
    let b = Broker::start(1, None);
    b.admin()
        .create_topic("e", 1, Some(Durability::Memory))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    p.send_batch(
        "e",
        QueueSelector::Queue(0),
        &[Record::new("a"), Record::new("b")],
    )
    .unwrap();
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign("e", &[0]).unwrap();
    c.seek(SeekTo::Offset(1000)).unwrap();
    assert!(c.poll(Duration::from_millis(300)).unwrap().is_empty());
    assert_eq!(
        c.positions()[&0],
        2,
        "clamped to the end after out-of-range"
    );
}
