//! Consumer groups in message delivery, against the real broker with 2
//! shards: nacks and redelivery on the backoff, dead letters with their
//! history, orderly message groups, `kill -9` during receive/ack cycles,
//! and the refusals of bad handles and arguments.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use keelmq::client::{ClientError, Delivery, ErrorCode, GroupConsumer, Producer, Record};

use super::*;

fn produce_numbered(addr: &str, topic: &str, n: u64, key_of: impl Fn(u64) -> Option<String>) {
    let mut p = Producer::connect(addr).unwrap();
    for i in 0..n {
        let mut r = Record::new(i.to_string());
        if let Some(k) = key_of(i) {
            r = r.with_key(k);
        }
        p.send(topic, r).unwrap();
    }
}

fn id_of(d: &Delivery) -> u64 {
    std::str::from_utf8(&d.message.payload)
        .unwrap()
        .parse()
        .unwrap()
}

fn create_group(b: &Broker, name: &str, settings: serde_json::Value) {
    b.admin().create_group(name, &settings).unwrap();
}

/// A cheap deterministic coin: true with probability `p` for (id, attempt).
fn coin(id: u64, attempt: u32, p: f64) -> bool {
    let mut x = id
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(attempt).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    (x % 10_000) as f64 / 10_000.0 < p
}

fn percentile(v: &mut [i64], p: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn message_delivery_with_nacks_acks_everything_once_and_dead_letters_the_poison() {
    let b = Broker::start(2, None);
    b.admin().create_topic("pay", 8, None).unwrap();
    create_group(
        &b,
        "workers",
        serde_json::json!({
            "subscriptions": [{"topic": "pay"}],
            "attempts_max": 4,
            "backoff": [20, 40, 60],
            "invisible_ms": 5000,
        }),
    );
    let n = 4000u64;
    produce_numbered(&b.addr, "pay", n, |_| None);
    let poison = |id: u64| id % 97 == 0;
    let backoff = [20i64, 40, 60];
    #[derive(Default)]
    struct Seen {
        acked: HashMap<u64, u32>,
        seen: HashSet<(u64, u32)>,
        nacked_at: HashMap<u64, (i64, u32)>,
        lateness: Vec<i64>,
    }
    let state = std::sync::Mutex::new(Seen::default());
    let expected_acks = (0..n).filter(|&i| !poison(i)).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Two members, each in its own thread, always with receives pending.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut c = GroupConsumer::connect(&b.addr, "workers", "pay").unwrap();
                loop {
                    if state.lock().unwrap().acked.len() >= expected_acks {
                        break;
                    }
                    assert!(Instant::now() < deadline, "timed out");
                    let got = c.receive(Duration::from_millis(200)).unwrap();
                    let now = keelmq::runtime::now_ms();
                    let (mut acks, mut nacks) = (Vec::new(), Vec::new());
                    {
                        let mut st = state.lock().unwrap();
                        for d in &got {
                            let id = id_of(d);
                            assert!(
                                st.seen.insert((id, d.attempt)),
                                "message {id} delivered twice at attempt {}",
                                d.attempt
                            );
                            assert!(!st.acked.contains_key(&id), "acked message {id} came back");
                            if let Some((at, attempt)) = st.nacked_at.remove(&id) {
                                assert_eq!(d.attempt, attempt + 1, "attempts count up");
                                let due = at + backoff[(attempt as usize - 1).min(2)];
                                st.lateness.push(now - due);
                            } else {
                                assert_eq!(
                                    d.attempt, 1,
                                    "message {id} first seen at attempt {}",
                                    d.attempt
                                );
                            }
                            // Non-poison messages fail at random, never a fourth time.
                            if poison(id) || (d.attempt < 4 && coin(id, d.attempt, 0.3)) {
                                nacks.push(d.handle.clone());
                                st.nacked_at.insert(id, (now, d.attempt));
                            } else {
                                acks.push((id, d.handle.clone()));
                            }
                        }
                    }
                    if !nacks.is_empty() {
                        for code in c.nack(&nacks, None).unwrap() {
                            assert_eq!(code, ErrorCode::Ok);
                        }
                    }
                    if !acks.is_empty() {
                        let handles: Vec<_> = acks.iter().map(|(_, h)| h.clone()).collect();
                        let codes = c.ack(&handles).unwrap();
                        let mut st = state.lock().unwrap();
                        for ((id, _), code) in acks.iter().zip(codes) {
                            assert_eq!(code, ErrorCode::Ok, "ack of {id}");
                            *st.acked.entry(*id).or_default() += 1;
                        }
                    }
                }
            });
        }
    });
    let Seen {
        acked,
        mut lateness,
        ..
    } = state.into_inner().unwrap();
    assert!(acked.values().all(|&c| c == 1));
    // The poison messages went to the dead letters after 4 attempts.
    let poisoned: HashSet<u64> = (0..n).filter(|&i| poison(i)).collect();
    let dlq = wait_until(Duration::from_secs(20), "dead letters", || {
        let out = b.cli(&["dlq", "list", "workers", "--json"]);
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines.len() >= poisoned.len()).then_some(lines)
    });
    let mut dead = HashSet::new();
    for m in &dlq {
        let id: u64 = m["payload"].as_str().unwrap().parse().unwrap();
        assert!(poisoned.contains(&id), "{id} was not poison");
        assert!(dead.insert(id), "{id} dead-lettered twice");
        let p = &m["properties"];
        assert_eq!(p["DLQ_ORIGIN_TOPIC"], "pay");
        assert_eq!(p["DLQ_ATTEMPTS"], "4");
        assert_eq!(p["DLQ_GROUP"], "workers");
        assert!(
            p["DLQ_ORIGIN_QUEUE"]
                .as_str()
                .unwrap()
                .parse::<u32>()
                .unwrap()
                < 8
        );
        assert!(p["DLQ_ORIGIN_OFFSET"].as_str().is_some());
        assert!(p["DLQ_ORIGIN_MESSAGE_ID"].as_str().unwrap().len() == 28);
    }
    assert_eq!(dead, poisoned);
    // Nothing more is delivered.
    let mut c = GroupConsumer::connect(&b.addr, "workers", "pay").unwrap();
    assert!(c.receive(Duration::from_millis(300)).unwrap().is_empty());
    let d = b.admin().describe_group("workers").unwrap();
    assert_eq!(d["dlq_depth"], poisoned.len() as u64);
    for q in d["queues"].as_array().unwrap() {
        assert_eq!(q["lag"], 0, "{q}");
        assert_eq!(q["in_flight"], 0, "{q}");
    }
    let (p50, p99, max) = (
        percentile(&mut lateness, 0.5),
        percentile(&mut lateness, 0.99),
        *lateness.iter().max().unwrap_or(&0),
    );
    eprintln!(
        "message delivery, 30% nacks: {} redeliveries, lateness p50 {p50} ms p99 {p99} ms max {max} ms (client clock, includes the receive loop)",
        lateness.len()
    );
    let stats = b.admin().stats().unwrap();
    for sh in stats["shards"].as_array().unwrap() {
        eprintln!(
            "shard {} redelivery lateness (broker clock, receive − due): {}; timers fired late by: {}",
            sh["shard"], sh["redelivery_lateness"], sh["redelivery_fire_lateness"]
        );
        assert!(sh["counters"]["group_redeliveries"].as_u64().unwrap() > 0);
        // The group timer fired retries and counted how late.
        assert!(sh["redelivery_fire_lateness"]["count"].as_u64().unwrap() > 0);
    }
}

#[test]
fn orderly_message_groups_ack_in_order_without_gaps_under_failures() {
    let b = Broker::start(2, None);
    b.admin().create_topic("fx", 4, None).unwrap();
    create_group(
        &b,
        "book",
        serde_json::json!({
            "subscriptions": [{"topic": "fx"}],
            "orderly": true,
            "backoff": [10],
            "invisible_ms": 3000,
        }),
    );
    let (keys, per_key) = (12u64, 60u64);
    // Payload "key:seq", keyed by key: a key's messages share one queue.
    let mut p = Producer::connect(&b.addr).unwrap();
    for s in 0..per_key {
        for k in 0..keys {
            p.send(
                "fx",
                Record::new(format!("{k}:{s}")).with_key(format!("k{k}")),
            )
            .unwrap();
        }
    }
    let mut c = GroupConsumer::connect(&b.addr, "book", "fx").unwrap();
    let mut next: BTreeMap<u64, u64> = (0..keys).map(|k| (k, 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failures = 0;
    while next.values().any(|&s| s < per_key) {
        assert!(Instant::now() < deadline, "stuck at {next:?}");
        let got = c.receive(Duration::from_millis(200)).unwrap();
        let mut in_batch: HashSet<u64> = HashSet::new();
        for d in got {
            let text = std::str::from_utf8(&d.message.payload).unwrap().to_owned();
            let (k, s) = text.split_once(':').unwrap();
            let (k, s): (u64, u64) = (k.parse().unwrap(), s.parse().unwrap());
            // One message of a group out at a time, and the next in order.
            assert!(in_batch.insert(k), "two messages of group {k} out at once");
            assert_eq!(s, next[&k], "group {k} delivered {s} out of order");
            if coin(k * 1000 + s, d.attempt, 0.25) {
                failures += 1;
                assert_eq!(c.nack(&[d.handle], None).unwrap(), vec![ErrorCode::Ok]);
            } else {
                assert_eq!(c.ack(&[d.handle]).unwrap(), vec![ErrorCode::Ok]);
                *next.get_mut(&k).unwrap() += 1;
            }
        }
    }
    assert!(failures > 0);
}

#[test]
fn acked_messages_stay_acked_and_unacked_come_back_after_kill_9() {
    let mut b = Broker::start(2, None);
    b.admin().create_topic("jobs", 4, None).unwrap();
    create_group(
        &b,
        "svc",
        serde_json::json!({
            "subscriptions": [{"topic": "jobs"}],
            "invisible_ms": 1500,
            "start": "earliest",
        }),
    );
    let n = 3000u64;
    produce_numbered(&b.addr, "jobs", n, |_| None);
    let mut acked: HashSet<u64> = HashSet::new();
    let mut delivered: HashSet<u64> = HashSet::new();
    {
        let mut c = GroupConsumer::connect(&b.addr, "svc", "jobs").unwrap();
        c.set_receive_batch(64);
        while acked.len() < 1200 {
            let got = c.receive(Duration::from_millis(500)).unwrap();
            let mut handles = Vec::new();
            let mut ids = Vec::new();
            for (i, d) in got.iter().enumerate() {
                delivered.insert(id_of(d));
                // Leave every fifth unacked: it must come back.
                if i % 5 != 4 {
                    handles.push(d.handle.clone());
                    ids.push(id_of(d));
                }
            }
            for (id, code) in ids.into_iter().zip(c.ack(&handles).unwrap()) {
                assert_eq!(code, ErrorCode::Ok);
                acked.insert(id);
            }
        }
        b.kill9();
        std::mem::forget(c); // its connection is gone with the broker
    }
    b.restart();
    let mut c = GroupConsumer::connect(&b.addr, "svc", "jobs").unwrap();
    let mut after: HashSet<u64> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while after.len() + acked.len() < n as usize {
        assert!(
            Instant::now() < deadline,
            "{} acked before the kill, {} after: messages lost",
            acked.len(),
            after.len()
        );
        let got = c.receive(Duration::from_millis(500)).unwrap();
        let handles: Vec<_> = got.iter().map(|d| d.handle.clone()).collect();
        for d in &got {
            let id = id_of(d);
            assert!(
                !acked.contains(&id),
                "message {id} was acked before the kill"
            );
            if delivered.contains(&id) && d.attempt < 2 {
                // Delivered before the kill: its attempt survived (it may
                // count one short only if the delivery was not journaled).
                assert!(d.attempt >= 1);
            }
            after.insert(id);
        }
        if !handles.is_empty() {
            c.ack(&handles).unwrap();
        }
    }
    assert_eq!(after.len() + acked.len(), n as usize);
    assert!(b.log().contains("groups:"), "{}", b.log());
}

#[test]
fn bad_handles_and_arguments_are_refused_and_change_nothing() {
    let b = Broker::start(2, None);
    b.admin().create_topic("t", 2, None).unwrap();
    create_group(
        &b,
        "g",
        serde_json::json!({"subscriptions": [{"topic": "t"}], "invisible_ms": 1000}),
    );
    produce_numbered(&b.addr, "t", 4, |_| None);
    // Unknown group and bad settings.
    let e = b
        .admin()
        .create_group(
            "h",
            &serde_json::json!({"subscriptions": [{"topic": "t"}], "bogus": 1}),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::InvalidArgument,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = b.admin().describe_group("nope").unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::UnknownGroup,
                ..
            }
        ),
        "{e}"
    );
    let e = b
        .admin()
        .create_group("g", &serde_json::json!({"subscriptions": [{"topic": "t"}]}))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::GroupExists,
                ..
            }
        ),
        "{e}"
    );

    let mut c = GroupConsumer::connect(&b.addr, "g", "t").unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        got.extend(c.receive(Duration::from_secs(2)).unwrap());
    }
    // A forged handle (a flipped byte) is refused; so is one naming a
    // shard that does not exist.
    let mut forged = got[0].handle.to_vec();
    forged[14] ^= 1;
    let codes = c.ack(&[bytes::Bytes::from(forged)]).unwrap();
    assert_eq!(codes, vec![ErrorCode::InvalidReceipt]);
    let mut other = got[0].handle.to_vec();
    other[2] = 9;
    let e = c.ack(&[bytes::Bytes::from(other)]).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::InvalidReceipt,
                ..
            }
        ),
        "{e}"
    );
    // A negative nack delay, an invisible time out of range.
    let mut conn = keelmq::client::Connection::connect(&b.addr).unwrap();
    let mut body = bytes::BytesMut::new();
    keelmq::protocol::SettleRequest {
        delay_ms: Some(-5),
        handles: vec![got[1].handle.clone()],
    }
    .encode(true, &mut body);
    let e = conn.call(keelmq::protocol::Op::Nack, &body).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::InvalidArgument,
                ..
            }
        ),
        "{e}"
    );
    let e = c
        .change_invisible(&got[2].handle, Duration::from_millis(1))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::InvalidArgument,
                ..
            }
        ),
        "{e}"
    );
    // Neither changed anything: the handles still ack.
    assert_eq!(
        c.ack(&[got[1].handle.clone(), got[2].handle.clone()])
            .unwrap(),
        vec![ErrorCode::Ok, ErrorCode::Ok]
    );
    // Ack twice: the second says already acked.
    assert_eq!(
        c.ack(&[got[0].handle.clone()]).unwrap(),
        vec![ErrorCode::Ok]
    );
    assert_eq!(
        c.ack(&[got[0].handle.clone()]).unwrap(),
        vec![ErrorCode::AlreadyAcked]
    );
    // A handle from a delivery that timed out and went to someone else is
    // stale.
    let old = got[3].handle.clone();
    let again = wait_until(Duration::from_secs(5), "redelivery", || {
        c.receive(Duration::from_millis(300))
            .unwrap()
            .into_iter()
            .find(|d| {
                d.message.offset == got[3].message.offset && d.message.queue == got[3].message.queue
            })
    });
    assert_eq!(again.attempt, 2);
    assert_eq!(c.ack(&[old]).unwrap(), vec![ErrorCode::StaleReceipt]);
    assert_eq!(c.ack(&[again.handle]).unwrap(), vec![ErrorCode::Ok]);
}

#[test]
fn queue_delivery_rebalances_under_churn_without_two_holders_or_losses() {
    use keelmq::client::GroupMember;
    use std::sync::{Arc, Mutex};
    let b = Broker::start(2, None);
    b.admin().create_topic("ticks", 16, None).unwrap();
    create_group(
        &b,
        "desk",
        serde_json::json!({
            "delivery": "queue",
            "subscriptions": [{"topic": "ticks"}],
            "session_timeout_ms": 3000,
            "start": "earliest",
        }),
    );
    let n = 100_000u64;
    // Who serves each queue now (set by the members' listeners, which run
    // before a queue is released and after it is granted).
    let holder: Arc<Mutex<HashMap<u32, u64>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let delivered: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    let handovers = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut p = Producer::connect(&b.addr).unwrap();
            let mut i = 0;
            while i < n {
                let records: Vec<Record> = (i..(i + 500).min(n))
                    .map(|j| Record::new(j.to_string()))
                    .collect();
                p.send_batch(
                    "ticks",
                    keelmq::client::QueueSelector::Queue(((i / 500) % 16) as u32),
                    &records,
                )
                .unwrap();
                i += 500;
                // About 6 s of flow, so members come and go throughout.
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        for k in 0..4u64 {
            let (holder, violations, delivered, done) = (&holder, &violations, &delivered, &done);
            let handovers = &handovers;
            let addr = b.addr.as_str();
            s.spawn(move || {
                let mut round = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    round += 1;
                    let me = k * 1_000_000 + round;
                    let mut m =
                        GroupMember::connect(addr, "desk", "ticks", &format!("m{k}-{round}"))
                            .unwrap();
                    let (h, v) = (holder.clone(), violations.clone());
                    handovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    m.set_listener(Box::new(move |q, on| {
                        let mut h = h.lock().unwrap();
                        if on {
                            if let Some(other) = h.insert(q, me) {
                                v.lock()
                                    .unwrap()
                                    .push(format!("queue {q}: {me} took it from {other}"));
                            }
                        } else if h.get(&q) == Some(&me) {
                            h.remove(&q);
                        }
                    }));
                    // Stay a random while (0.3 to 1.5 s), then leave.
                    let stay = Duration::from_millis(300 + (me * 7919) % 1200);
                    let until = Instant::now() + stay;
                    while Instant::now() < until && !done.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        let got = m.poll(Duration::from_millis(50)).unwrap();
                        {
                            let h = holder.lock().unwrap();
                            let mut d = delivered.lock().unwrap();
                            for msg in &got {
                                if h.get(&msg.queue) != Some(&me) {
                                    violations.lock().unwrap().push(format!(
                                        "{me} got queue {} it does not hold",
                                        msg.queue
                                    ));
                                }
                                let id: u64 =
                                    std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
                                *d.entry(id).or_default() += 1;
                            }
                            if d.len() as u64 >= n {
                                done.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        m.commit().unwrap();
                    }
                    m.close().unwrap();
                    std::thread::sleep(Duration::from_millis((me * 31) % 200));
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(150);
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            if Instant::now() > deadline {
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let v = violations.lock().unwrap();
    assert!(
        v.is_empty(),
        "{} violations, first: {:?}",
        v.len(),
        &v[..v.len().min(5)]
    );
    let d = delivered.lock().unwrap();
    assert_eq!(d.len() as u64, n, "messages delivered: {} of {n}", d.len());
    let dups = d.values().filter(|&&c| c > 1).count();
    let joins = handovers.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("queue delivery under churn: {n} messages, {joins} joins, {dups} delivered again after a clean handover");
    assert!(joins >= 12, "only {joins} joins: not much churn");
    assert_eq!(
        dups, 0,
        "a clean leave commits first: nothing is delivered twice"
    );
}

#[test]
fn broadcast_delivers_everything_to_every_instance_and_tracks_each_offset() {
    use keelmq::client::GroupMember;
    let b = Broker::start(2, None);
    b.admin().create_topic("news", 4, None).unwrap();
    create_group(
        &b,
        "screens",
        serde_json::json!({
            "mode": "broadcast",
            "delivery": "queue",
            "subscriptions": [{"topic": "news"}],
            "start": "earliest",
        }),
    );
    let n = 2000u64;
    produce_numbered(&b.addr, "news", n, |_| None);
    let mut members: Vec<GroupMember> = (0..3)
        .map(|i| GroupMember::connect(&b.addr, "screens", "news", &format!("screen-{i}")).unwrap())
        .collect();
    // Instance 0 reads half, leaves and comes back: it resumes where it
    // committed, not from the start.
    let mut got: Vec<HashSet<u64>> = vec![HashSet::new(); 3];
    for (i, m) in members.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = if i == 0 { n / 2 } else { n };
        while (got[i].len() as u64) < want {
            assert!(Instant::now() < deadline);
            for msg in m.poll(Duration::from_millis(100)).unwrap() {
                let id: u64 = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
                got[i].insert(id);
            }
        }
        m.commit().unwrap();
    }
    let lag_of = |instance: &str| -> u64 {
        let d = b.admin().describe_group("screens").unwrap();
        d["queues"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|q| q["instance"] == instance)
            .map(|q| q["lag"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(lag_of("screen-1"), 0);
    assert_eq!(lag_of("screen-2"), 0);
    let lag0 = lag_of("screen-0");
    assert!(lag0 > 0 && lag0 <= n / 2 + 100, "screen-0 lag {lag0}");
    drop(members.remove(0));
    let mut again = GroupMember::connect(&b.addr, "screens", "news", "screen-0").unwrap();
    let mut second = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got[0].len() + second.len() < n as usize {
        assert!(Instant::now() < deadline);
        for msg in again.poll(Duration::from_millis(100)).unwrap() {
            let id: u64 = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
            assert!(
                !got[0].contains(&id),
                "screen-0 saw {id} again after its commit"
            );
            second.insert(id);
        }
    }
    assert_eq!(got[1].len() as u64, n);
    assert_eq!(got[2].len() as u64, n);
}

#[test]
fn commits_are_fenced_by_grant_epoch_and_stale_members_must_rejoin() {
    use bytes::BytesMut;
    use keelmq::client::Connection;
    use keelmq::protocol::*;
    let b = Broker::start(2, None);
    let topic = b.admin().create_topic("q", 1, None).unwrap();
    let queue_id = topic.queues[0].queue_id;
    create_group(
        &b,
        "f",
        serde_json::json!({"delivery": "queue", "subscriptions": [{"topic": "q"}]}),
    );
    let mut c = Connection::connect(&b.addr).unwrap();
    let call = |c: &mut Connection, op: Op, f: &dyn Fn(&mut BytesMut)| {
        let mut body = BytesMut::new();
        f(&mut body);
        c.call(op, &body)
    };
    let join = |c: &mut Connection, who: &str| {
        AssignmentResponse::decode(
            call(c, Op::Join, &|b| {
                JoinRequest {
                    group: "f".into(),
                    instance: who.into(),
                }
                .encode(b)
            })
            .unwrap(),
        )
        .unwrap()
    };
    let commit = |c: &mut Connection, member: u64, epoch: u64, offset: u64| {
        call(c, Op::GroupCommit, &|b| {
            GroupCommitRequest {
                group: "f".into(),
                queue_id,
                member,
                epoch,
                instance: String::new(),
                offset,
            }
            .encode(b)
        })
    };
    let a = join(&mut c, "a");
    assert_eq!(a.granted.len(), 1, "{a:?}");
    let ea = a.granted[0].epoch;
    commit(&mut c, a.member, ea, 5).unwrap();
    // A leaves; B gets the queue under a new epoch.
    call(&mut c, Op::Leave, &|b| {
        HeartbeatRequest {
            group: "f".into(),
            member: a.member,
            released: vec![],
        }
        .encode(b)
    })
    .unwrap();
    let bm = join(&mut c, "b");
    assert_eq!(bm.granted.len(), 1);
    let eb = bm.granted[0].epoch;
    assert!(eb > ea);
    // A's late commit is refused; B's is taken.
    let e = commit(&mut c, a.member, ea, 9).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::StaleGeneration,
                ..
            }
        ),
        "{e}"
    );
    commit(&mut c, bm.member, eb, 7).unwrap();
    let got = call(&mut c, Op::GroupFetchOffset, &|b| {
        GroupCommitRequest {
            group: "f".into(),
            queue_id,
            member: 0,
            epoch: 0,
            instance: String::new(),
            offset: 0,
        }
        .encode(b)
    })
    .unwrap();
    assert_eq!(decode_opt_u64(got).unwrap(), Some(7));
    // A heartbeat from the member that left says: join again.
    let e = call(&mut c, Op::Heartbeat, &|b| {
        HeartbeatRequest {
            group: "f".into(),
            member: a.member,
            released: vec![],
        }
        .encode(b)
    })
    .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::StaleGeneration,
                ..
            }
        ),
        "{e}"
    );
    // An operator reset is refused while B holds the queue.
    let e = b
        .admin()
        .reset_group_offset("f", queue_id, "", 0)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Broker {
                code: ErrorCode::InvalidArgument,
                ..
            }
        ),
        "{e}"
    );
    let d = b.admin().describe_group("f").unwrap();
    assert_eq!(d["members"].as_array().unwrap().len(), 1, "{d}");
}

#[test]
fn restart_replays_the_journal_since_the_last_generation_not_its_history() {
    let mut b = Broker::start(1, None);
    b.admin().create_topic("h", 4, None).unwrap();
    create_group(
        &b,
        "hist",
        serde_json::json!({"subscriptions": [{"topic": "h"}], "start": "earliest"}),
    );
    // 150,000 deliveries and acks: 300,000 journal records (~23 MB), past
    // the 16 MiB after which a generation is written.
    let n = 150_000u64;
    let mut p = Producer::connect(&b.addr).unwrap();
    let records: Vec<Record> = (0..1000).map(|i| Record::new(format!("{i}"))).collect();
    for i in 0..n / 1000 {
        p.send_batch(
            "h",
            keelmq::client::QueueSelector::Queue((i % 4) as u32),
            &records,
        )
        .unwrap();
    }
    let mut c = GroupConsumer::connect(&b.addr, "hist", "h").unwrap();
    c.set_receive_batch(4096);
    let mut acked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < n {
        assert!(Instant::now() < deadline, "acked {acked}");
        let got = c.receive(Duration::from_millis(500)).unwrap();
        let handles: Vec<_> = got.iter().map(|d| d.handle.clone()).collect();
        if !handles.is_empty() {
            c.ack_nowait(&handles).unwrap();
            acked += handles.len() as u64;
        }
    }
    c.close().unwrap();
    assert_eq!(c.refused().0, 0);
    drop(c);
    b.kill9();
    b.restart();
    let log = b.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("journal records replayed"))
        .unwrap()
        .to_owned();
    let replayed: u64 = line
        .split("offsets, ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"));
    eprintln!("restart after {} journal records: {line}", 2 * n);
    assert!(
        replayed < n,
        "replayed {replayed} of {} records: the last generation did not bound the replay",
        2 * n
    );
    // And the state is right: nothing comes back.
    let mut c = GroupConsumer::connect(&b.addr, "hist", "h").unwrap();
    assert!(c.receive(Duration::from_millis(500)).unwrap().is_empty());
}

/// Receives and acks until `n` distinct messages came, within 20 s.
fn receive_and_ack(c: &mut GroupConsumer, n: usize, when: &str) {
    let mut got = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        assert!(Instant::now() < deadline, "got {} of {n} {when}", got.len());
        let ds = c.receive(Duration::from_millis(200)).unwrap();
        got.extend(ds.iter().map(id_of));
        let handles: Vec<_> = ds.iter().map(|d| d.handle.clone()).collect();
        if !handles.is_empty() {
            c.ack(&handles).unwrap();
        }
    }
}

/// The leases pushed to subscription `sub` until `until`.
fn pushed_leases(
    conn: &mut keelmq::client::Connection,
    sub: u64,
    until: Instant,
) -> Vec<keelmq::protocol::LeaseInfo> {
    use keelmq::client::Incoming;
    let mut out = Vec::new();
    while let Some(f) = conn.recv_incoming(Some(until)).unwrap() {
        if let Incoming::Push {
            subscription,
            code,
            body,
        } = f
        {
            assert_eq!(subscription, sub);
            assert_eq!(code, 0, "push frame with an error");
            let batch = keelmq::protocol::PushBatch::decode(body).unwrap();
            out.extend(batch.response.leases);
        }
    }
    out
}

#[test]
fn push_streams_within_credit_and_hands_back_what_a_gone_subscriber_leased() {
    use bytes::BytesMut;
    use keelmq::client::Connection;
    use keelmq::protocol::*;
    let b = Broker::start(2, None);
    b.admin().create_topic("ticks", 8, None).unwrap();
    create_group(
        &b,
        "pushers",
        serde_json::json!({
            "subscriptions": [{"topic": "ticks"}],
            // A message left leased would not come back within the test.
            "invisible_ms": 120_000,
        }),
    );
    let subscribe = |conn: &mut Connection, group: &str, credit: u32| {
        let mut body = BytesMut::new();
        SubscribeRequest {
            group: group.into(),
            topic: "ticks".into(),
            invisible_ms: 0,
            credit_messages: credit,
            credit_bytes: 1 << 20,
        }
        .encode(&mut body);
        conn.call(Op::Subscribe, &body)
    };
    let mut raw = Connection::connect(&b.addr).unwrap();
    // Refusals: an unknown group, credit for no subscription.
    match subscribe(&mut raw, "nobody", 10) {
        Err(ClientError::Broker { code, .. }) => assert_eq!(code, ErrorCode::UnknownGroup),
        other => panic!("subscribe to an unknown group: {other:?}"),
    }
    let credit = |conn: &mut Connection, sub: u64, messages: u32| {
        let mut body = BytesMut::new();
        CreditRequest {
            subscription: sub,
            messages,
            bytes: 1 << 20,
        }
        .encode(&mut body);
        conn.call(Op::Credit, &body)
    };
    match credit(&mut raw, 999, 5) {
        Err(ClientError::Broker { code, .. }) => assert_eq!(code, ErrorCode::InvalidArgument),
        other => panic!("credit for no subscription: {other:?}"),
    }
    let resp = SubscribeResponse::decode(subscribe(&mut raw, "pushers", 10).unwrap()).unwrap();
    assert_eq!(
        resp.shards,
        vec![0, 1],
        "the topic's queues are on both shards"
    );
    let sub = resp.subscription;
    produce_numbered(&b.addr, "ticks", 100, |_| None);
    // Exactly the credit arrives, and no more while none is granted.
    let first = pushed_leases(&mut raw, sub, Instant::now() + Duration::from_millis(1500));
    assert_eq!(first.len(), 10, "pushed beyond (or short of) the credit");
    credit(&mut raw, sub, 15).unwrap();
    let second = pushed_leases(&mut raw, sub, Instant::now() + Duration::from_millis(1500));
    assert_eq!(second.len(), 15, "after 15 more credit");
    let mut body = BytesMut::new();
    encode_u64(&mut body, sub);
    raw.call(Op::Unsubscribe, &body).unwrap();
    // No push after the unsubscribe's reply.
    credit(&mut raw, sub, 15).unwrap_err();
    assert!(pushed_leases(&mut raw, sub, Instant::now() + Duration::from_millis(300)).is_empty());
    // Hand the 25 back (any connection may: a handle names its shard).
    let mut helper = GroupConsumer::connect(&b.addr, "pushers", "ticks").unwrap();
    let handles: Vec<_> = first
        .iter()
        .chain(&second)
        .map(|l| l.handle.clone())
        .collect();
    let codes = helper.nack(&handles, Some(Duration::ZERO)).unwrap();
    assert!(codes.iter().all(|c| *c == ErrorCode::Ok), "{codes:?}");
    drop(helper);

    // A push consumer gets all 100 once (25 of them a second time), acks.
    let mut c = GroupConsumer::connect(&b.addr, "pushers", "ticks").unwrap();
    c.subscribe(16, 1 << 20).unwrap();
    let nacked: HashSet<u64> = first
        .iter()
        .chain(&second)
        .map(|l| l.offset * 1000 + u64::from(l.queue))
        .collect();
    let mut acked: HashMap<u64, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < 100 {
        assert!(Instant::now() < deadline, "pushed {} of 100", acked.len());
        let got = c.receive(Duration::from_millis(200)).unwrap();
        for d in &got {
            let again = nacked.contains(&(d.message.offset * 1000 + u64::from(d.message.queue)));
            assert_eq!(
                d.attempt,
                if again { 2 } else { 1 },
                "attempt of {}",
                id_of(d)
            );
            assert!(
                acked.insert(id_of(d), d.attempt).is_none(),
                "{} pushed twice",
                id_of(d)
            );
        }
        let handles: Vec<_> = got.iter().map(|d| d.handle.clone()).collect();
        if !handles.is_empty() {
            assert!(c.ack(&handles).unwrap().iter().all(|c| *c == ErrorCode::Ok));
        }
    }
    drop(c);

    // A subscriber that vanishes: whatever its subscription leased after
    // it went is handed back at once, so a new consumer gets everything
    // long before the two-minute invisible time.
    let mut gone = Connection::connect(&b.addr).unwrap();
    let gone_sub = SubscribeResponse::decode(subscribe(&mut gone, "pushers", 1000).unwrap())
        .unwrap()
        .subscription;
    assert!(gone_sub > 0);
    drop(gone);
    produce_numbered(&b.addr, "ticks", 200, |_| None);
    let mut c = GroupConsumer::connect(&b.addr, "pushers", "ticks").unwrap();
    c.subscribe(64, 1 << 20).unwrap();
    receive_and_ack(&mut c, 200, "after a subscriber vanished");
    // Closing with messages buffered hands them back too.
    produce_numbered(&b.addr, "ticks", 50, |_| None);
    std::thread::sleep(Duration::from_millis(300));
    c.close().unwrap();
    drop(c);
    let mut d = GroupConsumer::connect(&b.addr, "pushers", "ticks").unwrap();
    receive_and_ack(&mut d, 50, "after a close");
}

/// In flight (leased, not acked) over all queues of `group`.
fn in_flight(b: &Broker, group: &str) -> u64 {
    let d = b.admin().describe_group(group).unwrap();
    d["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["in_flight"].as_u64().unwrap())
        .sum()
}

#[test]
fn acks_held_by_the_linger_go_out_when_due_and_at_close() {
    let b = Broker::start(2, None);
    b.admin().create_topic("l", 2, None).unwrap();
    create_group(
        &b,
        "lg",
        serde_json::json!({"subscriptions": [{"topic": "l"}]}),
    );
    produce_numbered(&b.addr, "l", 6, |_| None);
    let mut c = GroupConsumer::connect(&b.addr, "lg", "l").unwrap();
    c.set_ack_linger(Duration::from_millis(800));
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 6 {
        assert!(Instant::now() < deadline, "received {}", got.len());
        got.extend(c.receive(Duration::from_millis(200)).unwrap());
    }
    let handles: Vec<_> = got.iter().map(|d| d.handle.clone()).collect();
    let t0 = Instant::now();
    c.ack_nowait(&handles[..3]).unwrap();
    // Held: the broker has not seen them.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(in_flight(&b, "lg"), 6, "acks sent before their linger");
    // A receive that would wait longer sends them when due, and goes on
    // waiting.
    assert!(c.receive(Duration::from_secs(2)).unwrap().is_empty());
    assert!(t0.elapsed() >= Duration::from_secs(2), "the receive waited");
    wait_until(Duration::from_secs(5), "lingering acks applied", || {
        (in_flight(&b, "lg") == 3).then_some(())
    });
    // Close sends what is still held.
    c.ack_nowait(&handles[3..]).unwrap();
    assert_eq!(in_flight(&b, "lg"), 3);
    c.close().unwrap();
    assert_eq!(c.refused().0, 0);
    wait_until(Duration::from_secs(5), "acks held at close applied", || {
        (in_flight(&b, "lg") == 0).then_some(())
    });
    // With no linger, an ack goes at once.
    produce_numbered(&b.addr, "l", 1, |_| None);
    let mut c = GroupConsumer::connect(&b.addr, "lg", "l").unwrap();
    c.set_ack_linger(Duration::ZERO);
    let d = wait_until(Duration::from_secs(10), "the seventh message", || {
        c.receive(Duration::from_millis(200)).unwrap().pop()
    });
    c.ack_nowait(&[d.handle]).unwrap();
    wait_until(Duration::from_secs(5), "an ack with no linger", || {
        (in_flight(&b, "lg") == 0).then_some(())
    });
    // A nack without waiting: the message comes back at attempt 2.
    produce_numbered(&b.addr, "l", 1, |_| None);
    let d = wait_until(Duration::from_secs(10), "the eighth message", || {
        c.receive(Duration::from_millis(200)).unwrap().pop()
    });
    assert_eq!(d.attempt, 1);
    c.nack_nowait(&[d.handle], Some(Duration::ZERO)).unwrap();
    let again = wait_until(Duration::from_secs(10), "the nacked message again", || {
        c.receive(Duration::from_millis(200)).unwrap().pop()
    });
    assert_eq!(again.attempt, 2);
    assert_eq!(again.message.payload, d.message.payload);
    c.ack(&[again.handle]).unwrap();
    assert_eq!(c.refused().0, 0);
}

#[test]
fn large_receives_across_batch_boundaries_deliver_each_message_once() {
    // Batches of 1 to 700 records into 4 queues while a push consumer
    // (4096 messages of credit, group "bp") and a pull consumer (4096 per
    // receive, group "bl") take them: every lease must name a record of
    // its batch (the client checks) and each group must get every message
    // exactly once.
    let b = Broker::start(2, None);
    b.admin().create_topic("big", 4, None).unwrap();
    for g in ["bp", "bl"] {
        create_group(
            &b,
            g,
            serde_json::json!({"subscriptions": [{"topic": "big"}]}),
        );
    }
    let addr = b.addr.clone();
    let producer = std::thread::spawn(move || {
        let mut p = Producer::connect(&addr).unwrap();
        let (mut next, mut x) = (0u64, 0x2545_F491_4F6C_DD1Du64);
        while next < 120_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = 1 + x % 700;
            let records: Vec<Record> = (next..next + n)
                .map(|i| Record::new(i.to_string()))
                .collect();
            let q = (x >> 32) as u32 % 4;
            p.send_batch("big", keelmq::client::QueueSelector::Queue(q), &records)
                .unwrap();
            next += n;
        }
        next
    });
    let total = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for (group, push) in [("bp", true), ("bl", false)] {
            let (addr, total) = (&b.addr, &total);
            s.spawn(move || {
                let mut c = GroupConsumer::connect(addr, group, "big").unwrap();
                c.set_receive_batch(4096);
                if push {
                    c.subscribe(4096, 16 << 20).unwrap();
                }
                let mut seen = HashMap::<u64, u32>::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let t = total.load(std::sync::atomic::Ordering::Relaxed);
                    if t > 0 && seen.len() as u64 >= t {
                        break;
                    }
                    assert!(Instant::now() < deadline, "{group}: got {}", seen.len());
                    let ds = c.receive(Duration::from_millis(100)).unwrap();
                    for d in &ds {
                        assert_eq!(d.attempt, 1, "{group}: message {} redelivered", id_of(d));
                        *seen.entry(id_of(d)).or_default() += 1;
                    }
                    let handles: Vec<_> = ds.iter().map(|d| d.handle.clone()).collect();
                    c.ack_nowait(&handles).unwrap();
                }
                c.close().unwrap();
                assert_eq!(c.refused().0, 0);
                let t = total.load(std::sync::atomic::Ordering::Relaxed);
                assert_eq!(seen.len() as u64, t, "{group}");
                assert!(
                    seen.values().all(|&n| n == 1),
                    "{group}: a message came twice"
                );
                assert!((0..t).all(|i| seen.contains_key(&i)), "{group}");
            });
        }
        let n = producer.join().unwrap();
        total.store(n, std::sync::atomic::Ordering::Relaxed);
    });
}

#[test]
fn retries_go_before_a_backlog_of_new_messages_in_other_queues() {
    // A consumer behind on new messages in every queue still gets a
    // retry as soon as it is due: a receive takes every queue's due
    // messages before any queue's new ones (its queues are visited from a
    // rotating start, so without that the retry would wait for its
    // queue's turn).
    use bytes::{Bytes, BytesMut};
    use keelmq::client::Connection;
    use keelmq::protocol::{Op, ReceiveRequest, ReceiveResponse, SettleRequest};
    let b = Broker::start(1, None);
    b.admin().create_topic("rb", 8, None).unwrap();
    create_group(
        &b,
        "rbg",
        serde_json::json!({"subscriptions": [{"topic": "rb"}]}),
    );
    let mut conn = Connection::connect(&b.addr).unwrap();
    let receive = |conn: &mut Connection, max: u32| {
        let mut body = BytesMut::new();
        ReceiveRequest {
            group: "rbg".into(),
            topic: "rb".into(),
            shard: 0,
            max_messages: max,
            invisible_ms: 0,
            wait_ms: 0,
        }
        .encode(&mut body);
        ReceiveResponse::decode(conn.call(Op::Receive, &body).unwrap()).unwrap()
    };
    let nack = |conn: &mut Connection, handle: Bytes| {
        let mut body = BytesMut::new();
        SettleRequest {
            delay_ms: Some(200),
            handles: vec![handle],
        }
        .encode(true, &mut body);
        conn.call(Op::Nack, &body).unwrap();
    };
    produce_numbered(&b.addr, "rb", 1, |_| None);
    let first = receive(&mut conn, 1);
    assert_eq!(first.leases.len(), 1);
    let (queue, offset) = (first.leases[0].queue, first.leases[0].offset);
    nack(&mut conn, first.leases[0].handle.clone());
    // 200 new messages in every queue.
    produce_numbered(&b.addr, "rb", 1600, |_| None);
    for round in 0..3u32 {
        std::thread::sleep(Duration::from_millis(300));
        let got = receive(&mut conn, 4);
        assert_eq!(got.leases.len(), 4, "round {round}");
        let retry = got
            .leases
            .iter()
            .find(|l| l.queue == queue && l.offset == offset)
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: the due retry (queue {queue}, offset {offset}) was not \
                     in the receive: {:?}",
                    got.leases
                        .iter()
                        .map(|l| (l.queue, l.offset, l.attempt))
                        .collect::<Vec<_>>()
                )
            });
        assert_eq!(retry.attempt, round + 2);
        assert!(
            got.leases.iter().filter(|l| l.attempt > 1).count() == 1,
            "only the retry is a redelivery"
        );
        nack(&mut conn, retry.handle.clone());
    }
}
