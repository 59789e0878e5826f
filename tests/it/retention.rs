//! Retention deletes whole old segments, by size and by age; offsets never
//! go back, also across a restart.

use crate::*;
use keelmq::client::{Consumer, Producer, QueueSelector, Record, SeekTo};
use keelmq::protocol::Durability;
use std::time::Duration;

/// 64 KiB segments, a 192 KiB cap, retention checked every 50 ms: a few
/// hundred KB of traffic makes it delete (also used by `schedule`).
pub const SMALL_SEGMENTS: &str = r#"
[storage]
segment_bytes_max = 65536
retention_bytes = 196608
retention_check_interval_ms = 50
checkpoint_interval_ms = 50
write_bytes_max = 65536
tail_cache_bytes_max = 4096
[limits]
batch_bytes_max = 16384
frame_bytes_max = 32768
"#;

#[test]
fn size_retention_deletes_old_segments_and_keeps_offsets() {
    let mut b = Broker::start(1, Some(SMALL_SEGMENTS));
    b.admin()
        .create_topic("r", 2, Some(Durability::Written))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let payload = "x".repeat(900);
    for i in 0..100 {
        let recs: Vec<Record> = (0..10)
            .map(|j| Record::new(format!("{i}-{j}-{payload}")))
            .collect();
        p.send_batch("r", QueueSelector::Queue(i % 2), &recs)
            .unwrap();
    }
    // ~900 KB over 64 KiB segments with a 192 KiB cap: most must go.
    wait_until(
        Duration::from_secs(20),
        "retention to delete segments",
        || (segment_files(&b.data_dir(), 0).len() <= 4).then_some(()),
    );
    let d = b.admin().describe_topic("r").unwrap();
    assert!(
        d.offsets[0].earliest > 0 && d.offsets[1].earliest > 0,
        "{d:?}"
    );
    assert_eq!(d.offsets[0].latest, 500);
    assert_eq!(d.offsets[1].latest, 500);

    // Consumers resume at the earliest retained offset, in order, to the end.
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign("r", &[0]).unwrap();
    c.seek(SeekTo::Offset(0)).unwrap();
    let mut offsets = Vec::new();
    while offsets.last() != Some(&499) {
        let got = c.poll(Duration::from_secs(5)).unwrap();
        assert!(!got.is_empty());
        offsets.extend(got.iter().map(|m| m.offset));
    }
    let earliest = d.offsets[0].earliest;
    assert!(offsets[0] >= earliest, "{} < {earliest}", offsets[0]);
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "gap in consumed offsets"
    );

    // Offsets survive a kill: queues keep counting where they were.
    b.kill9();
    b.restart();
    let d2 = b.admin().describe_topic("r").unwrap();
    assert_eq!(d2.offsets[0].latest, 500);
    assert!(d2.offsets[0].earliest >= earliest);
    let r = p_reconnect(&b)
        .send_batch("r", QueueSelector::Queue(0), &[Record::new("after")])
        .unwrap();
    assert_eq!(r[0].offset, 500);
}

fn p_reconnect(b: &Broker) -> Producer {
    Producer::connect(&b.addr).unwrap()
}

#[test]
fn age_retention_empties_a_queue_without_resetting_its_offsets() {
    let cfg = r#"
[storage]
segment_bytes_max = 65536
retention_ms = 300
retention_check_interval_ms = 50
checkpoint_interval_ms = 50
[limits]
batch_bytes_max = 16384
frame_bytes_max = 32768
"#;
    let mut b = Broker::start(1, Some(cfg));
    b.admin()
        .create_topic("old", 1, Some(Durability::Fsync))
        .unwrap();
    b.admin()
        .create_topic("filler", 1, Some(Durability::Memory))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    for i in 0..20 {
        p.send_batch(
            "old",
            QueueSelector::Queue(0),
            &[Record::new(format!("{i}-{}", "y".repeat(5000)))],
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(400));
    // New data rolls segments so the old ones are closed and can expire.
    for _ in 0..30 {
        p.send_batch(
            "filler",
            QueueSelector::Queue(0),
            &[Record::new("z".repeat(5000))],
        )
        .unwrap();
    }
    let d = wait_until(Duration::from_secs(20), "old segments to expire", || {
        let d = b.admin().describe_topic("old").unwrap();
        (d.offsets[0].earliest == 20).then_some(d)
    });
    assert_eq!(
        d.offsets[0].latest, 20,
        "an emptied queue keeps its next offset"
    );
    b.kill9();
    b.restart();
    let d = b.admin().describe_topic("old").unwrap();
    assert_eq!((d.offsets[0].earliest, d.offsets[0].latest), (20, 20));
    let r = Producer::connect(&b.addr)
        .unwrap()
        .send_batch("old", QueueSelector::Queue(0), &[Record::new("next")])
        .unwrap();
    assert_eq!(
        r[0].offset, 20,
        "offsets never go back after retention and a crash"
    );
}
