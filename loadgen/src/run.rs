//! One measured run: open-loop producers and consumers multiplexed on a few
//! busy-polling worker threads (one per free core), every message stamped
//! with its *scheduled* send time so a broker stall shows up as latency
//! instead of slowing the sender (no coordinated omission).
//!
//! Payload: `u64` scheduled time (ns since the run's t0), `u32` producer,
//! `u32` sequence, then filler up to the message size.

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use keelmq::client::{
    Consumer, GroupConsumer, GroupMember, Message, Producer, QueueSelector, Record, SeekTo,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::shape::{priority_of, wall_ns, Shape};
use crate::workload::Workload;

/// Bytes of the stamp at the head of every payload.
pub const STAMP_BYTES: usize = 16;
/// Batches a producer keeps in flight before it waits for acks.
const IN_FLIGHT_BATCHES_MAX: usize = 256;
/// Payload bytes a producer keeps unacknowledged at most (a client's send
/// buffer, as Kafka's `buffer.memory` of 32 MiB): with 1 KiB messages in
/// batches of 1000, 256 batches would put 256 MiB in flight, far past what a
/// consumer at the tail can follow from the broker's tail cache.
const IN_FLIGHT_BYTES_MAX: usize = 32 << 20;
/// How long consumers may go without receiving anything while they catch
/// up after the last ack (a slow consumer is not a loss).
const DRAIN_STALL_S: u64 = 15;
/// How long consumers may take to catch up after the last ack, at most.
const DRAIN_S_MAX: u64 = 120;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds")
}

/// What a run measured.
pub struct RunResult {
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub errors: u64,
    /// Messages delivered end to end per second in the measured window.
    pub rate_msgs: f64,
    pub mb_per_s: f64,
    /// Latencies in µs.
    pub ack: Histogram<u64>,
    pub e2e: Histogram<u64>,
    pub steal_pct: f64,
    pub cpu_busy_pct: f64,
    pub first_error: Option<String>,
    /// Group consumers: each commit call (queue delivery), µs (message
    /// delivery acks without waiting).
    pub group_ack: Histogram<u64>,
    /// Redelivery lateness: received − (nacked + delay), ms.
    pub redelivery_ms: Histogram<u64>,
    /// `--backlog`: how long the consumers took from their start to the
    /// last message, and the messages per second that makes.
    pub drain_s: Option<f64>,
    pub drain_msgs_per_s: Option<f64>,
    /// Acknowledged messages the consumers must get (those the filter
    /// passes; all without one).
    pub expected: u64,
    /// Messages delivered per second: over the drain with `--backlog`,
    /// else in the measured window (`rate_msgs`).
    pub consumed_msgs_per_s: f64,
    /// Scheduled messages: received − due, µs (first deliveries in the
    /// measured window).
    pub lateness: Histogram<u64>,
    /// Scheduled messages delivered before their due time (must be 0).
    pub early: u64,
    /// Scheduled messages whose produce ack came after their due time
    /// (their lateness includes the produce).
    pub acked_after_due: u64,
    /// Deliveries whose deliver-at, priority or tag/property is not what
    /// was produced.
    pub mismatched: u64,
    pub first_mismatch: Option<String>,
    /// Deliveries of messages the filter should have dropped (must be 0).
    pub unexpected: u64,
    /// `--priorities`: e2e latency by priority, µs.
    pub e2e_by_priority: Vec<Histogram<u64>>,
    /// `--due-burst`: from the burst's first due time to the last
    /// delivery, s.
    pub burst_s: Option<f64>,
}

/// Adds each priority's histogram of `from` to `into`'s.
fn merge_by_priority(into: &mut [Histogram<u64>], from: &[Histogram<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        a.add(b).expect("same bounds");
    }
}

struct Shared {
    t0: Instant,
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
    producers_done: AtomicU64,
    stop: AtomicBool,
    /// Deliveries each acked message gets: the members of a broadcast
    /// group, else 1.
    fanout: u64,
    /// `--backlog`: consumers wait for the producers to finish.
    backlog: bool,
    /// When the consumers started on the backlog (ns since t0; `u64::MAX`
    /// before).
    drain_from_ns: AtomicU64,
    /// When a consumer last took something (ns since t0).
    last_received_ns: AtomicU64,
    /// `t0` on the wall clock, ns since the epoch (due times are computed
    /// from it, on the clock the broker's timers use).
    epoch0_ns: u64,
    shape: Shape,
    /// Acknowledged messages the consumers must get.
    expected: AtomicU64,
    /// The latest due time of any scheduled message sent, ms since the
    /// epoch (0: none).
    last_due_ms: AtomicI64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
}

struct InFlight {
    first_seq: u32,
    /// Scheduled send time of each message (ns since t0).
    sched_ns: Vec<u64>,
    /// Scheduled messages: the due time of each (ms since the epoch).
    due_ms: Vec<i64>,
}

/// One open-loop producer, driven step by step by a worker.
struct ProducerState {
    id: u32,
    p: Producer,
    targets: Vec<(String, u32)>,
    next_target: usize,
    /// ns between two of this producer's messages; `None` = max rate.
    interval_ns: Option<f64>,
    /// Offset of this producer's schedule (producers interleave).
    phase_ns: f64,
    next_seq: u32,
    /// `--backlog`: this producer's share; done once sent.
    limit: Option<u32>,
    end_ns: u64,
    warmup_ns: u64,
    batch_max: usize,
    linger_ns: u64,
    size: usize,
    /// The routing keys, made once (a record's key is a cheap clone).
    keys: Vec<Bytes>,
    in_flight: HashMap<u64, InFlight>,
    acked: Vec<bool>,
    ack_us: Histogram<u64>,
    filler: Bytes,
    done: bool,
    acked_after_due: u64,
}

impl ProducerState {
    fn sched(&self, seq: u32) -> u64 {
        match self.interval_ns {
            Some(i) => (self.phase_ns + f64::from(seq) * i) as u64,
            None => 0,
        }
    }

    /// Sends what is due; returns whether anything happened.
    /// Sends what is due and takes acks; `block` parks in the socket read
    /// until an ack comes or the next send is due.
    fn step(&mut self, shared: &Shared, block: bool) -> Result<bool> {
        let mut busy = false;
        let now = shared.now_ns();
        let room = self.in_flight.len() < IN_FLIGHT_BATCHES_MAX
            && self.in_flight.len() * self.batch_max * self.size < IN_FLIGHT_BYTES_MAX;
        if !self.done && room {
            let (due, first_sched) = match self.interval_ns {
                Some(i) => {
                    let first = self.sched(self.next_seq);
                    if first >= self.end_ns {
                        self.done = true;
                        (0, 0)
                    } else if first > now {
                        (0, 0)
                    } else {
                        let n = ((now - first) as f64 / i) as usize + 1;
                        let left = ((self.end_ns - first) as f64 / i).ceil() as usize;
                        (n.min(self.batch_max).min(left.max(1)), first)
                    }
                }
                None => {
                    let left = self
                        .limit
                        .map_or(usize::MAX, |l| (l - self.next_seq) as usize);
                    if now >= self.end_ns || left == 0 {
                        self.done = true;
                        (0, 0)
                    } else {
                        (self.batch_max.min(left), now)
                    }
                }
            };
            let lingering =
                due > 0 && due < self.batch_max && now.saturating_sub(first_sched) < self.linger_ns;
            if due > 0 && !lingering {
                self.send(due, now, shared)?;
                busy = true;
            }
        }
        let mut wait = Duration::ZERO;
        if block && !busy && !self.in_flight.is_empty() {
            let next_due = match self.interval_ns {
                Some(_) if !self.done => self.sched(self.next_seq),
                Some(_) => u64::MAX,
                None => now,
            };
            wait = Duration::from_nanos(next_due.saturating_sub(shared.now_ns()))
                .min(BLOCKING_WAIT_MAX);
        } else if block && !busy {
            // Nothing in flight: sleep until the next send is due.
            if self.interval_ns.is_some() && !self.done {
                let due = self.sched(self.next_seq);
                let d = Duration::from_nanos(due.saturating_sub(shared.now_ns()));
                std::thread::sleep(d.min(BLOCKING_WAIT_MAX));
            }
        }
        while let Some((ticket, result)) = self.p.poll_ack(wait)? {
            wait = Duration::ZERO;
            busy = true;
            let Some(f) = self.in_flight.remove(&ticket) else {
                continue;
            };
            match result {
                Ok(_) => {
                    let at = shared.now_ns();
                    let mut expected = 0u64;
                    for (i, s) in f.sched_ns.iter().enumerate() {
                        let seq = f.first_seq + i as u32;
                        // `acked` holds what the consumers must get.
                        if shared.shape.expected(seq) {
                            self.acked[seq as usize] = true;
                            expected += 1;
                        }
                        if *s >= self.warmup_ns {
                            let _ = self.ack_us.record((at.saturating_sub(*s) / 1000).max(1));
                        }
                    }
                    if !f.due_ms.is_empty() {
                        let wall_ms = (wall_ns() / 1_000_000) as i64;
                        self.acked_after_due +=
                            f.due_ms.iter().filter(|&&d| d < wall_ms).count() as u64;
                    }
                    shared
                        .acked
                        .fetch_add(f.sched_ns.len() as u64, Ordering::Relaxed);
                    shared.expected.fetch_add(expected, Ordering::Relaxed);
                }
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(busy)
    }

    fn send(&mut self, n: usize, now: u64, shared: &Shared) -> Result<()> {
        let mut records = Vec::with_capacity(n);
        let mut sched = Vec::with_capacity(n);
        let shape = shared.shape;
        let mut due = Vec::with_capacity(if shape.due.is_some() { n } else { 0 });
        for i in 0..n {
            let seq = self.next_seq + i as u32;
            let s = match self.interval_ns {
                Some(_) => self.sched(seq),
                None => now,
            };
            let mut payload = Vec::with_capacity(self.size);
            payload.extend_from_slice(&s.to_le_bytes());
            payload.extend_from_slice(&self.id.to_le_bytes());
            payload.extend_from_slice(&seq.to_le_bytes());
            payload.extend_from_slice(&self.filler[..self.size - STAMP_BYTES]);
            let mut r = Record::new(payload);
            if !self.keys.is_empty() {
                let k = (u64::from(seq) * 2_654_435_761) % self.keys.len() as u64;
                r.key = Some(self.keys[k as usize].clone());
            }
            if let Some(d) = shape.due {
                let at = d.due_ms(shared.epoch0_ns, self.id, seq, s);
                r = r.deliver_at(at);
                due.push(at);
            }
            if let Some(np) = shape.priorities {
                r = r.with_priority(priority_of(self.id, seq, np));
            }
            if let Some(f) = shape.filter {
                r = f.mark(r, f.passes(seq));
            }
            records.push(r);
            sched.push(s);
        }
        let (topic, queue) = self.targets[self.next_target].clone();
        self.next_target = (self.next_target + 1) % self.targets.len();
        let sel = match &records[0].key {
            Some(k) => QueueSelector::Key(k.clone()),
            None => QueueSelector::Queue(queue),
        };
        let ticket = self.p.submit_batch(&topic, sel, &records)?;
        let last_due = due.iter().max().copied();
        let first_seq = self.next_seq;
        self.next_seq += n as u32;
        if self.acked.len() < self.next_seq as usize {
            self.acked.resize(self.next_seq as usize * 2, false);
        }
        self.in_flight.insert(
            ticket,
            InFlight {
                first_seq,
                sched_ns: sched,
                due_ms: due,
            },
        );
        if let Some(last) = last_due {
            shared.last_due_ms.fetch_max(last, Ordering::Relaxed);
        }
        shared.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// One consumer of a subset of a topic's queues.
struct ConsumerState {
    /// `None` for the counters of a group member (it reads by itself).
    c: Option<Consumer>,
    seen: Vec<Vec<u8>>,
    e2e_us: Histogram<u64>,
    received: u64,
    window_msgs: u64,
    window_bytes: u64,
    warmup_ns: u64,
    end_ns: u64,
    /// Scheduled messages: received − due, µs.
    lateness_us: Histogram<u64>,
    early: u64,
    mismatched: u64,
    first_mismatch: Option<String>,
    unexpected: u64,
    /// `--priorities`: e2e by the priority the message was produced with.
    e2e_by_priority: Vec<Histogram<u64>>,
}

impl ConsumerState {
    fn new(c: Option<Consumer>, warmup_ns: u64, end_ns: u64, shape: &Shape) -> ConsumerState {
        ConsumerState {
            c,
            seen: Vec::new(),
            e2e_us: histogram(),
            received: 0,
            window_msgs: 0,
            window_bytes: 0,
            warmup_ns,
            end_ns,
            lateness_us: histogram(),
            early: 0,
            mismatched: 0,
            first_mismatch: None,
            unexpected: 0,
            e2e_by_priority: (0..shape.priorities.unwrap_or(0))
                .map(|_| histogram())
                .collect(),
        }
    }

    fn mismatch(&mut self, what: impl FnOnce() -> String) {
        self.mismatched += 1;
        if self.first_mismatch.is_none() {
            self.first_mismatch = Some(what());
        }
    }

    /// Takes what arrived; `block` parks in the socket read for a while.
    fn step(&mut self, shared: &Shared, block: bool) -> Result<bool> {
        let wait = if block {
            BLOCKING_WAIT_MAX
        } else {
            Duration::ZERO
        };
        let Some(c) = self.c.as_mut() else {
            return Ok(false);
        };
        let msgs = c.poll(wait)?;
        if msgs.is_empty() {
            return Ok(false);
        }
        let now = shared.now_ns();
        let wall = wall_ns();
        for m in &msgs {
            self.take(m, now, wall, shared);
        }
        self.received += msgs.len() as u64;
        shared
            .received
            .fetch_add(msgs.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Counts a first delivery: seen, e2e, throughput window, and checks
    /// what the run's shape says it carries (due time: never early,
    /// lateness; priority; filter). `now`: ns since t0, `wall`: ns since
    /// the epoch, both taken after the message arrived. Returns
    /// (producer, sequence).
    fn take(&mut self, m: &Message, now: u64, wall: u64, shared: &Shared) -> Option<(u32, u32)> {
        let p = &m.payload;
        if p.len() < STAMP_BYTES {
            return None;
        }
        let sched = u64::from_le_bytes(p[0..8].try_into().unwrap());
        let pid = u32::from_le_bytes(p[8..12].try_into().unwrap());
        let seq = u32::from_le_bytes(p[12..16].try_into().unwrap());
        let (pi, si) = (pid as usize, seq as usize);
        if self.seen.len() <= pi {
            self.seen.resize(pi + 1, Vec::new());
        }
        let v = &mut self.seen[pi];
        if v.len() <= si {
            v.resize((si + 1).max(v.len() * 2), 0);
        }
        v[si] = v[si].saturating_add(1);
        let in_window = sched >= self.warmup_ns && sched < self.end_ns;
        if in_window {
            let e2e = (now.saturating_sub(sched) / 1000).max(1);
            let _ = self.e2e_us.record(e2e);
            self.window_msgs += 1;
            self.window_bytes += p.len() as u64;
            if let Some(n) = shared.shape.priorities {
                let _ = self.e2e_by_priority[priority_of(pid, seq, n) as usize].record(e2e);
            }
        }
        let shape = shared.shape;
        if let Some(d) = shape.due {
            let due_ms = d.due_ms(shared.epoch0_ns, pid, seq, sched);
            if m.deliver_at_ms != due_ms {
                self.mismatch(|| {
                    format!(
                        "message {pid}/{seq}: deliver_at_ms {} delivered, {due_ms} produced",
                        m.deliver_at_ms
                    )
                });
            }
            match crate::shape::lateness_us(wall, due_ms) {
                None => self.early += 1,
                Some(late) if in_window => {
                    let _ = self.lateness_us.record(late.max(1));
                }
                Some(_) => {}
            }
        }
        if let Some(n) = shape.priorities {
            let want = priority_of(pid, seq, n);
            if m.priority != want {
                self.mismatch(|| {
                    format!(
                        "message {pid}/{seq}: priority {} delivered, {want} produced",
                        m.priority
                    )
                });
            }
        }
        if let Some(f) = shape.filter {
            let pass = f.passes(seq);
            if !pass {
                self.unexpected += 1;
            }
            let marked = match f.kind {
                crate::shape::FilterKind::Tag => {
                    m.tag.as_deref()
                        == Some(if pass {
                            crate::shape::PASS_TAG
                        } else {
                            crate::shape::OTHER_TAG
                        })
                }
                crate::shape::FilterKind::Sql => m.properties.iter().any(|(k, v)| {
                    k == crate::shape::SQL_PROPERTY && v == if pass { "1" } else { "0" }
                }),
            };
            if !marked {
                self.mismatch(|| {
                    format!(
                        "message {pid}/{seq}: tag {:?} properties {:?} delivered, not as produced",
                        m.tag, m.properties
                    )
                });
            }
        }
        Some((pid, seq))
    }
}

/// A deterministic coin for (producer, sequence, attempt).
fn coin(pid: u32, seq: u32, attempt: u32, p: f64) -> bool {
    let mut x = (u64::from(pid) << 32 | u64::from(seq)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(attempt).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    ((x % 1_000_000) as f64) < p * 1_000_000.0
}

/// A member of the run's group in message delivery.
struct GroupConsumerState {
    g: GroupConsumer,
    base: ConsumerState,
    nack_ratio: f64,
    nack_delay_ms: u64,
    /// (producer, sequence) → when it was nacked (ns since t0).
    nacked: HashMap<(u32, u32), u64>,
    ack_us: Histogram<u64>,
    redelivery_ms: Histogram<u64>,
    /// `--consume-rate`: this member's share.
    throttle: Option<Throttle>,
}

impl GroupConsumerState {
    fn step(&mut self, shared: &Shared, block: bool) -> Result<bool> {
        let wait = if block {
            BLOCKING_WAIT_MAX
        } else {
            Duration::ZERO
        };
        let max = match self.throttle.as_mut() {
            None => usize::MAX,
            Some(t) => {
                let allowed = t.allowance(shared.now_ns());
                if allowed == 0 {
                    if block {
                        let d = Duration::from_secs_f64(1.0 / t.rate).min(BLOCKING_WAIT_MAX);
                        std::thread::sleep(d);
                    }
                    return Ok(false);
                }
                allowed
            }
        };
        let got = self.g.receive_at_most(max, wait)?;
        if got.is_empty() {
            return Ok(false);
        }
        if let Some(t) = self.throttle.as_mut() {
            t.took(got.len());
        }
        let now = shared.now_ns();
        let wall = wall_ns();
        let (mut acks, mut nacks) = (Vec::new(), Vec::new());
        let mut first = 0u64;
        for d in &got {
            let key = if d.attempt == 1 {
                first += 1;
                self.base.take(&d.message, now, wall, shared)
            } else {
                let p = &d.message.payload;
                (p.len() >= STAMP_BYTES).then(|| {
                    (
                        u32::from_le_bytes(p[8..12].try_into().unwrap()),
                        u32::from_le_bytes(p[12..16].try_into().unwrap()),
                    )
                })
            };
            let Some((pid, seq)) = key else {
                acks.push(d.handle.clone());
                continue;
            };
            if let Some(at) = self.nacked.remove(&(pid, seq)) {
                let due = at + self.nack_delay_ms * 1_000_000;
                let _ = self
                    .redelivery_ms
                    .record((now.saturating_sub(due) / 1_000_000).max(1));
            }
            if d.attempt < 3 && coin(pid, seq, d.attempt, self.nack_ratio) {
                self.nacked.insert((pid, seq), now);
                nacks.push(d.handle.clone());
            } else {
                acks.push(d.handle.clone());
            }
        }
        if !acks.is_empty() {
            self.g.ack_nowait(&acks)?;
            if let (n, Some(code)) = self.g.refused() {
                anyhow::bail!("{n} acks refused, first: {}", code.name());
            }
        }
        if !nacks.is_empty() {
            self.g
                .nack_nowait(&nacks, Some(Duration::from_millis(self.nack_delay_ms)))?;
        }
        self.base.received += first;
        shared.received.fetch_add(first, Ordering::Relaxed);
        Ok(true)
    }
}

/// A token bucket: at most `rate` messages a second, and at most 10 ms
/// of them at once after an idle spell (a slow consumer, not one that
/// saves up).
struct Throttle {
    rate: f64,
    tokens: f64,
    last_ns: u64,
}

impl Throttle {
    fn new(rate: f64) -> Throttle {
        Throttle {
            rate,
            tokens: 0.0,
            last_ns: 0,
        }
    }

    /// Messages it may take `now_ns` after the start.
    fn allowance(&mut self, now_ns: u64) -> usize {
        let cap = (self.rate / 100.0).max(1.0);
        let earned = self.rate * now_ns.saturating_sub(self.last_ns) as f64 / 1e9;
        self.tokens = (self.tokens + earned).min(cap);
        self.last_ns = self.last_ns.max(now_ns);
        self.tokens.floor() as usize
    }

    fn took(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// A member of the run's group in queue delivery: fetches its queues,
/// commits every 100 ms.
struct MemberState {
    m: GroupMember,
    base: ConsumerState,
    last_commit: Instant,
    commit_us: Histogram<u64>,
}

impl MemberState {
    fn step(&mut self, shared: &Shared, block: bool) -> Result<bool> {
        let wait = if block {
            BLOCKING_WAIT_MAX
        } else {
            Duration::ZERO
        };
        let msgs = self.m.poll(wait)?;
        let now = shared.now_ns();
        let wall = wall_ns();
        for msg in &msgs {
            self.base.take(msg, now, wall, shared);
        }
        self.base.received += msgs.len() as u64;
        shared
            .received
            .fetch_add(msgs.len() as u64, Ordering::Relaxed);
        if self.last_commit.elapsed() >= Duration::from_millis(100) {
            let t = Instant::now();
            self.m.commit()?;
            let _ = self
                .commit_us
                .record((t.elapsed().as_micros() as u64).max(1));
            self.last_commit = Instant::now();
        }
        Ok(!msgs.is_empty())
    }
}

/// How the loadgen's clients wait for replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientMode {
    BusyPoll,
    Blocking,
}

impl ClientMode {
    pub fn name(self) -> &'static str {
        match self {
            ClientMode::BusyPoll => "busy-poll",
            ClientMode::Blocking => "blocking",
        }
    }
}

/// Pause of a busy-poll worker between rounds that found nothing.
const IDLE_BACKOFF: Duration = Duration::from_micros(2);

/// Longest a blocking client parks in one read before it looks at its
/// schedule again.
const BLOCKING_WAIT_MAX: Duration = Duration::from_millis(1);

/// How a run is driven.
pub struct RunSpec<'a> {
    pub mode: ClientMode,
    pub broker: &'a str,
    pub workload: &'a Workload,
    pub topics: Vec<String>,
    /// CPUs the worker threads may use (one worker per CPU).
    pub cpus: Vec<usize>,
    pub progress: bool,
    /// The consumer group the consumers are members of (created by the
    /// caller), when the workload consumes as a group.
    pub group: Option<String>,
}

enum Task {
    P(Box<ProducerState>),
    C(Box<ConsumerState>),
    G(Box<GroupConsumerState>),
    M(Box<MemberState>),
}

/// Runs the workload once against topics that already exist.
pub fn run(spec: &RunSpec) -> Result<RunResult> {
    let w = spec.workload;
    let backlog = w.backlog > 0;
    // A backlog (or a scheduled burst) is produced to the end, and every
    // message counts.
    let burst = w.due_burst > 0;
    let (warmup_ns, end_ns) = if backlog || burst {
        (0, u64::MAX)
    } else {
        let warmup_ns = (w.warmup_s * 1e9) as u64;
        (warmup_ns, warmup_ns + (w.duration_s * 1e9) as u64)
    };
    let total = if burst { w.due_burst } else { w.backlog };
    let share = total.div_ceil(u64::from(w.producers.max(1)));
    let share = (backlog || burst).then(|| u32::try_from(share).unwrap_or(u32::MAX));
    let mut tasks: Vec<Task> = Vec::new();
    let fresh_consumer = || ConsumerState::new(None, warmup_ns, end_ns, &w.shape);
    let filter = w.shape.filter.map(|f| f.spec());
    // Group members (of a group created at `latest` before anything was
    // produced), or plain consumers positioned at the end of the (fresh)
    // topics.
    if let (Some(group), Some(mode)) = (&spec.group, w.group) {
        for topic in &spec.topics {
            for c in 0..w.consumers.max(1) {
                match mode {
                    crate::workload::GroupMode::Message => {
                        let mut g = GroupConsumer::connect_filtered(
                            spec.broker,
                            group,
                            topic,
                            filter.clone(),
                        )
                        .context("group consumer connect")?;
                        g.set_busy_poll(spec.mode == ClientMode::BusyPoll)?;
                        g.set_wait(Duration::from_millis(200));
                        // A throttled member leases about 2 ms of its
                        // rate at a time (the broker picks by priority when
                        // it leases).
                        let rate = w
                            .consume_rate
                            .map(|r| r / f64::from(w.consumers.max(1) * w.topics.max(1)));
                        let batch = rate.map_or(1024, |r| (r / 500.0).clamp(1.0, 1024.0) as u32);
                        g.set_receive_batch(batch);
                        if w.push {
                            let credit = if rate.is_some() { batch } else { 4096 };
                            g.subscribe(credit, 16 << 20).context("subscribe")?;
                        }
                        tasks.push(Task::G(Box::new(GroupConsumerState {
                            g,
                            base: fresh_consumer(),
                            nack_ratio: w.nack_ratio,
                            nack_delay_ms: w.nack_delay_ms,
                            nacked: HashMap::new(),
                            ack_us: histogram(),
                            redelivery_ms: histogram(),
                            throttle: rate.map(Throttle::new),
                        })));
                    }
                    crate::workload::GroupMode::Queue | crate::workload::GroupMode::Broadcast => {
                        let mut m = GroupMember::connect(
                            spec.broker,
                            group,
                            topic,
                            &format!("loadgen-{c}"),
                        )
                        .context("group member connect")?;
                        m.set_busy_poll(spec.mode == ClientMode::BusyPoll)?;
                        tasks.push(Task::M(Box::new(MemberState {
                            m,
                            base: fresh_consumer(),
                            last_commit: Instant::now(),
                            commit_us: histogram(),
                        })));
                    }
                }
            }
        }
    }
    for topic in spec.topics.iter().filter(|_| spec.group.is_none()) {
        let per = w.queues.div_ceil(w.consumers.max(1));
        for c in 0..w.consumers.max(1) {
            let queues: Vec<u32> = (c * per..((c + 1) * per).min(w.queues)).collect();
            if queues.is_empty() {
                continue;
            }
            let mut consumer = Consumer::connect(spec.broker).context("consumer connect")?;
            consumer.assign(topic, &queues)?;
            consumer.seek(SeekTo::Latest)?;
            consumer.set_busy_poll(spec.mode == ClientMode::BusyPoll)?;
            consumer.set_fetch_wait(Some(Duration::from_millis(200)));
            consumer.set_fetch_bytes_max(4 << 20);
            consumer.set_filter(filter.clone());
            tasks.push(Task::C(Box::new(ConsumerState::new(
                Some(consumer),
                warmup_ns,
                end_ns,
                &w.shape,
            ))));
        }
    }
    let targets: Vec<(String, u32)> = spec
        .topics
        .iter()
        .flat_map(|t| (0..w.queues).map(move |q| (t.clone(), q)))
        .collect();
    let filler = Bytes::from(vec![b'x'; w.size.max(STAMP_BYTES)]);
    for id in 0..w.producers.max(1) {
        let mut p = Producer::connect(spec.broker).context("producer connect")?;
        p.set_busy_poll(spec.mode == ClientMode::BusyPoll)?;
        let interval_ns = w.rate.map(|r| 1e9 * f64::from(w.producers.max(1)) / r);
        let mut t = targets.clone();
        t.rotate_left(id as usize % targets.len());
        tasks.push(Task::P(Box::new(ProducerState {
            id,
            p,
            targets: t,
            next_target: 0,
            interval_ns,
            phase_ns: interval_ns
                .map_or(0.0, |i| i * f64::from(id) / f64::from(w.producers.max(1))),
            next_seq: 0,
            limit: share,
            end_ns,
            warmup_ns,
            batch_max: w.batch_max.max(1),
            linger_ns: w.linger_us * 1000,
            size: w.size.max(STAMP_BYTES),
            keys: (0..w.keys).map(|k| Bytes::from(format!("k{k}"))).collect(),
            in_flight: HashMap::new(),
            acked: Vec::new(),
            ack_us: histogram(),
            filler: filler.clone(),
            done: false,
            acked_after_due: 0,
        })));
    }
    let start_in = Duration::from_millis(300);
    let shared = Arc::new(Shared {
        t0: Instant::now() + start_in,
        epoch0_ns: wall_ns() + start_in.as_nanos() as u64,
        shape: w.shape,
        expected: AtomicU64::new(0),
        last_due_ms: AtomicI64::new(0),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        received: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        producers_done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        fanout: match w.group {
            Some(crate::workload::GroupMode::Broadcast) => u64::from(w.consumers.max(1)),
            _ => 1,
        },
        backlog,
        drain_from_ns: AtomicU64::new(u64::MAX),
        last_received_ns: AtomicU64::new(0),
    });
    let n_producers = w.producers.max(1) as u64;
    // Busy-poll: deal the tasks to one worker per CPU. Blocking: a thread
    // per task (each parks on its own socket), on the same CPUs.
    let workers = match spec.mode {
        ClientMode::BusyPoll => spec.cpus.len().max(1).min(tasks.len()),
        ClientMode::Blocking => tasks.len(),
    };
    let mut per_worker: Vec<Vec<Task>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, t) in tasks.into_iter().enumerate() {
        per_worker[i % workers].push(t);
    }
    let cpu0 = crate::sysstat::sample();
    let mut handles = Vec::new();
    for (i, mine) in per_worker.into_iter().enumerate() {
        let shared = shared.clone();
        let cpu = match spec.cpus.len() {
            0 => None,
            n => Some(spec.cpus[i % n]),
        };
        let mode = spec.mode;
        handles.push(std::thread::spawn(move || {
            worker(mine, shared, cpu, n_producers, mode)
        }));
    }
    let progress = spec.progress.then(|| {
        let shared = shared.clone();
        std::thread::spawn(move || progress_loop(&shared))
    });
    let mut done_tasks = Vec::new();
    let mut first_error = None;
    for h in handles {
        match h.join().expect("worker panicked") {
            Ok(t) => done_tasks.extend(t),
            Err(e) => {
                first_error.get_or_insert(format!("{e:#}"));
                shared.stop.store(true, Ordering::Relaxed);
            }
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let cpu1 = crate::sysstat::sample();
    let (steal_pct, cpu_busy_pct) = crate::sysstat::percentages(cpu0, cpu1);
    summarize(done_tasks, &shared, w, steal_pct, cpu_busy_pct, first_error)
}

/// A parked client that cares about latency sets its timer slack to the
/// least (the kernel's default lets a timed sleep or poll overshoot by up
/// to 50 µs, which would be charged to the broker).
pub fn least_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument, this thread's
    // slack in nanoseconds.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

fn worker(
    mut tasks: Vec<Task>,
    shared: Arc<Shared>,
    cpu: Option<usize>,
    n_producers: u64,
    mode: ClientMode,
) -> Result<Vec<Task>> {
    let blocking = mode == ClientMode::Blocking;
    if blocking {
        least_timer_slack();
    }
    if let Some(id) = cpu {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
    while Instant::now() < shared.t0 {
        std::hint::spin_loop();
    }
    // (give-up time, received at the last progress, stall deadline, when
    // the last scheduled message is due)
    let mut drain: Option<(Instant, u64, Instant, Instant)> = None;
    loop {
        let mut busy = false;
        let consuming = !shared.backlog || shared.drain_from_ns.load(Ordering::Relaxed) != u64::MAX;
        for t in tasks.iter_mut() {
            let took = match t {
                Task::P(p) => {
                    let was_done = p.done && p.in_flight.is_empty();
                    busy |= p.step(&shared, blocking)?;
                    if !was_done && p.done && p.in_flight.is_empty() {
                        shared.producers_done.fetch_add(1, Ordering::Relaxed);
                    }
                    false
                }
                // `--backlog`: consumers wait for the producers.
                _ if !consuming => false,
                Task::C(c) => c.step(&shared, blocking)?,
                Task::G(g) => g.step(&shared, blocking)?,
                Task::M(m) => m.step(&shared, blocking)?,
            };
            if took {
                busy = true;
                shared
                    .last_received_ns
                    .fetch_max(shared.now_ns(), Ordering::Relaxed);
            }
        }
        let producers_done = shared.producers_done.load(Ordering::Relaxed) >= n_producers;
        if producers_done && shared.backlog {
            let _ = shared.drain_from_ns.compare_exchange(
                u64::MAX,
                shared.now_ns(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let caught_up = shared.received.load(Ordering::Relaxed)
            >= shared.expected.load(Ordering::Relaxed) * shared.fanout;
        let my_producers_done = tasks.iter().all(|t| match t {
            Task::P(p) => p.done && p.in_flight.is_empty(),
            _ => true,
        });
        if shared.stop.load(Ordering::Relaxed) && my_producers_done {
            break;
        }
        if producers_done {
            let now = Instant::now();
            let received = shared.received.load(Ordering::Relaxed);
            let stall = Duration::from_secs(DRAIN_STALL_S);
            // Scheduled messages cannot arrive before they are due: the
            // stall and give-up clocks start at the last due time.
            let (give_up, last, stalled_at, due_at) = drain.get_or_insert_with(|| {
                let due_at = now.max(instant_of_wall_ms(
                    shared.last_due_ms.load(Ordering::Relaxed),
                ));
                (
                    due_at + Duration::from_secs(DRAIN_S_MAX),
                    received,
                    due_at + stall,
                    due_at,
                )
            });
            if received > *last {
                *last = received;
                *stalled_at = now.max(*due_at) + stall;
            }
            if caught_up || now > *stalled_at || now > *give_up {
                shared.stop.store(true, Ordering::Relaxed);
                break;
            }
        }
        if !busy && !blocking {
            // Back off a little between empty rounds: a tighter loop of
            // failed reads contends with the kernel delivering the packets
            // it waits for (measured: p99 2-3x worse without this).
            let t = Instant::now();
            while t.elapsed() < IDLE_BACKOFF {
                std::hint::spin_loop();
            }
        }
    }
    Ok(tasks)
}

/// The `Instant` of `ms` (since the epoch) on the wall clock; now for a
/// time already past.
fn instant_of_wall_ms(ms: i64) -> Instant {
    let now = Instant::now();
    let ahead_ns = (ms.max(0) as u64 * 1_000_000).saturating_sub(wall_ns());
    now + Duration::from_nanos(ahead_ns)
}

fn progress_loop(shared: &Shared) {
    let mut last = (0u64, 0u64, 0u64);
    let mut tick = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        tick += 1;
        if tick % 10 != 0 {
            continue;
        }
        let now = (
            shared.sent.load(Ordering::Relaxed),
            shared.acked.load(Ordering::Relaxed),
            shared.received.load(Ordering::Relaxed),
        );
        eprintln!(
            "[{:>4.0}s] sent {:>9}/s  acked {:>9}/s  received {:>9}/s  errors {}",
            shared.t0.elapsed().as_secs_f64(),
            now.0 - last.0,
            now.1 - last.1,
            now.2 - last.2,
            shared.errors.load(Ordering::Relaxed)
        );
        last = now;
    }
}

fn summarize(
    tasks: Vec<Task>,
    shared: &Shared,
    w: &Workload,
    steal_pct: f64,
    cpu_busy_pct: f64,
    first_error: Option<String>,
) -> Result<RunResult> {
    let mut ack = histogram();
    let mut e2e = histogram();
    let mut group_ack = histogram();
    let mut redelivery_ms = histogram();
    let mut lateness = histogram();
    let mut e2e_by_priority: Vec<Histogram<u64>> = (0..w.shape.priorities.unwrap_or(0))
        .map(|_| histogram())
        .collect();
    let (mut early, mut mismatched, mut unexpected, mut acked_after_due) = (0u64, 0u64, 0u64, 0u64);
    let mut first_mismatch = None;
    let tasks: Vec<Task> = tasks
        .into_iter()
        .map(|t| match t {
            Task::G(g) => {
                group_ack.add(&g.ack_us).expect("same bounds");
                redelivery_ms.add(&g.redelivery_ms).expect("same bounds");
                Task::C(Box::new(g.base))
            }
            Task::M(m) => {
                group_ack.add(&m.commit_us).expect("same bounds");
                Task::C(Box::new(m.base))
            }
            t => t,
        })
        .collect();
    let mut acked_by: HashMap<u32, Vec<bool>> = HashMap::new();
    // What each consumer saw; a clustering group's members (and plain
    // consumers) together must see each message once, each member of a
    // broadcast group by itself.
    let mut seen_by: Vec<Vec<Vec<u8>>> = Vec::new();
    let (mut window_msgs, mut window_bytes, mut received) = (0u64, 0u64, 0u64);
    for t in tasks {
        match t {
            Task::P(p) => {
                ack.add(&p.ack_us).expect("same bounds");
                acked_after_due += p.acked_after_due;
                acked_by.insert(p.id, p.acked);
            }
            Task::G(_) | Task::M(_) => unreachable!("unwrapped above"),
            Task::C(c) => {
                e2e.add(&c.e2e_us).expect("same bounds");
                window_msgs += c.window_msgs;
                window_bytes += c.window_bytes;
                received += c.received;
                seen_by.push(c.seen);
                lateness.add(&c.lateness_us).expect("same bounds");
                merge_by_priority(&mut e2e_by_priority, &c.e2e_by_priority);
                early += c.early;
                mismatched += c.mismatched;
                unexpected += c.unexpected;
                if first_mismatch.is_none() {
                    first_mismatch = c.first_mismatch;
                }
            }
        }
    }
    if shared.fanout == 1 {
        let mut seen: Vec<Vec<u8>> = Vec::new();
        for v in seen_by.drain(..) {
            for (pid, v) in v.into_iter().enumerate() {
                if seen.len() <= pid {
                    seen.resize(pid + 1, Vec::new());
                }
                let s = &mut seen[pid];
                if s.len() < v.len() {
                    s.resize(v.len(), 0);
                }
                for (i, n) in v.into_iter().enumerate() {
                    s[i] = s[i].saturating_add(n);
                }
            }
        }
        seen_by.push(seen);
    }
    let drain_s = shared.backlog.then(|| {
        let from = shared.drain_from_ns.load(Ordering::Relaxed);
        let last = shared.last_received_ns.load(Ordering::Relaxed);
        last.saturating_sub(from) as f64 / 1e9
    });
    // A scheduled burst: from when it came due to the last delivery.
    let burst_s = w.shape.due.filter(|_| w.due_burst > 0).map(|d| {
        let first_due_ns = d.first_due_ms(shared.epoch0_ns) as u64 * 1_000_000;
        let last = shared.last_received_ns.load(Ordering::Relaxed) + shared.epoch0_ns;
        last.saturating_sub(first_due_ns) as f64 / 1e9
    });
    let (mut lost, mut duplicates) = (0u64, 0u64);
    for seen in &seen_by {
        for (pid, acked) in &acked_by {
            let got = seen.get(*pid as usize);
            for (seq, a) in acked.iter().enumerate() {
                let n = got.and_then(|g| g.get(seq)).copied().unwrap_or(0);
                if *a && n == 0 {
                    lost += 1;
                }
            }
        }
        for s in seen {
            duplicates += s
                .iter()
                .map(|&n| u64::from(n.saturating_sub(1)))
                .sum::<u64>();
        }
    }
    let acked = shared.acked.load(Ordering::Relaxed);
    // Backlog: the drain; burst: from due to the last delivery.
    let span_s = drain_s.or(burst_s);
    Ok(RunResult {
        sent: shared.sent.load(Ordering::Relaxed),
        acked,
        received,
        lost,
        duplicates,
        errors: shared.errors.load(Ordering::Relaxed),
        rate_msgs: match span_s {
            Some(s) if s > 0.0 => window_msgs as f64 / s,
            _ => window_msgs as f64 / w.duration_s,
        },
        drain_s,
        // With a filter the consumers' shard scans every message produced
        // (acked), and delivers the ones that pass.
        drain_msgs_per_s: drain_s.filter(|s| *s > 0.0).map(|s| {
            if w.shape.filter.is_some() {
                (acked * shared.fanout) as f64 / s
            } else {
                received as f64 / s
            }
        }),
        consumed_msgs_per_s: match span_s {
            Some(s) if s > 0.0 => received as f64 / s,
            Some(_) => 0.0,
            None => window_msgs as f64 / w.duration_s,
        },
        mb_per_s: match span_s {
            Some(s) if s > 0.0 => window_bytes as f64 / s / 1e6,
            _ => window_bytes as f64 / w.duration_s / 1e6,
        },
        burst_s,
        expected: shared.expected.load(Ordering::Relaxed),
        lateness,
        early,
        acked_after_due,
        mismatched,
        first_mismatch,
        unexpected,
        e2e_by_priority,
        ack,
        e2e,
        steal_pct,
        cpu_busy_pct,
        first_error,
        group_ack,
        redelivery_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_keeps_the_rate_without_saving_up() {
        let mut t = Throttle::new(10_000.0);
        assert_eq!(t.allowance(0), 0);
        assert_eq!(t.allowance(99_999), 0);
        assert_eq!(t.allowance(100_000), 1);
        t.took(1);
        // Taking all it may every 1 ms: 10 a ms, 10,000 a second.
        let mut taken = 1;
        for ms in 1..=1000u64 {
            let n = t.allowance(ms * 1_000_000);
            t.took(n);
            taken += n;
        }
        assert!((9_990..=10_000).contains(&taken), "{taken}");
        // Idle for a second: at most 10 ms' worth at once.
        assert_eq!(t.allowance(2_000_000_000), 100);
        t.took(100);
        assert_eq!(t.allowance(2_000_000_000), 0);
        // A slow rate still gets one at a time.
        let mut slow = Throttle::new(10.0);
        assert_eq!(slow.allowance(5_000_000_000), 1);
    }

    #[test]
    fn priority_histograms_merge() {
        let mut into: Vec<Histogram<u64>> = (0..2).map(|_| histogram()).collect();
        let mut from: Vec<Histogram<u64>> = (0..2).map(|_| histogram()).collect();
        into[0].record(10).unwrap();
        from[0].record(30).unwrap();
        from[1].record(20).unwrap();
        merge_by_priority(&mut into, &from);
        assert_eq!((into[0].len(), into[0].max()), (2, 30));
        assert_eq!((into[1].len(), into[1].max()), (1, 20));
    }

    #[test]
    fn wall_ms_as_instant() {
        let now = Instant::now();
        let past = instant_of_wall_ms(0);
        assert!(past >= now && past < now + Duration::from_secs(1));
        let ahead = instant_of_wall_ms((wall_ns() / 1_000_000) as i64 + 5000);
        let d = ahead.duration_since(now);
        assert!(
            d > Duration::from_millis(4900) && d < Duration::from_millis(5100),
            "{d:?}"
        );
    }
}
