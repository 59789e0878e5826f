//! Forged input is never trusted: a producer's bytes are never taken for a
//! stored batch, not by a message lookup aimed inside a payload, not by
//! recovery looking for the next batch after damaged bytes.

use crate::*;
use bytes::{Bytes, BytesMut};
use keelmq::batch::{BatchBuilder, Record, BATCH_MAGIC};
use keelmq::client::{Consumer, ErrorCode, MessageId, Producer, QueueSelector, SeekTo};
use keelmq::protocol::frame::encode_frame;
use keelmq::protocol::{Durability, Op};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Offset of the payload of a batch's only record with no key, tag or
/// property: 80 header bytes, then length, flags, priority, property count,
/// two timestamps and the payload length.
const PAYLOAD_AT: u64 = 80 + 4 + 1 + 1 + 2 + 8 + 8 + 4;

/// A batch header claiming `len` bytes, with the header CRC an attacker
/// can compute (the CRC of bytes 4..48, as the format used before the MAC).
fn fake_header(len: u32, queue_id: u32, base_offset: u64, position: u64) -> Vec<u8> {
    let mut h = vec![0u8; 80];
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..10].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    h[10] = 1;
    h[12..16].copy_from_slice(&queue_id.to_le_bytes());
    h[16..24].copy_from_slice(&base_offset.to_le_bytes());
    h[32..40].copy_from_slice(&position.to_le_bytes());
    let crc = crc32fast::hash(&h[4..48]);
    h[0..4].copy_from_slice(&crc.to_le_bytes());
    h
}

fn read_reply(s: &mut TcpStream) -> (u16, u64) {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_le_bytes(head[0..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 12];
    s.read_exact(&mut body).unwrap();
    (
        u16::from_le_bytes([head[6], head[7]]),
        u64::from_le_bytes(head[8..16].try_into().unwrap()),
    )
}

#[test]
fn a_forged_message_id_costs_microseconds_and_no_memory() {
    let b = Broker::start(1, Some("[storage]\ntail_cache_bytes_max = 4096\n"));
    b.admin()
        .create_topic("f", 1, Some(Durability::Fsync))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    // A payload that looks like a stored batch of 512 MiB.
    let holder = p
        .send_batch(
            "f",
            QueueSelector::Queue(0),
            &[Record::new(fake_header(512 << 20, 1, 0, 0))],
        )
        .unwrap();
    // Push it out of the tail cache, so lookups go to the disk.
    for i in 0..50 {
        p.send("f", Record::new(format!("filler {i} {}", "x".repeat(500))))
            .unwrap();
    }
    let forged = MessageId {
        position: keelmq::ids::LogPosition(holder[0].id.position.0 + PAYLOAD_AT),
        ..holder[0].id
    };
    let rss_before = b.rss_bytes();
    let mut s = TcpStream::connect(&b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut frames = BytesMut::new();
    for id in 0..256u64 {
        encode_frame(
            &mut frames,
            Op::GetMessage as u16,
            1,
            id,
            &forged.to_bytes(),
        );
    }
    let t0 = Instant::now();
    s.write_all(&frames).unwrap();
    // While they are served, a fresh connection is answered at once.
    let t1 = Instant::now();
    let mut other = keelmq::client::Admin::connect(&b.addr).unwrap();
    other.list_topics().unwrap();
    let fresh = t1.elapsed();
    for _ in 0..256 {
        let (code, _) = read_reply(&mut s);
        assert_eq!(code, ErrorCode::MessageNotFound as u16);
    }
    let all = t0.elapsed();
    let grown = b.rss_bytes().saturating_sub(rss_before);
    assert!(
        fresh < Duration::from_millis(100),
        "fresh connection took {fresh:?}"
    );
    assert!(
        all < Duration::from_secs(2),
        "256 forged lookups took {all:?}"
    );
    assert!(grown < 32 << 20, "broker grew by {grown} bytes");
    // The genuine message is still found by its own id.
    let m = other.get_message(holder[0].id).unwrap();
    assert_eq!(m.payload.len(), 80);
}

#[test]
fn a_perfect_fake_batch_in_a_payload_never_appears_after_recovery() {
    let mut b = Broker::start(1, None);
    b.admin()
        .create_topic("r", 2, Some(Durability::Fsync))
        .unwrap();
    let d = b.admin().describe_topic("r").unwrap();
    let q1 = d.topic.queues[1].queue_id;
    let mut p = Producer::connect(&b.addr).unwrap();
    let mut last = None;
    for i in 0..20 {
        last = Some(
            p.send_batch(
                "r",
                QueueSelector::Queue(0),
                &[Record::new(format!("a{i}"))],
            )
            .unwrap()[0],
        );
    }
    let last = last.unwrap();
    // The holder goes right after the last batch; its payload is a whole
    // batch for queue 1's next offset, stamped for the very position where
    // it will lie.
    let a_len = {
        let mut bb = BatchBuilder::new();
        bb.push(&Record::new("a19"));
        bb.finish().len() as u64
    };
    let mut fake = {
        let mut bb = BatchBuilder::new();
        bb.push(&Record::new("INVENTED"));
        bb.finish().to_vec()
    };
    let holder_at = last.id.position.0 + a_len;
    let fake_at = holder_at + PAYLOAD_AT;
    let head = fake_header(fake.len() as u32, q1, 0, fake_at);
    fake[..48].copy_from_slice(&head[..48]);
    let crc = crc32fast::hash(&fake[4..48]);
    fake[0..4].copy_from_slice(&crc.to_le_bytes());
    let holder = p
        .send_batch(
            "r",
            QueueSelector::Queue(0),
            &[Record::new(Bytes::from(fake))],
        )
        .unwrap()[0];
    assert_eq!(
        holder.id.position.0, holder_at,
        "the holder landed elsewhere"
    );
    for i in 0..20 {
        p.send_batch(
            "r",
            QueueSelector::Queue(0),
            &[Record::new(format!("b{i}"))],
        )
        .unwrap();
    }
    assert!(b.stop().success());
    // Damage the holder's header on disk, and remove the index snapshots so
    // recovery scans the log and looks for the next batch after it.
    let shard = b.data_dir().join("shard-0");
    let seg = segment_files(&b.data_dir(), 0)[0].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[holder_at as usize + 20] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    for e in std::fs::read_dir(&shard).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "idx") {
            std::fs::remove_file(path).unwrap();
        }
    }
    b.restart();
    assert!(b.log().contains("SKIPPED CORRUPT"), "{}", b.log());
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.assign_all("r").unwrap();
    c.seek(SeekTo::Earliest).unwrap();
    let mut got = Vec::new();
    loop {
        let batch = c.poll(Duration::from_millis(500)).unwrap();
        if batch.is_empty() {
            break;
        }
        got.extend(
            batch
                .into_iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned()),
        );
    }
    assert!(
        !got.iter().any(|m| m.contains("INVENTED")),
        "a producer's bytes were taken for a stored batch"
    );
    let expected: Vec<String> = (0..20)
        .map(|i| format!("a{i}"))
        .chain((0..20).map(|i| format!("b{i}")))
        .collect();
    assert_eq!(got, expected, "only the damaged holder may be missing");
}
