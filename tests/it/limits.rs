//! Everything that grows is bounded: a client that pipelines and never
//! reads, thousands of connections that never finish their first frame,
//! and `memory`-level producers far faster than the disk each cost a
//! bounded amount, and other clients are served all along.

use crate::*;
use bytes::BytesMut;
use keelmq::client::{ClientError, Consumer, ErrorCode, Producer, QueueSelector, Record, SeekTo};
use keelmq::protocol::frame::encode_frame;
use keelmq::protocol::{Durability, FetchRequest, Op};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Connects and runs one metadata call: how long a fresh client waits.
fn fresh_client_latency(addr: &str) -> Duration {
    let t0 = Instant::now();
    let mut a = keelmq::client::Admin::connect(addr).unwrap();
    a.list_topics().unwrap();
    t0.elapsed()
}

fn open_connections(b: &Broker) -> u64 {
    let s = b.admin().stats().unwrap();
    s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sh| sh["counters"]["connections_open"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_client_that_pipelines_and_never_reads_costs_a_bounded_amount() {
    let cfg = "[limits]\nin_flight_requests_max = 64\nconnection_reply_bytes_max = 16777216\nfetch_wait_ms_max = 1000\nconnection_idle_ms_max = 3000\n";
    let b = Broker::start(1, Some(cfg));
    b.admin()
        .create_topic("big", 1, Some(Durability::Written))
        .unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    let chunk: Vec<Record> = (0..16).map(|_| Record::new(vec![7u8; 64 << 10])).collect();
    for _ in 0..8 {
        p.send_batch("big", QueueSelector::Queue(0), &chunk)
            .unwrap();
    }
    // The producer's connection goes first: its idle close must not pass
    // for the stuck client's below.
    drop(p);
    wait_until(Duration::from_secs(5), "the producer to disconnect", || {
        (open_connections(&b) == 1).then_some(())
    });
    let rss_before = b.rss_bytes();
    let open_before = open_connections(&b);
    // 20,000 fetches of up to 4 MiB each, pipelined, never read: without
    // bounds that is 80 GB of replies owed.
    let mut s = TcpStream::connect(&b.addr).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut body = BytesMut::new();
    FetchRequest {
        topic: "big".into(),
        queue: 0,
        offset: 0,
        max_bytes: 4 << 20,
        wait_ms: 0,
        filter: None,
    }
    .encode(&mut body);
    let mut frames = BytesMut::new();
    for id in 0..20_000u64 {
        encode_frame(&mut frames, Op::Fetch as u16, 1, id, &body);
    }
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while sent < frames.len() && Instant::now() < deadline {
        match s.write(&frames[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break,
        }
    }
    // The broker stops taking its requests once its replies cannot be
    // written: about in_flight_requests_max of them, not 20,000. Others are
    // served meanwhile, and the broker holds about one reply budget for the
    // stuck client.
    std::thread::sleep(Duration::from_millis(500));
    let fetched = b.admin().stats().unwrap()["shards"][0]["counters"]["fetch_requests"]
        .as_u64()
        .unwrap();
    assert!(
        fetched < 200,
        "the broker served {fetched} fetches to a client that reads nothing ({sent} bytes of requests sent)"
    );
    let lat = fresh_client_latency(&b.addr);
    assert!(
        lat < Duration::from_millis(100),
        "fresh client waited {lat:?}"
    );
    {
        let mut c = Consumer::connect(&b.addr).unwrap();
        c.assign("big", &[0]).unwrap();
        c.seek(SeekTo::Earliest).unwrap();
        assert!(!c.poll(Duration::from_secs(5)).unwrap().is_empty());
    }
    let grown = b.rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 96 << 20,
        "broker grew by {grown} bytes for one stuck client"
    );
    // Its writes stall for connection_idle_ms_max: the broker closes it.
    wait_until(
        Duration::from_secs(15),
        "the stuck connection to close",
        || (open_connections(&b) <= open_before).then_some(()),
    );
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    let mut eof = false;
    for _ in 0..10_000 {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => {
                eof = true;
                break;
            }
            Ok(_) => {}
        }
    }
    assert!(eof, "the stuck connection was not closed");
}

#[test]
fn two_thousand_half_open_connections_are_counted_and_time_out() {
    let cfg = "[limits]\nconnection_first_frame_ms_max = 1500\nconnections_max = 3000\n";
    let b = Broker::start(2, Some(cfg));
    let rss_before = b.rss_bytes();
    let mut conns = Vec::new();
    for _ in 0..2000 {
        let mut s = TcpStream::connect(&b.addr).unwrap();
        // Three bytes of a frame length: never a whole frame.
        s.write_all(&[200, 0, 0]).unwrap();
        conns.push(s);
    }
    // Counted from their accept; fresh clients answered at once.
    wait_until(
        Duration::from_secs(5),
        "half-open connections counted",
        || (open_connections(&b) >= 2000).then_some(()),
    );
    for _ in 0..5 {
        let lat = fresh_client_latency(&b.addr);
        assert!(
            lat < Duration::from_millis(100),
            "fresh client waited {lat:?}"
        );
    }
    let grown = b.rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "2000 half-open connections cost {grown} bytes"
    );
    // The first-frame deadline closes them all.
    wait_until(
        Duration::from_secs(10),
        "half-open connections closed",
        || (open_connections(&b) <= 1).then_some(()),
    );
    let s = b.admin().stats().unwrap();
    let timed_out: u64 = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sh| sh["counters"]["connections_timed_out"].as_u64().unwrap())
        .sum();
    assert!(timed_out >= 2000, "{timed_out}");
    let mut buf = [0u8; 16];
    let mut s0 = conns.swap_remove(0);
    s0.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!(s0.read(&mut buf), Ok(0) | Err(_)), "still open");
}

#[test]
fn memory_producers_outrunning_the_disk_keep_broker_memory_flat() {
    // One 4 KiB write at a time: the disk takes ~tens of MB/s while
    // memory-level producers push much more. Unwritten bytes stay under
    // memory_pending_bytes_max: producers wait, then get busy.
    let cfg = "[storage]\nwrite_bytes_max = 4096\nmemory_write_delay_us = 0\nmemory_pending_bytes_max = 8388608\ntail_cache_bytes_max = 4194304\nmemory_pending_wait_ms = 200\n[limits]\nbatch_bytes_max = 16384\nframe_bytes_max = 32768\n";
    let b = Broker::start(1, Some(cfg));
    b.admin()
        .create_topic("m", 4, Some(Durability::Memory))
        .unwrap();
    let rss_before = b.rss_bytes();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producers: Vec<_> = (0..2)
        .map(|i| {
            let (addr, stop) = (b.addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut p = Producer::connect(&addr).unwrap();
                let batch: Vec<Record> =
                    (0..12).map(|_| Record::new(vec![i as u8; 1000])).collect();
                let (mut acked, mut busy) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    while p.in_flight() < 64 {
                        p.submit_batch("m", QueueSelector::RoundRobin, &batch)
                            .unwrap();
                    }
                    if let Some((_, r)) = p.poll_ack(Duration::from_millis(100)).unwrap() {
                        match r {
                            Ok(_) => acked += 12_000,
                            Err(ClientError::Broker {
                                code: ErrorCode::Busy,
                                ..
                            }) => busy += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                (acked, busy)
            })
        })
        .collect();
    let mut peak = 0;
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(b.rss_bytes());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut busy) = (0, 0);
    for t in producers {
        let (a, bz) = t.join().unwrap();
        acked += a;
        busy += bz;
    }
    let grown = peak.saturating_sub(rss_before);
    eprintln!(
        "memory producers: {acked} bytes acknowledged, {busy} busy replies, broker grew by {grown}"
    );
    assert!(busy > 0, "producers never had to wait for the disk");
    assert!(grown < 64 << 20, "broker grew by {grown} bytes");
    let stats = b.admin().stats().unwrap();
    let pending = stats["shards"][0]["log"]["pending_bytes"].as_u64().unwrap();
    assert!(pending <= 8 << 20, "{pending}");
}

#[test]
fn a_handed_over_connection_counts_against_the_target_shard() {
    // Shard 1 takes at most 3 connections; handshakes asking for it are
    // refused past that, whichever shard accepted them.
    let b = Broker::start(2, Some("[limits]\nconnections_max = 3\n"));
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        match keelmq::client::Connection::connect_to_shard(&b.addr, 1) {
            Ok(c) => held.push(c),
            Err(_) => refused += 1,
        }
    }
    assert!(held.len() <= 3, "{} connections on shard 1", held.len());
    assert!(refused >= 5, "{refused} refused");
    drop(held);
    // Once they close, shard 1 takes connections again.
    wait_until(
        Duration::from_secs(5),
        "shard 1 to take connections",
        || keelmq::client::Connection::connect_to_shard(&b.addr, 1).ok(),
    );
}

/// Reads until the broker closes `s` (true) or `within` passes (false).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut sink = [0u8; 4096];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn connection_timers_cover_a_slow_first_frame_a_trickled_frame_and_idle_after_a_long_wait() {
    let cfg = "[limits]\nconnection_first_frame_ms_max = 1000\nconnection_idle_ms_max = 2000\nfetch_wait_ms_max = 5000\n";
    let b = Broker::start(1, Some(cfg));
    b.admin()
        .create_topic("t", 1, Some(Durability::Written))
        .unwrap();
    let mut fetch = BytesMut::new();
    FetchRequest {
        topic: "t".into(),
        queue: 0,
        offset: 0,
        max_bytes: 1 << 20,
        wait_ms: 3000,
        filter: None,
    }
    .encode(&mut fetch);
    let mut frame = BytesMut::new();
    encode_frame(&mut frame, Op::Fetch as u16, 1, 1, &fetch);

    // 1. The header of a first frame, never its body: closed by the
    //    first-frame deadline, not the (longer) idle limit.
    let mut slow = TcpStream::connect(&b.addr).unwrap();
    slow.write_all(&frame[..8]).unwrap();
    let t0 = Instant::now();
    assert!(closed_within(&mut slow, Duration::from_millis(1800)));
    assert!(
        t0.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t0.elapsed()
    );

    // 2. After a whole first frame, a frame trickled a byte at a time:
    //    each byte arrives well within the idle limit, yet the frame must
    //    be whole within it of its first byte.
    let mut trickle = TcpStream::connect(&b.addr).unwrap();
    let mut first = BytesMut::new();
    // A fetch that returns at once (empty) answers the first frame.
    let mut ping = BytesMut::new();
    FetchRequest {
        topic: "t".into(),
        queue: 0,
        offset: 0,
        max_bytes: 1 << 20,
        wait_ms: 0,
        filter: None,
    }
    .encode(&mut ping);
    encode_frame(&mut first, Op::Fetch as u16, 1, 0, &ping);
    trickle.write_all(&first).unwrap();
    let t1 = Instant::now();
    let mut closed = false;
    for &byte in frame.iter() {
        if trickle.write_all(&[byte]).is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut trickle, Duration::from_millis(300)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled frame kept the connection open");
    let took = t1.elapsed();
    assert!(
        took < Duration::from_millis(4000) && took >= Duration::from_millis(1500),
        "closed after {took:?}"
    );

    // 3. A fetch waiting 3 s (longer than the idle limit) is not idle; once
    //    its reply is written, the idle clock starts and closes the
    //    connection about 2 s later.
    let mut waiting = TcpStream::connect(&b.addr).unwrap();
    waiting.write_all(&frame).unwrap();
    let t2 = Instant::now();
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 4];
    waiting.read_exact(&mut head).unwrap();
    let replied = t2.elapsed();
    assert!(
        replied >= Duration::from_millis(2500),
        "replied after {replied:?}"
    );
    let len = u32::from_le_bytes(head) as usize;
    let mut rest = vec![0u8; len];
    waiting.read_exact(&mut rest).unwrap();
    let t3 = Instant::now();
    assert!(
        closed_within(&mut waiting, Duration::from_secs(4)),
        "not closed after being idle"
    );
    assert!(
        t3.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t3.elapsed()
    );
}
