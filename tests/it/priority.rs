//! Priority: a message-delivery group leases the highest priority visible
//! message first, FIFO within a priority; retries keep theirs; aging keeps
//! the lowest moving under a constant stream of the highest. Real broker,
//! 2 shards, bare receive requests (no client prefetch between the
//! broker's order and the check).

use crate::*;
use bytes::{Bytes, BytesMut};
use keelmq::client::{Connection, Producer, QueueSelector, Record};
use keelmq::protocol::{Op, ReceiveRequest, ReceiveResponse, SettleRequest};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

struct Raw {
    conn: Connection,
    group: String,
    topic: String,
    shard: u16,
}

impl Raw {
    fn receive(&mut self, max: u32) -> ReceiveResponse {
        let mut body = BytesMut::new();
        ReceiveRequest {
            group: self.group.clone(),
            topic: self.topic.clone(),
            shard: self.shard,
            max_messages: max,
            invisible_ms: 60_000,
            wait_ms: 0,
        }
        .encode(&mut body);
        ReceiveResponse::decode(self.conn.call(Op::Receive, &body).unwrap()).unwrap()
    }
    fn settle(&mut self, handles: Vec<Bytes>, nack: bool) {
        let mut body = BytesMut::new();
        SettleRequest {
            delay_ms: nack.then_some(0),
            handles,
        }
        .encode(nack, &mut body);
        self.conn
            .call(if nack { Op::Nack } else { Op::Ack }, &body)
            .unwrap();
    }
}

fn setup(b: &Broker, topic: &str, group: &str, boost_ms: u64) -> Raw {
    let info = b.admin().create_topic(topic, 1, None).unwrap();
    b.admin()
        .create_group(
            group,
            &serde_json::json!({
                "subscriptions": [{"topic": topic}],
                "start": "earliest",
                "priority_age_boost_ms": boost_ms,
            }),
        )
        .unwrap();
    Raw {
        conn: Connection::connect(&b.addr).unwrap(),
        group: group.into(),
        topic: topic.into(),
        shard: info.queues[0].shard,
    }
}

/// Produces `batches` batches of `per_batch` messages to queue 0 of
/// `topic`, message `n` (from 0) with priority `priority_of(n)`; returns
/// each offset's priority.
fn produce(
    p: &mut Producer,
    topic: &str,
    batches: u64,
    per_batch: u64,
    priority_of: impl Fn(u64) -> u8,
) -> HashMap<u64, u8> {
    let mut prio = HashMap::new();
    for batch in 0..batches {
        let records: Vec<Record> = (0..per_batch)
            .map(|i| {
                let n = batch * per_batch + i;
                Record::new(n.to_string()).with_priority(priority_of(n))
            })
            .collect();
        let rs = p
            .send_batch(topic, QueueSelector::Queue(0), &records)
            .unwrap();
        for (r, rec) in rs.iter().zip(&records) {
            prio.insert(r.offset, rec.priority);
        }
    }
    prio
}

#[test]
fn a_backlog_is_leased_highest_priority_first_and_retries_keep_theirs() {
    let b = Broker::start(2, None);
    let mut raw = setup(&b, "pq", "pg", 0);
    let mut p = Producer::connect(&b.addr).unwrap();
    // offset -> priority; 300 messages in batches of 10, priorities mixed
    // within and across batches.
    let prio = produce(&mut p, "pq", 30, 10, |n| ((n * 7 + n / 13) % 10) as u8);
    // What may be leased next: (priority desc, offset asc).
    let mut deliverable: BTreeSet<(std::cmp::Reverse<u8>, u64)> = prio
        .iter()
        .map(|(&o, &p)| (std::cmp::Reverse(p), o))
        .collect();
    let mut nacked = 0;
    let mut leased = 0;
    let mut retry: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !deliverable.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} never came",
            deliverable.len()
        );
        let got = raw.receive(7);
        let mut acks = Vec::new();
        let mut nacks = Vec::new();
        for l in got.leases {
            let want = deliverable.pop_first().unwrap();
            assert_eq!(
                (l.offset, prio[&l.offset]),
                (want.1, want.0 .0),
                "lease {leased}: got offset {} (priority {}), the best deliverable was offset {} (priority {})",
                l.offset,
                prio[&l.offset],
                want.1,
                want.0 .0
            );
            leased += 1;
            // Every 5th lease of priority 9 or 4 is nacked (due again at
            // once): it must come back before anything of lower priority.
            if leased % 5 == 0 && matches!(prio[&l.offset], 9 | 4) && nacked < 10 {
                nacked += 1;
                nacks.push(l.handle.clone());
                // Deliverable again once the nack is in (after this
                // receive's leases, which were taken before).
                retry.push(l.offset);
            } else {
                acks.push(l.handle.clone());
            }
        }
        if !acks.is_empty() {
            raw.settle(acks, false);
        }
        if !nacks.is_empty() {
            raw.settle(nacks, true);
            for o in retry.drain(..) {
                deliverable.insert((std::cmp::Reverse(prio[&o]), o));
            }
        }
    }
    assert!(nacked >= 5, "the retries were exercised");
    assert_eq!(leased, 300 + nacked);
}

#[test]
fn aging_delivers_the_lowest_priority_under_a_stream_of_the_highest() {
    let b = Broker::start(2, None);
    let boost = 100;
    let mut raw = setup(&b, "aq", "ag", boost);
    let mut p = Producer::connect(&b.addr).unwrap();
    let low = p
        .send_batch(
            "aq",
            QueueSelector::Queue(0),
            &[Record::new("low").with_priority(0)],
        )
        .unwrap()[0]
        .offset;
    let high: Vec<Record> = (0..50)
        .map(|i| Record::new(format!("h{i}")).with_priority(9))
        .collect();
    p.send_batch("aq", QueueSelector::Queue(0), &high).unwrap();
    let t0 = Instant::now();
    let mut before = 0;
    loop {
        // One high-priority message arrives for each one taken.
        p.send_batch(
            "aq",
            QueueSelector::Queue(0),
            &[Record::new("more").with_priority(9)],
        )
        .unwrap();
        let got = raw.receive(1);
        let Some(l) = got.leases.first() else {
            continue;
        };
        raw.settle(vec![l.handle.clone()], false);
        if l.offset == low {
            break;
        }
        before += 1;
        assert!(
            t0.elapsed() < Duration::from_millis(9 * boost + 2000),
            "priority 0 starved for {:?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let waited = t0.elapsed();
    assert!(before > 0, "higher priorities went first");
    assert!(
        waited >= Duration::from_millis(9 * boost - 50),
        "priority 0 went after {waited:?}, before it aged to 9"
    );
}

/// A backlog 100 times the window: the messages of priority above 0 deep
/// in it and at its end are leased before any of priority 0 in the window,
/// highest first; acked ones stay finished across a `kill -9`.
#[test]
fn priority_reaches_beyond_a_full_window_and_survives_a_kill() {
    let mut b = Broker::start(2, None);
    let info = b.admin().create_topic("dq", 1, None).unwrap();
    b.admin()
        .create_group(
            "dg",
            &serde_json::json!({
                "subscriptions": [{"topic": "dq"}],
                "start": "earliest",
                "priority_age_boost_ms": 0,
                "inflight_messages_max": 20,
            }),
        )
        .unwrap();
    let shard = info.queues[0].shard;
    let mut p = Producer::connect(&b.addr).unwrap();
    // 2000 messages: priority 7 at every 97th, 9 at the last 10, else 0.
    let prio_of = |n: u64| match n {
        1990.. => 9,
        n if n % 97 == 50 => 7,
        _ => 0,
    };
    let prio = produce(&mut p, "dq", 40, 50, prio_of);
    let mut high: Vec<(std::cmp::Reverse<u8>, u64)> = prio
        .iter()
        .filter(|(_, &p)| p > 0)
        .map(|(&o, &p)| (std::cmp::Reverse(p), o))
        .collect();
    high.sort();
    assert_eq!(high.len(), 30);
    let raw = |b: &Broker| Raw {
        conn: Connection::connect(&b.addr).unwrap(),
        group: "dg".into(),
        topic: "dq".into(),
        shard,
    };
    let mut r = raw(&b);
    // The first 18 high ones (all of priority 9, then 7s), acked.
    let mut leased = Vec::new();
    while leased.len() < 18 {
        let got = r.receive((18 - leased.len()) as u32);
        assert!(!got.leases.is_empty(), "nothing leased after {leased:?}");
        let handles = got.leases.iter().map(|l| l.handle.clone()).collect();
        leased.extend(got.leases.iter().map(|l| l.offset));
        r.settle(handles, false);
    }
    let want: Vec<u64> = high[..18].iter().map(|h| h.1).collect();
    assert_eq!(leased, want, "highest priority first, beyond the window");
    b.kill9();
    b.restart();
    let mut r = raw(&b);
    // The other 12 high ones, then the rest; nothing acked comes again.
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while all.len() < 2000 - 18 {
        assert!(
            Instant::now() < deadline,
            "{} of {} came",
            all.len(),
            2000 - 18
        );
        let got = r.receive(64);
        let handles: Vec<Bytes> = got.leases.iter().map(|l| l.handle.clone()).collect();
        all.extend(got.leases.iter().map(|l| l.offset));
        if !handles.is_empty() {
            r.settle(handles, false);
        }
    }
    let rest: Vec<u64> = high[18..].iter().map(|h| h.1).collect();
    assert_eq!(&all[..12], &rest[..], "the remaining high ones first");
    let mut seen = BTreeSet::new();
    for o in &all {
        assert!(
            !want.contains(o),
            "acked {o} delivered again after the kill"
        );
        assert!(seen.insert(*o), "{o} delivered twice");
    }
    assert_eq!(seen.len(), 2000 - 18);
}
