//! Group consumers in message delivery ("pop"): receive leased messages
//! from every queue of a topic, then ack, nack or extend each by its
//! receipt handle. One receive per shard that owns queues of the topic is
//! kept in flight on the one connection (a long poll at each), so a
//! `receive` returns as soon as any shard has messages; acks and nacks are
//! sent to the shard named by each handle, batched.
//!
//! [`GroupConsumer::subscribe`] turns it into a push consumer: the broker
//! streams messages as they become visible, within the credit the
//! consumer grants (messages and bytes it can buffer), and `receive` /
//! `run` then take what was pushed. Credit is granted back as the caller
//! takes messages out of the buffer.

use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::conn::{check, Connection, Incoming};
use super::{decode_batch, ClientError, ErrorCode, Message};
use crate::protocol::*;

/// A leased message.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message itself.
    pub message: Message,
    /// Delivery attempt, 1 for the first.
    pub attempt: u32,
    /// When the lease ends unless acked or extended (ms since the epoch).
    pub deadline_ms: u64,
    /// The receipt handle (40 bytes) that acks, nacks or extends it.
    pub handle: Bytes,
}

/// What a listener decides for one message ([`GroupConsumer::run`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: ack it.
    Ack,
    /// Failed: redeliver after the group's backoff for this attempt.
    Retry,
    /// Failed: redeliver after this delay.
    RetryAfter(Duration),
}

/// A member of a consumer group in message delivery.
pub struct GroupConsumer {
    conn: Connection,
    group: String,
    topic: String,
    shards: Vec<u16>,
    /// receive request id → shard
    in_flight: HashMap<u64, u16>,
    /// Acks sent without waiting: request id → handles (sent again when
    /// the broker was busy).
    unconfirmed: HashMap<u64, Unsettled>,
    /// Those of `unconfirmed` that are resent after a `busy`: the first
    /// may have been applied, so `already_acked` is their success.
    resent: std::collections::HashSet<u64>,
    /// Handles of unconfirmed acks the broker refused, and why (first).
    refused: u64,
    first_refusal: Option<ErrorCode>,
    /// Leased messages not yet returned, each with its share of the push
    /// credit it took (0 when pulled).
    ready: VecDeque<(Delivery, u32)>,
    max_per_receive: u32,
    invisible_ms: u64,
    wait: Duration,
    push: Option<PushState>,
    /// [`GroupConsumer::ack_nowait`] handles not sent yet, and since when
    /// the oldest waits.
    lingering: Vec<Bytes>,
    lingering_since: Option<Instant>,
    ack_linger: Duration,
    /// Shards whose last reply was at least half full (two receives in
    /// flight there).
    loaded: std::collections::HashSet<u16>,
}

/// Acks or nacks sent without waiting, until confirmed.
struct Unsettled {
    handles: Vec<Bytes>,
    /// `None`: acks; `Some(delay)`: nacks.
    nack: Option<Option<Duration>>,
}

/// A push subscription's credit, on the client's side.
struct PushState {
    subscription: u64,
    /// The credit granted at subscribe: what the client buffers at most.
    window_messages: u32,
    window_bytes: u32,
    /// Taken by the caller and not yet granted back.
    returned_messages: u32,
    returned_bytes: u64,
    /// Requests (credit grants) whose replies are only checked.
    grants: std::collections::HashSet<u64>,
    last_sent: Instant,
}

/// Message credit a push subscription starts with by default.
pub const PUSH_CREDIT_MESSAGES_DEFAULT: u32 = 1024;
/// Byte credit a push subscription starts with by default.
pub const PUSH_CREDIT_BYTES_DEFAULT: u32 = 8 << 20;
/// An idle subscription's keepalive (an empty credit grant): well inside
/// the broker's `connection_idle_ms_max` (default 10 minutes).
const PUSH_KEEPALIVE: Duration = Duration::from_secs(30);

/// How long [`GroupConsumer::ack_nowait`] holds acks by default to send
/// several in one request: at 10,000 messages a second, one ack request
/// per ~10 messages instead of one per message (each request the broker
/// reads can land between a publish and its delivery).
pub const ACK_LINGER_DEFAULT: Duration = Duration::from_millis(1);

/// Most receives kept in flight per shard: two while the shard's replies
/// come at least half full (the broker fills one while the caller works
/// through the other), one otherwise (a second waiting receive would only
/// wake with the first on every publish and find nothing).
pub const RECEIVES_IN_FLIGHT_PER_SHARD: usize = 2;
/// Most messages one receive asks for by default.
pub const RECEIVE_BATCH_DEFAULT: u32 = 256;

impl GroupConsumer {
    /// Connects, and subscribes to `topic` as a member of `group`, which is
    /// created (message delivery, the defaults) when it does not exist.
    pub fn connect(addr: &str, group: &str, topic: &str) -> Result<GroupConsumer, ClientError> {
        GroupConsumer::connect_filtered(addr, group, topic, None)
    }

    /// [`GroupConsumer::connect`] with the subscription's filter: a group
    /// created now gets it (the broker filters for the whole group:
    /// messages it does not pass are finished unsent); an existing group
    /// must have this very filter on `topic` (`invalid_argument` if not:
    /// a group's filter is set when it is created).
    pub fn connect_filtered(
        addr: &str,
        group: &str,
        topic: &str,
        filter: Option<FilterSpec>,
    ) -> Result<GroupConsumer, ClientError> {
        // `*` is every message: no filter.
        let filter =
            filter.filter(|f| !(f.kind == crate::FilterType::Tag && f.expression.trim() == "*"));
        let conn = Connection::connect(addr)?;
        let mut c = GroupConsumer {
            conn,
            group: group.to_owned(),
            topic: topic.to_owned(),
            shards: Vec::new(),
            in_flight: HashMap::new(),
            unconfirmed: HashMap::new(),
            resent: std::collections::HashSet::new(),
            refused: 0,
            first_refusal: None,
            ready: VecDeque::new(),
            max_per_receive: RECEIVE_BATCH_DEFAULT,
            invisible_ms: 0,
            wait: Duration::from_secs(1),
            push: None,
            lingering: Vec::new(),
            lingering_since: None,
            ack_linger: ACK_LINGER_DEFAULT,
            loaded: std::collections::HashSet::new(),
        };
        c.ensure_group(filter.as_ref())?;
        c.refresh_shards()?;
        Ok(c)
    }

    fn ensure_group(&mut self, filter: Option<&FilterSpec>) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        let mut subscription = serde_json::json!({ "topic": self.topic });
        if let Some(f) = filter {
            subscription["filter"] = f.expression.clone().into();
            subscription["filter_type"] = f.kind.name().into();
        }
        let settings = serde_json::json!({
            "subscriptions": [subscription],
        });
        CreateGroupRequest {
            name: self.group.clone(),
            settings_json: settings.to_string(),
        }
        .encode(&mut b);
        match self.conn.call(Op::CreateGroup, &b) {
            Ok(_) => Ok(()),
            Err(ClientError::Broker {
                code: ErrorCode::GroupExists,
                ..
            }) => match filter {
                None => Ok(()),
                Some(f) => {
                    let mut b = BytesMut::new();
                    GroupRequest {
                        name: self.group.clone(),
                    }
                    .encode(&mut b);
                    let body = self.conn.call(Op::DescribeGroup, &b)?;
                    let v: serde_json::Value = serde_json::from_slice(&body)
                        .map_err(|e| ClientError::Protocol(format!("describe: {e}")))?;
                    let has = crate::subscription_filter(&v["settings"], &self.topic);
                    if has.as_ref() == Some(f) {
                        Ok(())
                    } else {
                        Err(ClientError::InvalidArgument(format!(
                            "group {} filters `{}` with {}; this consumer asks for {} `{}` (a group's filter is set when it is created)",
                            self.group,
                            self.topic,
                            has.map_or("nothing".to_owned(), |h| format!("{} `{}`", h.kind.name(), h.expression)),
                            f.kind.name(),
                            f.expression
                        )))
                    }
                }
            },
            Err(e) => Err(e),
        }
    }

    fn refresh_shards(&mut self) -> Result<(), ClientError> {
        let info = self.conn.topic_info(&self.topic)?;
        let mut shards: Vec<u16> = info.queues.iter().map(|q| q.shard).collect();
        shards.sort_unstable();
        shards.dedup();
        self.shards = shards;
        Ok(())
    }

    /// Messages received but not yet returned by [`GroupConsumer::receive`]
    /// stay leased; at most this many are asked for per shard.
    /// Messages one receive asks each shard for (1..=4096).
    pub fn set_receive_batch(&mut self, n: u32) {
        self.max_per_receive = n.clamp(1, 4096);
    }

    /// Invisible time of received messages; `None`: the group's default.
    pub fn set_invisible(&mut self, d: Option<Duration>) {
        self.invisible_ms = d.map_or(0, |d| d.as_millis() as u64);
    }

    /// How long [`GroupConsumer::ack_nowait`] may hold acks to send them
    /// together (default [`ACK_LINGER_DEFAULT`]; zero: each call sends at
    /// once). Held acks go out when the time passes (checked by every
    /// call), when a request's worth has gathered, before a blocking call
    /// waits past it, and at close.
    pub fn set_ack_linger(&mut self, d: Duration) {
        self.ack_linger = d;
    }

    /// How long each receive waits at the broker when nothing is ready
    /// (default 1 s; it stays in flight across calls to `receive`).
    pub fn set_wait(&mut self, d: Duration) {
        self.wait = d;
    }

    /// Busy-poll mode (see [`Connection::set_busy_poll`]).
    pub fn set_busy_poll(&mut self, on: bool) -> Result<(), ClientError> {
        self.conn.set_busy_poll(on)
    }

    /// Waits up to `timeout` for leased messages; returns what arrived.
    pub fn receive(&mut self, timeout: Duration) -> Result<Vec<Delivery>, ClientError> {
        self.receive_at_most(usize::MAX, timeout)
    }

    /// Like [`GroupConsumer::receive`], returning at most `max` (the rest
    /// stay leased to this consumer for the next call, or are handed back
    /// by [`GroupConsumer::close`]).
    pub fn receive_at_most(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>, ClientError> {
        if self.push.is_some() {
            return self.receive_pushed(max, timeout);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if !self.ready.is_empty() {
                let n = max.min(self.ready.len());
                return Ok(self.ready.drain(..n).map(|(d, _)| d).collect());
            }
            self.flush_acks_due()?;
            // Written by the read below.
            self.queue_receives();
            let until = self.acks_due_at().map_or(deadline, |t| t.min(deadline));
            let Some((id, code, body)) = self.conn.recv_any(Some(until))? else {
                if until < deadline {
                    continue;
                }
                return Ok(Vec::new());
            };
            if let Some(u) = self.unconfirmed.remove(&id) {
                self.on_confirm(id, code, body, u)?;
                continue;
            }
            let Some(shard) = self.in_flight.remove(&id) else {
                continue;
            };
            let resp = ReceiveResponse::decode(check(code, body)?)?;
            if resp.leases.len() * 2 >= self.max_per_receive as usize {
                self.loaded.insert(shard);
            } else {
                self.loaded.remove(&shard);
            }
            self.on_response(shard, resp, 0)?;
        }
    }

    /// Queues receives (written with the next write) so that each shard
    /// has one in flight, or [`RECEIVES_IN_FLIGHT_PER_SHARD`] while its
    /// replies come at least half full. The broker
    /// long-polls for `wait` whatever the caller's timeout: receives stay
    /// in flight across calls (a non-blocking caller does not flood the
    /// broker with empty receives).
    fn queue_receives(&mut self) {
        let wait = self.wait;
        for &s in &self.shards {
            let want = if self.loaded.contains(&s) {
                RECEIVES_IN_FLIGHT_PER_SHARD
            } else {
                1
            };
            if self.in_flight.values().filter(|&&v| v == s).count() >= want {
                continue;
            }
            let mut b = BytesMut::new();
            ReceiveRequest {
                group: self.group.clone(),
                topic: self.topic.clone(),
                shard: s,
                max_messages: self.max_per_receive,
                invisible_ms: self.invisible_ms,
                wait_ms: wait.as_millis() as u32,
            }
            .encode(&mut b);
            let id = self.conn.queue(Op::Receive, &b);
            self.in_flight.insert(id, s);
        }
    }

    /// Push mode: the broker streams messages within `credit_messages`
    /// messages and `credit_bytes` bytes not yet taken by the caller (the
    /// most this consumer buffers; the broker may pass the byte credit by
    /// one receive). `receive` and `run` then return pushed messages, and
    /// credit is granted back as they are taken. Receives in flight are
    /// finished first.
    pub fn subscribe(
        &mut self,
        credit_messages: u32,
        credit_bytes: u32,
    ) -> Result<(), ClientError> {
        if self.push.is_some() {
            return Err(ClientError::InvalidArgument(
                "this consumer is already subscribed".into(),
            ));
        }
        let credit_messages = credit_messages.clamp(1, PUSH_CREDIT_MESSAGES_MAX);
        let credit_bytes = credit_bytes.max(1);
        self.drain_in_flight(false)?;
        let mut b = BytesMut::new();
        SubscribeRequest {
            group: self.group.clone(),
            topic: self.topic.clone(),
            invisible_ms: self.invisible_ms,
            credit_messages,
            credit_bytes,
        }
        .encode(&mut b);
        let resp = SubscribeResponse::decode(self.conn.call(Op::Subscribe, &b)?)?;
        self.push = Some(PushState {
            subscription: resp.subscription,
            window_messages: credit_messages,
            window_bytes: credit_bytes,
            returned_messages: 0,
            returned_bytes: 0,
            grants: std::collections::HashSet::new(),
            last_sent: Instant::now(),
        });
        Ok(())
    }

    /// Whether this consumer is in push mode.
    pub fn is_subscribed(&self) -> bool {
        self.push.is_some()
    }

    fn receive_pushed(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.ready.is_empty() {
                let n = max.min(self.ready.len());
                let mut out = Vec::with_capacity(n);
                let (mut msgs, mut bytes) = (0u32, 0u64);
                for (d, cost) in self.ready.drain(..n) {
                    msgs += 1;
                    bytes += u64::from(cost);
                    out.push(d);
                }
                self.grant_back(msgs, bytes)?;
                return Ok(out);
            }
            self.keepalive()?;
            self.flush_acks_due()?;
            let busy = self.conn.busy_poll();
            let until = self.acks_due_at().map_or(deadline, |t| t.min(deadline));
            let Some(frame) = self.conn.recv_incoming(Some(until))? else {
                if until < deadline || busy && Instant::now() < deadline {
                    std::hint::spin_loop();
                    continue;
                }
                return Ok(Vec::new());
            };
            self.on_incoming(frame)?;
        }
    }

    fn on_incoming(&mut self, frame: Incoming) -> Result<(), ClientError> {
        match frame {
            Incoming::Push {
                subscription,
                code,
                body,
            } => {
                let Some(p) = &self.push else {
                    return Ok(());
                };
                if p.subscription != subscription {
                    return Ok(());
                }
                let len = body.len().saturating_sub(2) as u32;
                let batch = PushBatch::decode(check(code, body)?)?;
                self.on_response(batch.shard, batch.response, len)
            }
            Incoming::Reply { id, code, body } => {
                if let Some(u) = self.unconfirmed.remove(&id) {
                    return self.on_confirm(id, code, body, u);
                }
                if let Some(p) = &mut self.push {
                    if p.grants.remove(&id) {
                        check(code, body)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Grants credit back for messages the caller took, in steps of a
    /// quarter of the window (one small request per many messages).
    fn grant_back(&mut self, msgs: u32, bytes: u64) -> Result<(), ClientError> {
        let Some(p) = &mut self.push else {
            return Ok(());
        };
        p.returned_messages += msgs;
        p.returned_bytes += bytes;
        if p.returned_messages < p.window_messages.div_ceil(4)
            && p.returned_bytes < u64::from(p.window_bytes.div_ceil(4))
        {
            return Ok(());
        }
        let req = CreditRequest {
            subscription: p.subscription,
            messages: p.returned_messages,
            bytes: p.returned_bytes.min(u64::from(u32::MAX)) as u32,
        };
        p.returned_messages = 0;
        p.returned_bytes = 0;
        self.send_credit(req)
    }

    fn send_credit(&mut self, req: CreditRequest) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        req.encode(&mut b);
        let id = self.conn.send(Op::Credit, &b)?;
        if let Some(p) = &mut self.push {
            p.grants.insert(id);
            p.last_sent = Instant::now();
        }
        Ok(())
    }

    fn keepalive(&mut self) -> Result<(), ClientError> {
        let Some(p) = &self.push else {
            return Ok(());
        };
        if p.last_sent.elapsed() < PUSH_KEEPALIVE {
            return Ok(());
        }
        let req = CreditRequest {
            subscription: p.subscription,
            messages: 0,
            bytes: 0,
        };
        self.send_credit(req)
    }

    /// Waits for the receives in flight (pull mode), keeping what they
    /// leased (and, with `acks`, for the unconfirmed acks too).
    fn drain_in_flight(&mut self, acks: bool) -> Result<(), ClientError> {
        if acks {
            self.send_lingering(false)?;
        }
        let deadline = Instant::now() + self.wait + Duration::from_millis(500);
        while !self.in_flight.is_empty() || acks && !self.unconfirmed.is_empty() {
            let Some((id, code, body)) = self.conn.recv_any(Some(deadline))? else {
                break;
            };
            if let Some(u) = self.unconfirmed.remove(&id) {
                self.on_confirm(id, code, body, u)?;
            } else if let Some(shard) = self.in_flight.remove(&id) {
                let resp = ReceiveResponse::decode(check(code, body)?)?;
                self.on_response(shard, resp, 0)?;
            }
        }
        self.in_flight.clear();
        Ok(())
    }

    fn on_confirm(
        &mut self,
        id: u64,
        code: u16,
        body: Bytes,
        u: Unsettled,
    ) -> Result<(), ClientError> {
        let resent = self.resent.remove(&id);
        if ErrorCode::from_u16(code).is_retriable() {
            // Busy or a full disk: they may have been applied but not
            // stored (the broker waited `SETTLE_WAIT_MAX` for room); send
            // them again, and take `already_acked` (an ack) or
            // `stale_receipt` (a nack: the lease moved on) as done.
            return self.send_settles(&u.handles, u.nack, true);
        }
        let done_before = if u.nack.is_some() {
            ErrorCode::StaleReceipt
        } else {
            ErrorCode::AlreadyAcked
        };
        for c in decode_codes(check(code, body)?)? {
            let c = ErrorCode::from_u16(c);
            if c != ErrorCode::Ok && !(resent && c == done_before) {
                self.refused += 1;
                self.first_refusal.get_or_insert(c);
            }
        }
        Ok(())
    }

    /// Acks without waiting for the broker: the acks are held up to the
    /// ack linger ([`GroupConsumer::set_ack_linger`], 1 ms by default) to
    /// share one request, and the confirmations are taken by later calls
    /// (see [`GroupConsumer::refused`]). The cheapest way to ack from a
    /// receive loop; [`GroupConsumer::close`] sends what is held.
    pub fn ack_nowait(&mut self, handles: &[Bytes]) -> Result<(), ClientError> {
        if handles.is_empty() {
            return self.flush_acks_due();
        }
        self.lingering.extend_from_slice(handles);
        self.lingering_since.get_or_insert_with(Instant::now);
        if self.lingering.len() >= HANDLES_PER_REQUEST_MAX {
            return self.flush_acks();
        }
        self.flush_acks_due()
    }

    /// Sends the held acks if the oldest has waited its linger.
    fn flush_acks_due(&mut self) -> Result<(), ClientError> {
        match self.lingering_since {
            Some(t) if t.elapsed() >= self.ack_linger => self.flush_acks(),
            _ => Ok(()),
        }
    }

    /// When the held acks must go out (`None`: none held).
    fn acks_due_at(&self) -> Option<Instant> {
        self.lingering_since.map(|t| t + self.ack_linger)
    }

    /// Sends the held acks now. A pull consumer's next receives go in the
    /// same write (one syscall for both; the next receive would send them
    /// anyway).
    fn flush_acks(&mut self) -> Result<(), ClientError> {
        self.send_lingering(true)
    }

    /// `top_up`: also queue the receives the consumer keeps in flight
    /// (not while it closes).
    fn send_lingering(&mut self, top_up: bool) -> Result<(), ClientError> {
        self.lingering_since = None;
        if self.lingering.is_empty() {
            return Ok(());
        }
        let handles = std::mem::take(&mut self.lingering);
        if top_up && self.push.is_none() && self.ready.is_empty() {
            self.queue_receives();
        }
        self.send_settles(&handles, None, false)
    }

    /// Nacks without waiting for the broker, like
    /// [`GroupConsumer::ack_nowait`] but sent at once (the retry delay
    /// counts from the broker's receipt of the nack): each message is
    /// redelivered after `delay`, or after the group's backoff for its
    /// attempt when `None`.
    pub fn nack_nowait(
        &mut self,
        handles: &[Bytes],
        delay: Option<Duration>,
    ) -> Result<(), ClientError> {
        self.send_settles(handles, Some(delay), false)
    }

    /// Sends acks (`nack` `None`) or nacks without waiting; their
    /// confirmations are taken by later calls.
    fn send_settles(
        &mut self,
        handles: &[Bytes],
        nack: Option<Option<Duration>>,
        resend: bool,
    ) -> Result<(), ClientError> {
        let shard_of = |h: &Bytes| h.get(2..4).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        let mut by_shard: HashMap<u16, Vec<Bytes>> = HashMap::new();
        for h in handles {
            by_shard.entry(shard_of(h)).or_default().push(h.clone());
        }
        for (_, hs) in by_shard {
            for chunk in hs.chunks(HANDLES_PER_REQUEST_MAX) {
                let mut b = BytesMut::new();
                SettleRequest {
                    delay_ms: nack.flatten().map(|d| d.as_millis() as i64),
                    handles: chunk.to_vec(),
                }
                .encode(nack.is_some(), &mut b);
                let op = if nack.is_some() { Op::Nack } else { Op::Ack };
                let id = self.conn.send(op, &b)?;
                self.unconfirmed.insert(
                    id,
                    Unsettled {
                        handles: chunk.to_vec(),
                        nack,
                    },
                );
                if resend {
                    self.resent.insert(id);
                }
            }
        }
        Ok(())
    }

    /// Handles of [`GroupConsumer::ack_nowait`] acks (and
    /// [`GroupConsumer::nack_nowait`] nacks) the broker refused so far, and
    /// the first reason.
    pub fn refused(&self) -> (u64, Option<ErrorCode>) {
        (self.refused, self.first_refusal)
    }

    /// Takes a receive's (or a push's) leases into `ready`; `cost`: the
    /// push credit (bytes) it took, shared among its messages.
    fn on_response(
        &mut self,
        shard: u16,
        resp: ReceiveResponse,
        cost: u32,
    ) -> Result<(), ClientError> {
        let n = resp.leases.len().max(1) as u32;
        let (share, mut extra) = (cost / n, cost % n);
        let topic: std::sync::Arc<str> = self.topic.as_str().into();
        // Per batch, its messages by offset (a view holds only some of its
        // source's offsets); each is leased at most once per receive.
        let mut decoded: HashMap<u32, Vec<(u64, Option<Message>)>> = HashMap::new();
        for l in resp.leases {
            let msgs = match decoded.entry(l.batch) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(
                    decode_batch(&topic, l.queue, shard, &resp.batches[l.batch as usize], 0)?
                        .into_iter()
                        .map(|m| (m.offset, Some(m)))
                        .collect(),
                ),
            };
            let base = resp.batches[l.batch as usize]
                .get(16..24)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            let at = msgs
                .binary_search_by_key(&l.offset, |(o, _)| *o)
                .ok()
                .and_then(|i| msgs[i].1.take());
            let Some(m) = at else {
                return Err(ClientError::Protocol(format!(
                    "receive: offset {} of queue {} is not in its batch {} (base {base:?}, {} records; {} batches, {} leases)",
                    l.offset,
                    l.queue,
                    l.batch,
                    msgs.len(),
                    resp.batches.len(),
                    n
                )));
            };
            let c = share + u32::from(extra > 0);
            extra = extra.saturating_sub(1);
            self.ready.push_back((
                Delivery {
                    message: m,
                    attempt: l.attempt,
                    deadline_ms: l.deadline_ms,
                    handle: l.handle,
                },
                c,
            ));
        }
        Ok(())
    }

    fn settle(
        &mut self,
        handles: &[Bytes],
        nack: Option<Option<Duration>>,
    ) -> Result<Vec<ErrorCode>, ClientError> {
        let shard_of = |h: &Bytes| h.get(2..4).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        let mut by_shard: HashMap<u16, Vec<usize>> = HashMap::new();
        for (i, h) in handles.iter().enumerate() {
            by_shard.entry(shard_of(h)).or_default().push(i);
        }
        let mut out = vec![ErrorCode::Ok; handles.len()];
        let mut sent = Vec::new();
        for (_, idx) in by_shard {
            for chunk in idx.chunks(HANDLES_PER_REQUEST_MAX) {
                let req = SettleRequest {
                    delay_ms: nack.flatten().map(|d| d.as_millis() as i64),
                    handles: chunk.iter().map(|&i| handles[i].clone()).collect(),
                };
                let mut b = BytesMut::new();
                req.encode(nack.is_some(), &mut b);
                let op = if nack.is_some() { Op::Nack } else { Op::Ack };
                let id = self.conn.send(op, &b)?;
                sent.push((id, chunk.to_vec()));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        // Confirmations of earlier unconfirmed acks first (they are older).
        while let Some(&id) = self.unconfirmed.keys().next() {
            let (code, body) = self.conn.wait_for(id, deadline)?;
            if let Some(u) = self.unconfirmed.remove(&id) {
                self.on_confirm(id, code, body, u)?;
            }
        }
        for (id, idx) in sent {
            let (code, body) = self.conn.wait_for(id, deadline)?;
            let codes = decode_codes(check(code, body)?)?;
            for (i, c) in idx.into_iter().zip(codes) {
                out[i] = ErrorCode::from_u16(c);
            }
        }
        Ok(out)
    }

    /// Acknowledges messages; one code per handle (`Ok`, or why not:
    /// `stale_receipt`, `already_acked`, `invisible_receipt`...). Returns once
    /// the acks are durable at the group's level.
    pub fn ack(&mut self, handles: &[Bytes]) -> Result<Vec<ErrorCode>, ClientError> {
        self.send_lingering(false)?;
        self.settle(handles, None)
    }

    /// Fails messages: each is redelivered after `delay`, or after the
    /// group's backoff for its attempt when `None`.
    pub fn nack(
        &mut self,
        handles: &[Bytes],
        delay: Option<Duration>,
    ) -> Result<Vec<ErrorCode>, ClientError> {
        self.settle(handles, Some(delay))
    }

    /// Moves a leased message's deadline to `invisible` from now; returns
    /// the new deadline (ms since the epoch). The handle stays valid.
    pub fn change_invisible(
        &mut self,
        handle: &Bytes,
        invisible: Duration,
    ) -> Result<u64, ClientError> {
        let mut b = BytesMut::new();
        ChangeInvisibleRequest {
            handle: handle.clone(),
            invisible_ms: invisible.as_millis() as u64,
        }
        .encode(&mut b);
        Ok(decode_u64(self.conn.call(Op::ChangeInvisible, &b)?)?)
    }

    /// Leaves cleanly: waits (up to the receive wait) for the receives
    /// still in flight and hands back every message they and earlier
    /// receives leased but the caller never got (a nack with no delay), so
    /// nothing waits out its invisible time. Dropping the consumer does
    /// the same. A handed-back message was delivered: its next delivery is
    /// the next attempt (it counts toward `attempts_max`).
    pub fn close(&mut self) -> Result<(), ClientError> {
        if let Some(p) = self.push.take() {
            // Pushes sent before the unsubscribe's reply arrive before it.
            let mut b = BytesMut::new();
            encode_u64(&mut b, p.subscription);
            let id = self.conn.send(Op::Unsubscribe, &b)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.conn.recv_incoming(Some(deadline))? {
                    None => return Err(ClientError::Timeout),
                    Some(Incoming::Reply {
                        id: got,
                        code,
                        body,
                    }) if got == id => {
                        check(code, body)?;
                        break;
                    }
                    Some(Incoming::Push {
                        subscription,
                        code,
                        body,
                    }) if subscription == p.subscription && code == ErrorCode::Ok as u16 => {
                        let batch = PushBatch::decode(body)?;
                        self.on_response(batch.shard, batch.response, 0)?;
                    }
                    Some(Incoming::Reply { id, code, body }) => {
                        if let Some(u) = self.unconfirmed.remove(&id) {
                            self.on_confirm(id, code, body, u)?;
                        }
                    }
                    Some(Incoming::Push { .. }) => {}
                }
            }
        }
        self.drain_in_flight(true)?;
        let handles: Vec<Bytes> = self.ready.drain(..).map(|(d, _)| d.handle).collect();
        if !handles.is_empty() {
            self.nack(&handles, Some(Duration::ZERO))?;
        }
        Ok(())
    }

    /// Runs `f` on every message until it returns an error or `stop` says
    /// so (checked between receives); acks or nacks each by its outcome.
    pub fn run(
        &mut self,
        mut stop: impl FnMut() -> bool,
        mut f: impl FnMut(&Delivery) -> Outcome,
    ) -> Result<(), ClientError> {
        while !stop() {
            let got = self.receive(Duration::from_millis(500))?;
            let mut acks = Vec::new();
            for d in &got {
                match f(d) {
                    Outcome::Ack => acks.push(d.handle.clone()),
                    Outcome::Retry => {
                        self.nack(std::slice::from_ref(&d.handle), None)?;
                    }
                    Outcome::RetryAfter(t) => {
                        self.nack(std::slice::from_ref(&d.handle), Some(t))?;
                    }
                }
            }
            if !acks.is_empty() {
                self.ack(&acks)?;
            }
        }
        Ok(())
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
