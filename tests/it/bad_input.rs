//! Bad input gets a clear error and costs nothing else: the broker keeps
//! serving, other clients are unaffected, the log stays intact.

use crate::*;
use bytes::{Bytes, BytesMut};
use keelmq::batch::{BatchBuilder, Record};
use keelmq::client::{Consumer, ErrorCode, Producer, QueueSelector};
use keelmq::protocol::frame::encode_frame;
use keelmq::protocol::{Durability, Op, ProduceRequest, QUEUE_BY_KEY};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn raw(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one reply frame: (op, code, id, body).
fn read_reply(s: &mut TcpStream) -> (u16, u16, u64, Vec<u8>) {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_le_bytes(head[0..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 12];
    s.read_exact(&mut body).unwrap();
    (
        u16::from_le_bytes([head[4], head[5]]),
        u16::from_le_bytes([head[6], head[7]]),
        u64::from_le_bytes(head[8..16].try_into().unwrap()),
        body,
    )
}

/// True once the peer closed the connection (EOF or reset).
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

fn produce_frame(topic: &str, queue: u32, batch: Bytes, id: u64) -> BytesMut {
    let mut body = BytesMut::new();
    ProduceRequest {
        topic: topic.into(),
        queue,
        routing_key: Bytes::new(),
        batch,
    }
    .encode(&mut body);
    let mut f = BytesMut::new();
    encode_frame(&mut f, Op::Produce as u16, 1, id, &body);
    f
}

fn good_batch(payload: &str) -> Bytes {
    let mut b = BatchBuilder::new();
    b.push(&Record {
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Record::default()
    });
    b.finish()
}

#[test]
fn garbage_and_oversized_frames_leave_other_clients_working() {
    let b = Broker::start(2, None);
    b.admin()
        .create_topic("ok", 4, Some(Durability::Written))
        .unwrap();

    // A well-behaved client keeps producing the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = b.addr.clone();
    let flag = stop.clone();
    let good = std::thread::spawn(move || {
        let mut p = Producer::connect(&addr).unwrap();
        let mut sent = 0u64;
        while !flag.load(Ordering::Relaxed) {
            p.send_batch(
                "ok",
                QueueSelector::Queue((sent % 4) as u32),
                &[Record {
                    payload: Bytes::from(sent.to_string()),
                    ..Record::default()
                }],
            )
            .unwrap();
            sent += 1;
        }
        sent
    });

    // 1 MB of random bytes.
    let mut s = raw(&b.addr);
    let mut junk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for byte in junk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    let _ = s.write_all(&junk);
    assert!(closed(&mut s), "garbage connection stays open");

    // A frame announcing 4 GiB: refused by its length, before any buffering.
    let mut s = raw(&b.addr);
    let mut head = Vec::new();
    head.extend_from_slice(&u32::MAX.to_le_bytes());
    head.extend_from_slice(&(Op::Produce as u16).to_le_bytes());
    head.extend_from_slice(&1u16.to_le_bytes());
    head.extend_from_slice(&42u64.to_le_bytes());
    s.write_all(&head).unwrap();
    let (_, code, id, body) = read_reply(&mut s);
    assert_eq!(code, ErrorCode::FrameTooLarge as u16);
    assert_eq!(id, 42);
    assert!(String::from_utf8_lossy(&body).contains("frame_bytes_max"));
    assert!(closed(&mut s));

    // A frame shorter than its header.
    let mut s = raw(&b.addr);
    s.write_all(&3u32.to_le_bytes()).unwrap();
    let (_, code, _, _) = read_reply(&mut s);
    assert_eq!(code, ErrorCode::Malformed as u16);

    // On one connection: an unknown op, a malformed body, a bad CRC, an
    // oversized batch, a bad version, an unknown topic. Each gets its error
    // and the connection carries on to a good produce.
    let mut s = raw(&b.addr);
    let mut f = BytesMut::new();
    encode_frame(&mut f, 999, 1, 1, b"");
    encode_frame(&mut f, Op::Produce as u16, 1, 2, b"\x05\x00ab");
    let mut bad_crc = good_batch("hello").to_vec();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    f.extend_from_slice(&produce_frame("ok", 0, Bytes::from(bad_crc), 3));
    let big = good_batch(&"z".repeat(5 << 20));
    f.extend_from_slice(&produce_frame("ok", 0, big, 4));
    encode_frame(&mut f, Op::Metadata as u16, 9, 5, b"\x00\x00");
    f.extend_from_slice(&produce_frame("nope", QUEUE_BY_KEY, good_batch("x"), 6));
    f.extend_from_slice(&produce_frame("ok", 1, good_batch("fine"), 7));
    s.write_all(&f).unwrap();
    let mut codes = std::collections::BTreeMap::new();
    let mut replies = 0;
    while replies < 7 {
        let (_, code, id, _) = read_reply(&mut s);
        codes.insert(id, code);
        replies += 1;
    }
    assert_eq!(codes[&1], ErrorCode::UnknownOperation as u16);
    assert_eq!(codes[&2], ErrorCode::Malformed as u16);
    assert_eq!(codes[&3], ErrorCode::InvalidBatch as u16);
    assert_eq!(codes[&4], ErrorCode::BatchTooLarge as u16);
    assert_eq!(codes[&5], ErrorCode::UnsupportedVersion as u16);
    assert_eq!(codes[&6], ErrorCode::UnknownTopic as u16);
    assert_eq!(
        codes[&7],
        ErrorCode::Ok as u16,
        "the connection still works"
    );
    drop(s);

    // A client that vanishes mid-frame.
    let mut s = raw(&b.addr);
    let f = produce_frame("ok", 0, good_batch("never finished"), 1);
    s.write_all(&f[..f.len() / 2]).unwrap();
    drop(s);

    stop.store(true, Ordering::Relaxed);
    let sent = good.join().unwrap();
    assert!(sent > 0);

    // Everything the good client sent is there, nothing else.
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign_all("ok").unwrap();
    let mut got = Vec::new();
    // The good client's messages, plus the one good produce of the raw client.
    while (got.len() as u64) < sent + 1 {
        let batch = c.poll(Duration::from_secs(5)).unwrap();
        assert!(!batch.is_empty(), "only {} of {sent}", got.len());
        got.extend(
            batch
                .into_iter()
                .map(|m| String::from_utf8(m.payload.to_vec()).unwrap()),
        );
    }
    assert!(
        c.poll(Duration::from_millis(200)).unwrap().is_empty(),
        "extra messages stored"
    );
    assert_eq!(got.iter().filter(|s| *s == "fine").count(), 1);
    let mut nums: Vec<u64> = got
        .iter()
        .filter(|s| *s != "fine")
        .map(|s| s.parse().unwrap())
        .collect();
    nums.sort_unstable();
    assert!(nums.iter().copied().eq(0..sent));
}

#[test]
fn oversized_batch_within_the_frame_limit_is_refused_by_batch_limit() {
    let cfg = "[limits]\nbatch_bytes_max = 100000\nframe_bytes_max = 1000000\n";
    let b = Broker::start(1, Some(cfg));
    b.admin().create_topic("t", 1, None).unwrap();
    let mut s = raw(&b.addr);
    s.write_all(&produce_frame("t", 0, good_batch(&"q".repeat(200_000)), 8))
        .unwrap();
    let (_, code, id, body) = read_reply(&mut s);
    assert_eq!((code, id), (ErrorCode::BatchTooLarge as u16, 8));
    assert!(String::from_utf8_lossy(&body).contains("batch_bytes_max"));
    s.write_all(&produce_frame("t", 0, good_batch("small"), 9))
        .unwrap();
    let (_, code, id, _) = read_reply(&mut s);
    assert_eq!((code, id), (0, 9));
}

fn fetch_many_frame(topic: &str, queues: &[(u32, u64)], id: u64) -> BytesMut {
    let mut body = BytesMut::new();
    keelmq::protocol::FetchManyRequest {
        topic: topic.into(),
        max_bytes: 1 << 20,
        wait_ms: 0,
        filter: None,
        queues: queues.to_vec(),
    }
    .encode(&mut body);
    let mut f = BytesMut::new();
    encode_frame(&mut f, Op::FetchMany as u16, 1, id, &body);
    f
}

#[test]
fn fetch_many_refuses_bad_requests_per_request_and_per_queue() {
    let b = Broker::start(2, None);
    b.admin()
        .create_topic("fm", 4, Some(Durability::Memory))
        .unwrap();
    let d = b.admin().describe_topic("fm").unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    p.send_batch("fm", QueueSelector::Queue(0), &[Record::new("x")])
        .unwrap();
    let other = d
        .topic
        .queues
        .iter()
        .position(|q| q.shard != d.topic.queues[0].shard)
        .expect("queues on both shards") as u32;
    let mut s = raw(&b.addr);
    // No queue at all; an unknown topic: the whole request is refused.
    s.write_all(&fetch_many_frame("fm", &[], 1)).unwrap();
    assert_eq!(read_reply(&mut s).1, ErrorCode::InvalidArgument as u16);
    s.write_all(&fetch_many_frame("nope", &[(0, 0)], 2))
        .unwrap();
    assert_eq!(read_reply(&mut s).1, ErrorCode::UnknownTopic as u16);
    // Per queue: data for queue 0, an error for a queue of another shard,
    // for a queue past the topic's end and for an offset past the end.
    let req = [(0, 0), (other, 0), (99, 0), (0, 5)];
    s.write_all(&fetch_many_frame("fm", &req, 3)).unwrap();
    let (_, code, id, body) = read_reply(&mut s);
    assert_eq!((code, id), (0, 3));
    let resp = keelmq::protocol::FetchManyResponse::decode(Bytes::from(body)).unwrap();
    let by_queue: Vec<(u32, u16, usize)> = resp
        .entries
        .iter()
        .map(|e| (e.queue, e.error, e.batches.len()))
        .collect();
    assert_eq!(
        by_queue,
        vec![
            (0, 0, 1),
            (other, ErrorCode::InvalidArgument as u16, 0),
            (99, ErrorCode::UnknownQueue as u16, 0),
            (0, ErrorCode::OffsetOutOfRange as u16, 0),
        ]
    );
    // A request announcing more queues than allowed is malformed.
    let mut body = BytesMut::new();
    keelmq::protocol::codec::Writer(&mut body)
        .str("fm")
        .u32(1)
        .u32(0)
        .u32(u32::MAX);
    let mut f = BytesMut::new();
    encode_frame(&mut f, Op::FetchMany as u16, 1, 4, &body);
    s.write_all(&f).unwrap();
    assert_eq!(read_reply(&mut s).1, ErrorCode::Malformed as u16);
    // The connection and the broker still serve.
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign("fm", &[0]).unwrap();
    assert_eq!(c.poll(Duration::from_secs(5)).unwrap().len(), 1);
}
