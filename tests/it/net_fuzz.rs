//! Random and mutated frames thrown at the real broker from several
//! connections, while a canary client produces at `fsync` and reads back
//! (nothing lost, nothing extra, in order) and fresh connections keep being
//! answered within 100 ms. `KEELMQ_NET_FUZZ_SECS` runs it longer.

use crate::*;
use bytes::{Bytes, BytesMut};
use keelmq::batch::{BatchBuilder, Record};
use keelmq::client::{Consumer, Producer, QueueSelector, SeekTo};
use keelmq::protocol::frame::encode_frame;
use keelmq::protocol::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A valid request of every kind, as a fuzzer's starting point.
fn seed_frames() -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut push = |op: Op, f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        f(&mut b);
        out.push((op as u16, b.to_vec()));
    };
    let batch = {
        let mut bb = BatchBuilder::new();
        bb.push(
            &Record::new("fuzz")
                .with_key("k")
                .with_tag("t")
                .with_property("a", "b"),
        );
        bb.finish()
    };
    push(Op::Handshake, &|b| {
        HandshakeRequest {
            client: "fuzz".into(),
            shard: ANY_SHARD,
        }
        .encode(b)
    });
    push(Op::Metadata, &|b| MetadataRequest::default().encode(b));
    push(Op::Produce, &|b| {
        ProduceRequest {
            topic: "junk".into(),
            queue: QUEUE_BY_KEY,
            routing_key: Bytes::from_static(b"k"),
            batch: batch.clone(),
        }
        .encode(b)
    });
    push(Op::Fetch, &|b| {
        FetchRequest {
            topic: "junk".into(),
            queue: 0,
            offset: 0,
            max_bytes: 1 << 20,
            wait_ms: 5,
            filter: None,
        }
        .encode(b)
    });
    push(Op::FetchMany, &|b| {
        FetchManyRequest {
            topic: "junk".into(),
            max_bytes: 1 << 20,
            wait_ms: 5,
            filter: None,
            queues: vec![(0, 0), (1, 0)],
        }
        .encode(b)
    });
    push(Op::ListOffsets, &|b| {
        ListOffsetsRequest {
            topic: "junk".into(),
            queue: 1,
            spec: OffsetSpec::Timestamp(5),
        }
        .encode(b)
    });
    push(Op::CommitOffset, &|b| {
        GroupOffsetRequest {
            group: "g".into(),
            topic: "junk".into(),
            queue: 0,
            offset: Some(3),
        }
        .encode(b)
    });
    push(Op::GetMessage, &|b| b.extend_from_slice(&[0u8; 14]));
    push(Op::DescribeTopic, &|b| {
        TopicRequest {
            name: "junk".into(),
        }
        .encode(b)
    });
    push(Op::Stats, &|_| {});
    out
}

/// One fuzz connection's bytes: mutated valid frames, random frames, bad
/// lengths, truncations.
fn fuzz_bytes(rng: &mut Rng, seeds: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for _ in 0..1 + rng.below(20) {
        let (op, body) = &seeds[rng.below(seeds.len() as u64) as usize];
        let mut body = body.clone();
        let mut op = *op;
        match rng.below(6) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    if !body.is_empty() {
                        let i = rng.below(body.len() as u64) as usize;
                        body[i] ^= 1 << rng.below(8);
                    }
                }
            }
            1 => body.truncate(rng.below(body.len() as u64 + 1) as usize),
            2 => body.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            3 => op = rng.below(20) as u16,
            4 => body = (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
            _ => {}
        }
        encode_frame(&mut out, op, 1 + rng.below(2) as u16, rng.next(), &body);
    }
    let mut v = out.to_vec();
    match rng.below(8) {
        // A length field that lies (too long, too short, huge).
        0 if v.len() >= 4 => v[..4].copy_from_slice(&(rng.next() as u32).to_le_bytes()),
        // Cut mid-frame.
        1 => v.truncate(rng.below(v.len() as u64 + 1) as usize),
        // Pure noise.
        2 => v = (0..rng.below(4096)).map(|_| rng.next() as u8).collect(),
        _ => {}
    }
    v
}

#[test]
fn random_and_mutated_frames_cost_the_canary_nothing() {
    let secs: u64 = std::env::var("KEELMQ_NET_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let b = Broker::start(2, Some("[limits]\nconnection_first_frame_ms_max = 500\n"));
    b.admin()
        .create_topic("canary", 2, Some(Durability::Fsync))
        .unwrap();
    b.admin()
        .create_topic("junk", 2, Some(Durability::Memory))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let fuzzers: Vec<_> = (0..3u64)
        .map(|t| {
            let (addr, stop) = (b.addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let seeds = seed_frames();
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                let mut conns = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(&addr) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                    let _ = s.write_all(&fuzz_bytes(&mut rng, &seeds));
                    let mut sink = [0u8; 4096];
                    let _ = s.read(&mut sink);
                    conns += 1;
                }
                conns
            })
        })
        .collect();
    // The canary: produce and read back, the whole time.
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut p = Producer::connect(&b.addr).unwrap();
    let mut acked = Vec::new();
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        p.send_batch(
            "canary",
            QueueSelector::Queue((n % 2) as u32),
            &[Record::new(n.to_string())],
        )
        .unwrap();
        acked.push(n);
        n += 1;
        if n % 50 == 0 {
            let t0 = Instant::now();
            let mut a = keelmq::client::Admin::connect(&b.addr).unwrap();
            a.list_topics().unwrap();
            latencies.push(t0.elapsed());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let fuzzed: u64 = fuzzers.into_iter().map(|t| t.join().unwrap()).sum();
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign_all("canary").unwrap();
    c.seek(SeekTo::Earliest).unwrap();
    let mut got = Vec::new();
    while (got.len() as u64) < n {
        let batch = c.poll(Duration::from_secs(5)).unwrap();
        assert!(!batch.is_empty(), "canary read back {} of {n}", got.len());
        got.extend(batch.iter().map(|m| {
            (
                m.queue,
                std::str::from_utf8(&m.payload)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            )
        }));
    }
    assert!(
        c.poll(Duration::from_millis(300)).unwrap().is_empty(),
        "extra canary messages"
    );
    for q in 0..2u32 {
        let mine: Vec<u64> = got
            .iter()
            .filter(|(qq, _)| *qq == q)
            .map(|(_, v)| *v)
            .collect();
        let sent: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|v| v % 2 == u64::from(q))
            .collect();
        assert_eq!(mine, sent, "queue {q}: lost, duplicated or reordered");
    }
    latencies.sort();
    let slow = latencies
        .iter()
        .filter(|l| **l > Duration::from_millis(100))
        .count();
    eprintln!(
        "net fuzz: {fuzzed} fuzz connections, {n} canary messages, fresh-connection p50 {:?} max {:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    assert!(fuzzed > 100, "the fuzzers barely ran: {fuzzed}");
    assert_eq!(slow, 0, "fresh connections over 100 ms: {latencies:?}");
    // The broker is still well: stats answer, shards hold no failure.
    let s = b.admin().stats().unwrap();
    for sh in s["shards"].as_array().unwrap() {
        assert!(sh["log"]["failed"].is_null(), "{sh}");
    }
}
