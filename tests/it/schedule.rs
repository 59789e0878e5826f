//! Scheduled messages against the real broker (2 shards): delivered once,
//! never early, in due order within a queue; kept across `kill -9`;
//! cancelled; bad delays refused.

use crate::*;
use keelmq::client::{
    ClientError, Consumer, ErrorCode, GroupConsumer, Message, MessageId, Producer, QueueSelector,
    Record, SeekTo,
};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A small deterministic generator (no dependency for a test).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Consumes every queue of `topic` from the start until `n` messages
/// came (or `limit` passed); each with the wall time it arrived.
fn consume_all(addr: &str, topic: &str, n: usize, limit: Duration) -> Vec<(Message, i64)> {
    let mut c = Consumer::connect(addr).unwrap();
    c.assign_all(topic).unwrap();
    c.seek(SeekTo::Earliest).unwrap();
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        for m in c.poll(Duration::from_millis(50)).unwrap() {
            got.push((m, now_ms()));
        }
    }
    got
}

#[test]
fn scheduled_messages_arrive_once_never_early_in_due_order() {
    let b = Broker::start(2, None);
    b.admin().create_topic("later", 2, None).unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // id → (queue, due ms by the broker's clock)
    let mut due: HashMap<MessageId, (u32, i64)> = HashMap::new();
    for i in 0..50u32 {
        let delay = 10 + rng.below(4_990);
        let q = i % 2;
        let r = p
            .send_batch(
                "later",
                QueueSelector::Queue(q),
                &[Record::new(format!("m{i}")).deliver_after(Duration::from_millis(delay))],
            )
            .unwrap()
            .remove(0);
        assert!(r.is_scheduled(), "a delayed message has no offset yet");
        due.insert(r.id, (q, r.append_time_ms + delay as i64));
    }
    // Not there early: nothing due yet is visible.
    let got = consume_all(&b.addr, "later", 50, Duration::from_secs(12));
    assert_eq!(got.len(), 50, "every scheduled message is delivered");
    let mut seen = HashSet::new();
    let mut last_due: HashMap<u32, i64> = HashMap::new();
    for (m, arrived) in &got {
        assert!(seen.insert(m.id), "{} delivered twice", m.id);
        let &(q, d) = due
            .get(&m.id)
            .unwrap_or_else(|| panic!("unknown id {}", m.id));
        assert_eq!(m.queue, q, "delivered in the queue it was produced to");
        assert!(
            m.broker_timestamp_ms >= d,
            "{} visible at {} before its due time {d}",
            m.id,
            m.broker_timestamp_ms
        );
        assert!(*arrived >= d, "{} arrived {} ms early", m.id, d - arrived);
        // Offsets are assigned at delivery, in due order.
        let prev = last_due.insert(q, d).unwrap_or(i64::MIN);
        assert!(prev <= d, "queue {q}: due {d} delivered after due {prev}");
        assert!(m.producer_timestamp_ms > 0);
    }
    // The timer's own lateness is in the stats.
    let stats = b.admin().stats().unwrap();
    let fired: u64 = stats["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["schedule"]["fired"].as_u64().unwrap())
        .sum();
    assert_eq!(fired, 50, "{stats}");
}

#[test]
fn a_time_past_is_now_and_a_delay_past_the_limit_is_refused() {
    let b = Broker::start(2, Some("[limits]\nschedule_delay_ms_max = 60000\n"));
    b.admin().create_topic("t", 1, None).unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let r = p
        .send("t", Record::new("past").deliver_at(now_ms() - 60_000))
        .unwrap();
    assert!(
        !r.is_scheduled(),
        "a time already past is delivered at once"
    );
    assert_eq!(r.offset, 0);
    let e = p
        .send(
            "t",
            Record::new("far").deliver_after(Duration::from_secs(61)),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("schedule_delay_ms_max"),
        "a delay past the limit names it: {e}"
    );
    // A batch mixing now and later is scheduled whole; the one due now
    // comes at once, the other later.
    let rs = p
        .send_batch(
            "t",
            QueueSelector::Queue(0),
            &[
                Record::new("now"),
                Record::new("soon").deliver_after(Duration::from_millis(300)),
            ],
        )
        .unwrap();
    assert!(rs.iter().all(|r| r.is_scheduled()));
    let got = consume_all(&b.addr, "t", 3, Duration::from_secs(5));
    let names: Vec<&[u8]> = got.iter().map(|(m, _)| &m.payload[..]).collect();
    assert_eq!(names, vec![&b"past"[..], b"now", b"soon"]);
    // The priority bound is the format's.
    let e = p
        .send(
            "t",
            Record {
                priority: 10,
                ..Record::new("x")
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("priority"), "{e}");
}

#[test]
fn scheduled_messages_survive_kill_9_and_fire_exactly_once() {
    let mut b = Broker::start(2, None);
    b.admin().create_topic("k", 4, None).unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let mut rng = Rng(42);
    let mut due: HashMap<MessageId, i64> = HashMap::new();
    let n = 10_000;
    let t0 = now_ms();
    // In batches of 100 per queue, due 300 ms to 4 s from now: some fire
    // before the kill, most after the restart.
    for batch in 0..n / 100 {
        let records: Vec<Record> = (0..100)
            .map(|i| {
                let at = t0 + 300 + rng.below(3_700) as i64;
                Record::new(format!("{batch}-{i}")).deliver_at(at)
            })
            .collect();
        let rs = p
            .send_batch("k", QueueSelector::Queue(batch as u32 % 4), &records)
            .unwrap();
        for (r, rec) in rs.iter().zip(&records) {
            assert!(r.is_scheduled() || rec.deliver_at_ms <= r.append_time_ms);
            due.insert(r.id, rec.deliver_at_ms);
        }
    }
    // Kill while some have fired and most have not.
    let wait = (t0 + 1_000 - now_ms()).max(0);
    std::thread::sleep(Duration::from_millis(wait as u64));
    b.kill9();
    b.restart();
    assert!(b.log().contains("scheduled pending"), "{}", b.log());
    let got = consume_all(&b.addr, "k", n, Duration::from_secs(20));
    let mut seen = HashSet::new();
    for (m, _) in &got {
        assert!(seen.insert(m.id), "{} delivered twice", m.id);
        let d = *due
            .get(&m.id)
            .unwrap_or_else(|| panic!("unknown id {}", m.id));
        assert!(m.broker_timestamp_ms >= d, "{} before its time", m.id);
    }
    assert_eq!(
        got.len(),
        n,
        "every acknowledged scheduled message is delivered once"
    );
    // Nothing more comes.
    let extra = consume_all(&b.addr, "k", n + 1, Duration::from_millis(700));
    assert_eq!(extra.len(), n);
}

#[test]
fn a_pending_message_can_be_cancelled_and_never_comes() {
    let b = Broker::start(2, None);
    b.admin().create_topic("c", 2, None).unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let keep = p
        .send(
            "c",
            Record::new("keep").deliver_after(Duration::from_millis(1500)),
        )
        .unwrap();
    let drop1 = p
        .send(
            "c",
            Record::new("drop1").deliver_after(Duration::from_millis(1500)),
        )
        .unwrap();
    // The CLI prints the id of what it scheduled, and cancels by id.
    let out = ok_stdout(&b.cli(&["produce", "--topic", "c", "--delay", "1500ms", "drop2"]));
    let id2 = out
        .lines()
        .find_map(|l| l.strip_prefix("scheduled "))
        .unwrap_or_else(|| panic!("no id printed: {out}"))
        .trim()
        .to_owned();
    // A pending message can be looked up by its id.
    let m = b.admin().get_message(keep.id).unwrap();
    assert_eq!(&m.payload[..], b"keep");
    assert_eq!(m.topic.as_ref(), "c");
    b.admin().cancel_message(drop1.id).unwrap();
    let out = ok_stdout(&b.cli(&["message", "cancel", &id2]));
    assert!(out.contains("cancelled"), "{out}");
    // Cancelling twice, or an unknown id, says it is not pending.
    let e = b.admin().cancel_message(drop1.id).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::MessageNotFound,
                ..
            }
        ),
        "{e}"
    );
    let got = consume_all(&b.addr, "c", 2, Duration::from_secs(4));
    let names: Vec<&[u8]> = got.iter().map(|(m, _)| &m.payload[..]).collect();
    assert_eq!(
        names,
        vec![&b"keep"[..]],
        "only the message not cancelled comes"
    );
    // A delivered message is not pending either.
    let e = b.admin().cancel_message(keep.id).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::MessageNotFound,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_group_receives_scheduled_messages_once_with_their_ids() {
    let b = Broker::start(2, None);
    b.admin().create_topic("g", 2, None).unwrap();
    let mut c = GroupConsumer::connect(&b.addr, "workers", "g").unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let mut ids = HashSet::new();
    for i in 0..20 {
        let r = p
            .send(
                "g",
                Record::new(format!("g{i}"))
                    .with_tag(if i % 2 == 0 { "A" } else { "B" })
                    .deliver_after(Duration::from_millis(200 + 20 * i)),
            )
            .unwrap();
        ids.insert(r.id);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = HashSet::new();
    while got.len() < 20 && Instant::now() < deadline {
        let ds = c.receive(Duration::from_millis(200)).unwrap();
        let handles: Vec<_> = ds.iter().map(|d| d.handle.clone()).collect();
        for d in ds {
            assert!(
                ids.contains(&d.message.id),
                "delivered under its produced id"
            );
            assert!(got.insert(d.message.id), "delivered twice");
        }
        if !handles.is_empty() {
            c.ack(&handles).unwrap();
        }
    }
    assert_eq!(got.len(), 20);
    // A tag filter on fired messages works from the index.
    let mut f = GroupConsumer::connect_filtered(
        &b.addr,
        "only-a",
        "g",
        Some(keelmq::client::FilterSpec::tag("A")),
    )
    .unwrap();
    for i in 0..10 {
        p.send(
            "g",
            Record::new(format!("f{i}"))
                .with_tag(if i % 2 == 0 { "A" } else { "B" })
                .deliver_after(Duration::from_millis(100)),
        )
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut names = Vec::new();
    while names.len() < 5 && Instant::now() < deadline {
        for d in f.receive(Duration::from_millis(200)).unwrap() {
            assert_eq!(d.message.tag.as_deref(), Some("A"));
            names.push(d.message.payload.clone());
            f.ack(&[d.handle]).unwrap();
        }
    }
    assert_eq!(names.len(), 5);
}

/// Retention deletes the segments scheduled messages were produced to
/// long before they are due: they are carried forward first (and survive
/// a `kill -9` after that, from the timer's generation), and delivered
/// once, whole, under their ids.
#[test]
fn scheduled_messages_outlive_the_retention_of_their_segments() {
    let mut b = Broker::start(1, Some(crate::retention::SMALL_SEGMENTS));
    b.admin().create_topic("late", 1, None).unwrap();
    b.admin().create_topic("filler", 1, None).unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let mut want: HashMap<MessageId, String> = HashMap::new();
    let due = now_ms() + 9_000;
    for i in 0..30 {
        let body = format!("late-{i}-{}", "y".repeat(200));
        let r = p
            .send("late", Record::new(body.clone()).deliver_at(due + i))
            .unwrap();
        want.insert(r.id, body);
    }
    let first = segment_files(&b.data_dir(), 0)[0].clone();
    // ~1 MB of other traffic over 64 KiB segments with a 192 KiB cap.
    let filler = "x".repeat(900);
    for i in 0..100 {
        let recs: Vec<Record> = (0..10)
            .map(|j| Record::new(format!("{i}-{j}-{filler}")))
            .collect();
        p.send_batch("filler", QueueSelector::Queue(0), &recs)
            .unwrap();
    }
    wait_until(
        Duration::from_secs(8),
        "retention to delete the scheduled messages' segment",
        || (!first.exists()).then_some(()),
    );
    let stats = b.admin().stats().unwrap();
    assert!(
        stats["shards"][0]["schedule"]["carried"].as_u64().unwrap() >= 30,
        "{}",
        stats["shards"][0]["schedule"]
    );
    // Their ids still find them before they are due.
    let some = *want.keys().next().unwrap();
    assert_eq!(
        b.admin().get_message(some).unwrap().payload,
        want[&some].as_bytes()
    );
    b.kill9();
    b.restart();
    let got = consume_all(&b.addr, "late", 30, Duration::from_secs(15));
    assert_eq!(got.len(), 30, "{}", b.log());
    for (m, _) in &got {
        assert_eq!(
            std::str::from_utf8(&m.payload).unwrap(),
            want.remove(&m.id).expect("each id once"),
        );
        assert!(m.broker_timestamp_ms >= due);
    }
}

/// A pending set whose snapshot is larger than a generation's trigger
/// (16 MiB: over 316,000 entries) is written once, not over and over: an
/// idle broker holding 340,000 scheduled messages appends nothing.
#[test]
fn a_large_pending_set_is_not_rewritten_while_idle() {
    let b = Broker::start(1, None);
    b.admin().create_topic("big", 1, None).unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let records: Vec<Record> = (0..1000)
        .map(|_| Record::new(vec![7u8; 100]).deliver_after(Duration::from_secs(600)))
        .collect();
    for _ in 0..340 {
        p.send_batch("big", QueueSelector::Queue(0), &records)
            .unwrap();
    }
    let position = |b: &Broker| {
        let stats = b.admin().stats().unwrap();
        let s = &stats["shards"][0];
        assert_eq!(s["schedule"]["pending"].as_u64(), Some(340_000), "{s}");
        (
            s["log"]["append_position"].as_u64().unwrap(),
            s["schedule"]["generation"].as_u64().unwrap(),
        )
    };
    // Let the generation the scheduling called for be written.
    std::thread::sleep(Duration::from_secs(2));
    let (at, generation) = position(&b);
    std::thread::sleep(Duration::from_secs(3));
    let (later, generation_later) = position(&b);
    assert_eq!(
        (later - at, generation_later),
        (0, generation),
        "an idle timer kept writing generations"
    );
}
