//! Round trips through the client and the CLI, across shards.

use crate::*;
use keelmq::client::{Consumer, Producer, QueueSelector, Record, SeekTo};
use keelmq::protocol::Durability;
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn client_round_trip_keeps_every_field_and_finds_messages_by_id() {
    let b = Broker::start(1, None);
    let mut admin = b.admin();
    admin
        .create_topic("orders", 2, Some(Durability::Written))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let r = p
        .send(
            "orders",
            Record::new("first")
                .with_key("cust-7")
                .with_tag("NEW")
                .with_property("desk", "fx")
                .with_property("qty", "100"),
        )
        .unwrap();
    let batch: Vec<Record> = (0..5).map(|i| Record::new(format!("b{i}"))).collect();
    let rs = p
        .send_batch("orders", QueueSelector::Queue(1), &batch)
        .unwrap();
    assert_eq!(rs.len(), 5);
    assert!(
        rs.windows(2).all(|w| w[1].offset == w[0].offset + 1),
        "a batch gets consecutive offsets"
    );
    assert!(rs.iter().all(|x| x.queue == 1));

    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign_all("orders").unwrap();
    c.seek(SeekTo::Earliest).unwrap();
    let mut got = Vec::new();
    while got.len() < 6 {
        let batch = c.poll(Duration::from_secs(5)).unwrap();
        assert!(!batch.is_empty(), "timed out after {} messages", got.len());
        got.extend(batch);
    }
    let first = got.iter().find(|m| &m.payload[..] == b"first").unwrap();
    assert_eq!(first.queue, r.queue);
    assert_eq!(first.offset, r.offset);
    assert_eq!(first.id, r.id);
    assert_eq!(first.key.as_deref(), Some(&b"cust-7"[..]));
    assert_eq!(first.tag.as_deref(), Some("NEW"));
    assert_eq!(
        first.properties,
        vec![("desk".into(), "fx".into()), ("qty".into(), "100".into())]
    );
    assert!(first.producer_timestamp_ms > 0);
    assert!(first.broker_timestamp_ms >= first.producer_timestamp_ms - 5_000);
    let q1: Vec<_> = got
        .iter()
        .filter(|m| m.queue == 1 && m.payload.starts_with(b"b"))
        .collect();
    assert_eq!(
        q1.iter().map(|m| &m.payload[..]).collect::<Vec<_>>(),
        vec![&b"b0"[..], b"b1", b"b2", b"b3", b"b4"]
    );

    // Look-up by id, through the client and the CLI.
    let found = admin.get_message(rs[3].id).unwrap();
    assert_eq!(&found.payload[..], b"b3");
    assert_eq!(found.offset, rs[3].offset);
    let out = ok_stdout(&b.cli(&["message", "get", &r.id.to_string(), "--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["payload"], "first");
    assert_eq!(v["tag"], "NEW");
    assert_eq!(v["properties"]["desk"], "fx");
    let bogus = keelmq::client::MessageId { index: 99, ..r.id };
    assert!(
        admin.get_message(bogus).is_err(),
        "an index past the batch is not found"
    );
    let out = b.cli(&["message", "get", "0000FFFFFFFFFFFF0000000000000000"]);
    assert!(!out.status.success());

    let stats = admin.stats().unwrap();
    assert_eq!(stats["shards"][0]["counters"]["messages_in"], 6);
    assert!(
        stats["shards"][0]["append_latency"]["count"]
            .as_u64()
            .unwrap()
            >= 2
    );
    let text = ok_stdout(&b.cli(&["stats"]));
    assert!(text.contains("msgs_in"), "{text}");
}

#[test]
fn cli_ten_thousand_lines_over_eight_queues_on_two_shards() {
    let b = Broker::start(2, None);
    ok_stdout(&b.cli(&["topic", "create", "t", "--queues", "8"]));
    let d = b.admin().describe_topic("t").unwrap();
    let shards: BTreeSet<u16> = d.topic.queues.iter().map(|q| q.shard).collect();
    assert_eq!(
        shards,
        BTreeSet::from([0, 1]),
        "queues spread over both shards"
    );

    let input: String = (1..=10_000).map(|i| format!("{i}\n")).collect();
    let out = b.cli_stdin(&["produce", "--topic", "t"], &input);
    ok_stdout(&out);
    assert_eq!(acked(&out), 10_000);

    let out = ok_stdout(&b.cli(&[
        "consume", "--topic", "t", "--from", "earliest", "--count", "10000",
    ]));
    let mut got: Vec<u64> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(got.len(), 10_000);
    got.sort_unstable();
    assert_eq!(got, (1..=10_000).collect::<Vec<_>>());

    // Every queue got some, and the sums match the describe output.
    let d = b.admin().describe_topic("t").unwrap();
    assert_eq!(d.offsets.iter().map(|o| o.latest).sum::<u64>(), 10_000);
    // Whichever shard took the connection forwarded to the other one.
    let stats = b.admin().stats().unwrap();
    let forwarded: u64 = (0..2)
        .map(|s| {
            stats["shards"][s]["counters"]["forwarded_requests"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(forwarded > 0, "no request crossed shards: {stats}");
    let topics = ok_stdout(&b.cli(&["topic", "list"]));
    assert!(topics.contains("t\tqueues=8"), "{topics}");
}

#[test]
fn keyed_messages_stay_in_order_in_one_queue_across_shards() {
    let b = Broker::start(2, None);
    b.admin()
        .create_topic("k", 6, Some(Durability::Memory))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let mut queue_of = std::collections::HashMap::new();
    for i in 0..300 {
        let key = format!("key-{}", i % 7);
        let r = p
            .send("k", Record::new(format!("{key}:{i}")).with_key(key.clone()))
            .unwrap();
        assert_eq!(
            *queue_of.entry(key).or_insert(r.queue),
            r.queue,
            "a key always maps to one queue"
        );
    }
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign_all("k").unwrap();
    let mut seen = Vec::new();
    while seen.len() < 300 {
        let batch = c.poll(Duration::from_secs(5)).unwrap();
        assert!(!batch.is_empty());
        seen.extend(batch);
    }
    for k in 0..7 {
        let prefix = format!("key-{k}:");
        let nums: Vec<u32> = seen
            .iter()
            .filter_map(|m| {
                std::str::from_utf8(&m.payload)
                    .unwrap()
                    .strip_prefix(&prefix)
                    .map(|n| n.parse().unwrap())
            })
            .collect();
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order: {nums:?}"
        );
        assert_eq!(nums.len(), (0..300).filter(|i| i % 7 == k).count());
    }
}

#[test]
fn long_poll_returns_when_a_message_arrives() {
    let b = Broker::start(2, None);
    b.admin()
        .create_topic("lp", 2, Some(Durability::Fsync))
        .unwrap();
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign_all("lp").unwrap();
    c.seek(SeekTo::Latest).unwrap();
    assert!(c.poll(Duration::from_millis(200)).unwrap().is_empty());
    let addr = b.addr.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut p = Producer::connect(&addr).unwrap();
        p.send_batch("lp", QueueSelector::Queue(1), &[Record::new("late")])
            .unwrap();
    });
    let got = c.poll(Duration::from_secs(20)).unwrap();
    t.join().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"late");
}

#[test]
fn topics_are_created_described_and_deleted() {
    let b = Broker::start(2, None);
    let out = ok_stdout(&b.cli(&[
        "topic",
        "create",
        "a",
        "--queues",
        "3",
        "--durability",
        "memory",
    ]));
    assert!(out.contains("durability memory"), "{out}");
    let out = b.cli(&["topic", "create", "a", "--queues", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = b.cli(&["topic", "create", "bad name"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid topic name"));
    let out = ok_stdout(&b.cli(&["topic", "describe", "a"]));
    assert_eq!(out.lines().count(), 2 + 3, "{out}");
    ok_stdout(&b.cli_stdin(&["produce", "--topic", "a", "--queue", "2"], "x\ny\n"));
    ok_stdout(&b.cli(&["topic", "delete", "a"]));
    let out = b.cli(&["topic", "describe", "a"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown topic"));
    let out = b.cli_stdin(&["produce", "--topic", "a"], "z\n");
    assert!(!out.status.success());
    assert_eq!(acked(&out), 0);
    // A new topic of the same name starts empty.
    b.admin().create_topic("a", 3, None).unwrap();
    let d = b.admin().describe_topic("a").unwrap();
    assert!(d.offsets.iter().all(|o| o.latest == 0));
}

#[test]
fn group_offsets_commit_and_survive_a_restart() {
    let mut b = Broker::start(2, None);
    b.admin().create_topic("g", 4, None).unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    for q in 0..4 {
        let recs: Vec<Record> = (0..10).map(|i| Record::new(format!("{i}"))).collect();
        p.send_batch("g", QueueSelector::Queue(q), &recs).unwrap();
    }
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign_all("g").unwrap();
    let mut n = 0;
    while n < 40 {
        n += c.poll(Duration::from_secs(5)).unwrap().len();
    }
    c.commit("readers").unwrap();
    let mut admin = b.admin();
    assert_eq!(admin.fetch_offset("readers", "g", 2).unwrap(), Some(10));
    assert_eq!(admin.fetch_offset("others", "g", 2).unwrap(), None);
    admin.commit_offset("readers", "g", 3, 4).unwrap();
    drop(admin);
    assert!(b.stop().success());
    b.restart();
    let mut admin = b.admin();
    assert_eq!(admin.fetch_offset("readers", "g", 0).unwrap(), Some(10));
    assert_eq!(admin.fetch_offset("readers", "g", 3).unwrap(), Some(4));
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign("g", &[3]).unwrap();
    c.seek_to_committed("readers").unwrap();
    let got = c.poll(Duration::from_secs(5)).unwrap();
    assert_eq!(got[0].offset, 4);
}

#[test]
fn a_client_can_ask_for_the_shard_that_owns_its_queue() {
    let b = Broker::start(2, None);
    let info = b
        .admin()
        .create_topic("direct", 4, Some(Durability::Memory))
        .unwrap();
    let forwarded = |stats: &serde_json::Value, s: usize| {
        stats["shards"][s]["counters"]["forwarded_requests"]
            .as_u64()
            .unwrap()
    };
    let before = b.admin().stats().unwrap();
    for shard in 0..2u16 {
        let mut p = Producer::connect_to_shard(&b.addr, shard).unwrap();
        assert_eq!(
            p.shard(),
            shard,
            "the handshake is answered by the shard asked for"
        );
        for (q, qi) in info.queues.iter().enumerate() {
            if qi.shard == shard {
                let recs: Vec<Record> = (0..20)
                    .map(|i| Record::new(format!("{shard}-{q}-{i}")))
                    .collect();
                p.send_batch("direct", QueueSelector::Queue(q as u32), &recs)
                    .unwrap();
            }
        }
        let mut c = Consumer::connect_to_shard(&b.addr, shard).unwrap();
        let own: Vec<u32> = (0..4)
            .filter(|&q| info.queues[q as usize].shard == shard)
            .collect();
        c.assign("direct", &own).unwrap();
        let mut n = 0;
        while n < 20 * own.len() {
            let got = c.poll(Duration::from_secs(5)).unwrap();
            assert!(!got.is_empty());
            n += got.len();
        }
    }
    let stats = b.admin().stats().unwrap();
    for s in 0..2 {
        // (The stats request itself gathers from the other shard over the
        // mesh, but that is not a forwarded client request.)
        assert_eq!(
            forwarded(&stats, s),
            forwarded(&before, s),
            "a direct connection crossed shards: {stats}"
        );
        assert_eq!(stats["shards"][s]["counters"]["messages_in"], 40);
    }
    // A hint past the last shard is served by whichever shard accepted.
    assert!(Producer::connect_to_shard(&b.addr, 7).unwrap().shard() < 2);
}

#[test]
fn one_consumer_reads_three_thousand_queues_on_two_shards() {
    // More queues than one fetch-many group holds, owned by both shards: the
    // consumer must send one request per group and rotate within each, and
    // every message must arrive exactly once, in order per queue.
    let b = Broker::start(2, None);
    let queues = 3000u32;
    b.admin()
        .create_topic("wide", queues, Some(Durability::Memory))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    for q in (0..queues).step_by(7) {
        for i in 0..3 {
            p.send_batch(
                "wide",
                QueueSelector::Queue(q),
                &[Record::new(format!("{q}:{i}"))],
            )
            .unwrap();
        }
    }
    let expected = queues.div_ceil(7) as usize * 3;
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign_all("wide").unwrap();
    let mut seen: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    let mut total = 0;
    while total < expected {
        let got = c.poll(Duration::from_secs(10)).unwrap();
        assert!(!got.is_empty(), "stalled after {total} of {expected}");
        for m in got {
            let text = std::str::from_utf8(&m.payload).unwrap().to_owned();
            let (q, i) = text.split_once(':').unwrap();
            assert_eq!(q.parse::<u32>().unwrap(), m.queue);
            assert_eq!(u64::from(i.parse::<u32>().unwrap()), m.offset);
            seen.entry(m.queue).or_default().push(i.parse().unwrap());
            total += 1;
        }
    }
    assert!(
        c.poll(Duration::from_millis(300)).unwrap().is_empty(),
        "duplicates"
    );
    assert_eq!(seen.len(), queues.div_ceil(7) as usize);
    assert!(seen.values().all(|v| v == &[0, 1, 2]));
}

/// The write path's stages are in the stats: an `fsync` produce is timed
/// from its append to its write and from its write to its fdatasync, and
/// `keelmq stats` prints both.
#[test]
fn stats_show_where_a_durable_append_spends_its_time() {
    let b = Broker::start(1, None);
    let mut admin = b.admin();
    admin
        .create_topic("st", 1, Some(Durability::Fsync))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    for i in 0..20 {
        p.send("st", Record::new(format!("m{i}"))).unwrap();
    }
    let stats = admin.stats().unwrap();
    let sh = &stats["shards"][0];
    for k in ["append_written_latency", "written_synced_latency"] {
        let n = sh[k]["count"].as_u64().unwrap();
        assert!(
            n >= 20 || k == "written_synced_latency" && n >= 1,
            "{k}: {sh}"
        );
        assert!(sh[k]["p50_us"].as_u64().unwrap() > 0, "{k}: {sh}");
    }
    for k in ["sleeps", "sleeps_to_bound", "lost_wakeups"] {
        assert!(stats["reactor"][k].is_u64(), "{k}: {stats}");
    }
    let text = ok_stdout(&b.cli(&["stats"]));
    assert!(text.contains("append->written_p50/p99/p999_us"), "{text}");
    assert!(text.contains("written->synced_p50/p99/p999_us"), "{text}");
}
