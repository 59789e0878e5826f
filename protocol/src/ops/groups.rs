//! Consumer-group operations: offset commit and fetch; create, delete,
//! list and describe; receive, ack, nack and change-invisible.

use crate::codec::{DecodeError, Reader, Writer};
use bytes::{Bytes, BytesMut};

/// Commit (with `offset`) or fetch (without) a consumer group's offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupOffsetRequest {
    pub group: String,
    pub topic: String,
    pub queue: u32,
    /// Present for commit, absent for fetch.
    pub offset: Option<u64>,
}

impl GroupOffsetRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.str(&self.group).str(&self.topic).u32(self.queue);
        if let Some(o) = self.offset {
            w.u64(o);
        }
    }
    /// `with_offset`: true for commit.
    pub fn decode(body: Bytes, with_offset: bool) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let group = r.str("group")?;
        let topic = r.str("topic")?;
        let queue = r.u32("queue")?;
        let offset = if with_offset {
            Some(r.u64("offset")?)
        } else {
            None
        };
        r.finish()?;
        Ok(GroupOffsetRequest {
            group,
            topic,
            queue,
            offset,
        })
    }
}

/// Width of a receipt handle on the wire (`group::receipt`).
pub const HANDLE_BYTES: usize = 40;
/// Most handles in one ack or nack request.
pub const HANDLES_PER_REQUEST_MAX: usize = 4096;

/// Create a consumer group: its name and its settings as a JSON object
/// (the fields of `keelmq group create`; absent fields take defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateGroupRequest {
    pub name: String,
    pub settings_json: String,
}

impl CreateGroupRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out).str(&self.name).str(&self.settings_json);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let name = r.str("group")?;
        let settings_json = r.str("settings")?;
        r.finish()?;
        Ok(CreateGroupRequest {
            name,
            settings_json,
        })
    }
}

/// A request naming one group (delete, describe).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRequest {
    pub name: String,
}

impl GroupRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out).str(&self.name);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let name = r.str("group")?;
        r.finish()?;
        Ok(GroupRequest { name })
    }
}

/// Receive (pop) up to `max_messages` from the queues of `topic` that
/// shard `shard` owns, leased for `invisible_ms` (0: the group's default),
/// waiting up to `wait_ms` when none is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveRequest {
    pub group: String,
    pub topic: String,
    pub shard: u16,
    pub max_messages: u32,
    pub invisible_ms: u64,
    pub wait_ms: u32,
}

impl ReceiveRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .str(&self.group)
            .str(&self.topic)
            .u16(self.shard)
            .u32(self.max_messages)
            .u64(self.invisible_ms)
            .u32(self.wait_ms);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let req = ReceiveRequest {
            group: r.str("group")?,
            topic: r.str("topic")?,
            shard: r.u16("shard")?,
            max_messages: r.u32("max_messages")?,
            invisible_ms: r.u64("invisible_ms")?,
            wait_ms: r.u32("wait_ms")?,
        };
        r.finish()?;
        Ok(req)
    }
}

/// One leased message of a receive response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Queue index within the topic.
    pub queue: u32,
    pub offset: u64,
    /// Delivery attempt, 1 for the first.
    pub attempt: u32,
    /// When the lease ends (ms since the epoch) unless acked or extended.
    pub deadline_ms: u64,
    pub handle: Bytes,
    /// Index of the batch (in the response) holding the message.
    pub batch: u32,
}

/// Bytes of one lease in a receive response.
pub const LEASE_INFO_BYTES: usize = 4 + 8 + 4 + 8 + HANDLE_BYTES + 4;

/// Receive response head: the leases, then `batch_count` stored batches
/// back to back (`batch_bytes` in all) follow it in the same body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveResponse {
    pub leases: Vec<LeaseInfo>,
    pub batches: Vec<Bytes>,
}

impl ReceiveResponse {
    /// The head (everything before the batches).
    pub fn encode_head(leases: &[LeaseInfo], batches: &[Bytes], out: &mut BytesMut) {
        out.reserve(12 + leases.len() * LEASE_INFO_BYTES);
        let mut w = Writer(out);
        w.u32(leases.len() as u32);
        for l in leases {
            w.u32(l.queue)
                .u64(l.offset)
                .u32(l.attempt)
                .u64(l.deadline_ms);
            w.0.extend_from_slice(&l.handle);
            w.u32(l.batch);
        }
        let total: usize = batches.iter().map(Bytes::len).sum();
        w.u32(batches.len() as u32).u32(total as u32);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let n = r.u32("lease count")? as usize;
        if n > r.remaining() / LEASE_INFO_BYTES {
            return Err(DecodeError::Truncated("leases"));
        }
        let mut leases = Vec::with_capacity(n);
        for _ in 0..n {
            leases.push(LeaseInfo {
                queue: r.u32("queue")?,
                offset: r.u64("offset")?,
                attempt: r.u32("attempt")?,
                deadline_ms: r.u64("deadline_ms")?,
                handle: r.fixed(HANDLE_BYTES, "handle")?,
                batch: r.u32("batch")?,
            });
        }
        let count = r.u32("batch count")? as usize;
        let total = r.u32("batch bytes")? as usize;
        if total != r.remaining() {
            return Err(DecodeError::Truncated("batches"));
        }
        let mut batches = Vec::with_capacity(count.min(total / 80 + 1));
        for _ in 0..count {
            if r.remaining() < 8 {
                return Err(DecodeError::Truncated("batch header"));
            }
            let len = crate::batch::peek_batch_len(r.peek(8))
                .filter(|&l| l as usize >= crate::batch::BATCH_HEADER_BYTES)
                .ok_or(DecodeError::Truncated("batch"))?;
            batches.push(r.fixed(len as usize, "batch")?);
        }
        r.finish()?;
        if leases.iter().any(|l| l.batch as usize >= batches.len()) {
            return Err(DecodeError::BadValue {
                field: "batch",
                value: u64::from(leases.iter().map(|l| l.batch).max().unwrap_or(0)),
            });
        }
        Ok(ReceiveResponse { leases, batches })
    }
}

/// Ack, or nack, receipt handles (all of one shard). A nack retries after
/// `delay_ms` when given (never negative), else after the group's backoff
/// for the attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleRequest {
    /// Nack only.
    pub delay_ms: Option<i64>,
    pub handles: Vec<Bytes>,
}

impl SettleRequest {
    pub fn encode(&self, nack: bool, out: &mut BytesMut) {
        let mut w = Writer(out);
        if nack {
            w.u8(self.delay_ms.is_some() as u8)
                .i64(self.delay_ms.unwrap_or(0));
        }
        w.u32(self.handles.len() as u32);
        for h in &self.handles {
            w.0.extend_from_slice(h);
        }
    }
    pub fn decode(body: Bytes, nack: bool) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let delay_ms = if nack {
            let has = r.u8("has_delay")?;
            let d = r.i64("delay_ms")?;
            match has {
                0 if d == 0 => None,
                1 => Some(d),
                v => {
                    return Err(DecodeError::BadValue {
                        field: "has_delay",
                        value: u64::from(v),
                    })
                }
            }
        } else {
            None
        };
        let n = r.u32("handle count")? as usize;
        if n == 0 || n > HANDLES_PER_REQUEST_MAX {
            return Err(DecodeError::BadValue {
                field: "handle count",
                value: n as u64,
            });
        }
        if n * HANDLE_BYTES != r.remaining() {
            return Err(DecodeError::Truncated("handles"));
        }
        let handles = (0..n)
            .map(|_| r.fixed(HANDLE_BYTES, "handle"))
            .collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(SettleRequest { delay_ms, handles })
    }
    /// The shard named by the first handle (bytes 2..4), which serves the
    /// request.
    pub fn shard_of(body: &Bytes, nack: bool) -> Option<u16> {
        let head = if nack { 9 } else { 0 };
        let at = head + 4 + 2;
        body.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
}

/// Per handle of an ack or nack, in request order: an error code (0 ok).
pub fn encode_codes(out: &mut BytesMut, codes: &[u16]) {
    let mut w = Writer(out);
    w.u32(codes.len() as u32);
    for &c in codes {
        w.u16(c);
    }
}

pub fn decode_codes(body: Bytes) -> Result<Vec<u16>, DecodeError> {
    let mut r = Reader::new(body);
    let n = r.u32("code count")? as usize;
    if n * 2 != r.remaining() {
        return Err(DecodeError::Truncated("codes"));
    }
    let codes = (0..n).map(|_| r.u16("code")).collect::<Result<_, _>>()?;
    r.finish()?;
    Ok(codes)
}

/// Move a leased message's deadline to `invisible_ms` from now; the
/// response is the new deadline (u64 ms since the epoch), and the handle
/// stays valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeInvisibleRequest {
    pub handle: Bytes,
    pub invisible_ms: u64,
}

impl ChangeInvisibleRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        out.extend_from_slice(&self.handle);
        Writer(out).u64(self.invisible_ms);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let handle = r.fixed(HANDLE_BYTES, "handle")?;
        let invisible_ms = r.u64("invisible_ms")?;
        r.finish()?;
        Ok(ChangeInvisibleRequest {
            handle,
            invisible_ms,
        })
    }
}

/// One granted queue of a member in queue delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantInfo {
    /// Broker-wide queue id (metadata maps it to topic and index).
    pub queue_id: u32,
    /// Grant epoch: commits carry it; a later grant of the queue refuses
    /// the older epoch.
    pub epoch: u64,
}

fn put_grants(w: &mut Writer, grants: &[GrantInfo]) {
    w.u32(grants.len() as u32);
    for g in grants {
        w.u32(g.queue_id).u64(g.epoch);
    }
}

fn get_grants(r: &mut Reader, what: &'static str) -> Result<Vec<GrantInfo>, DecodeError> {
    let n = r.u32(what)? as usize;
    if n > r.remaining() / 12 {
        return Err(DecodeError::Truncated(what));
    }
    (0..n)
        .map(|_| {
            Ok(GrantInfo {
                queue_id: r.u32("queue_id")?,
                epoch: r.u64("epoch")?,
            })
        })
        .collect()
}

/// Join a group in queue delivery as `instance` (a stable name of the
/// process, at most 128 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    pub group: String,
    pub instance: String,
}

impl JoinRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out).str(&self.group).str(&self.instance);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let req = JoinRequest {
            group: r.str("group")?,
            instance: r.str("instance")?,
        };
        r.finish()?;
        Ok(req)
    }
}

/// A member is alive; it released these grants (that it was told to
/// revoke). `leave` ends the membership at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatRequest {
    pub group: String,
    pub member: u64,
    pub released: Vec<GrantInfo>,
}

impl HeartbeatRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.str(&self.group).u64(self.member);
        put_grants(&mut w, &self.released);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let group = r.str("group")?;
        let member = r.u64("member")?;
        let released = get_grants(&mut r, "released")?;
        r.finish()?;
        Ok(HeartbeatRequest {
            group,
            member,
            released,
        })
    }
}

/// The answer to a join or heartbeat: the member's id, the generation,
/// the session timeout and heartbeat interval it must keep, what it holds
/// and what it must release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignmentResponse {
    pub member: u64,
    pub generation: u64,
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub granted: Vec<GrantInfo>,
    pub revoke: Vec<GrantInfo>,
}

impl AssignmentResponse {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.u64(self.member)
            .u64(self.generation)
            .u64(self.session_timeout_ms)
            .u64(self.heartbeat_interval_ms);
        put_grants(&mut w, &self.granted);
        put_grants(&mut w, &self.revoke);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let resp = AssignmentResponse {
            member: r.u64("member")?,
            generation: r.u64("generation")?,
            session_timeout_ms: r.u64("session_timeout_ms")?,
            heartbeat_interval_ms: r.u64("heartbeat_interval_ms")?,
            granted: get_grants(&mut r, "granted")?,
            revoke: get_grants(&mut r, "revoke")?,
        };
        r.finish()?;
        Ok(resp)
    }
}

/// Commit a group's offset of one queue. In queue delivery the member and
/// its grant epoch must be the queue's current holder (else
/// `stale_generation`); in broadcast, `instance` names whose offset it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupCommitRequest {
    pub group: String,
    pub queue_id: u32,
    pub member: u64,
    pub epoch: u64,
    pub instance: String,
    pub offset: u64,
}

impl GroupCommitRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .str(&self.group)
            .u32(self.queue_id)
            .u64(self.member)
            .u64(self.epoch)
            .str(&self.instance)
            .u64(self.offset);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let req = GroupCommitRequest {
            group: r.str("group")?,
            queue_id: r.u32("queue_id")?,
            member: r.u64("member")?,
            epoch: r.u64("epoch")?,
            instance: r.str("instance")?,
            offset: r.u64("offset")?,
        };
        r.finish()?;
        Ok(req)
    }
}

/// Code of the frames a broker pushes to a subscription (never a request):
/// the header's request id is the subscription id, its code `ok` with a
/// [`PushBatch`] body, or an error that ends the subscription.
pub const PUSH_FRAME_OP: u16 = 30;
/// Subscriptions one connection may hold at once.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 16;
/// Most message credit a subscription may hold unspent.
pub const PUSH_CREDIT_MESSAGES_MAX: u32 = 1 << 20;

/// Start pushing a message-delivery group's messages of `topic` on this
/// connection, up to the credit granted (here, then by `credit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub group: String,
    pub topic: String,
    /// 0: the group's default.
    pub invisible_ms: u64,
    pub credit_messages: u32,
    pub credit_bytes: u32,
}

impl SubscribeRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .str(&self.group)
            .str(&self.topic)
            .u64(self.invisible_ms)
            .u32(self.credit_messages)
            .u32(self.credit_bytes);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let req = SubscribeRequest {
            group: r.str("group")?,
            topic: r.str("topic")?,
            invisible_ms: r.u64("invisible_ms")?,
            credit_messages: r.u32("credit_messages")?,
            credit_bytes: r.u32("credit_bytes")?,
        };
        r.finish()?;
        Ok(req)
    }
}

/// The subscription's id (the request id of its push frames) and the
/// shards whose queues it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeResponse {
    pub subscription: u64,
    pub shards: Vec<u16>,
}

impl SubscribeResponse {
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = Writer(out);
        w.u64(self.subscription).u16(self.shards.len() as u16);
        for s in &self.shards {
            w.u16(*s);
        }
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let subscription = r.u64("subscription")?;
        let n = r.u16("shard count")? as usize;
        let mut shards = Vec::with_capacity(n.min(r.remaining() / 2));
        for _ in 0..n {
            shards.push(r.u16("shard")?);
        }
        r.finish()?;
        Ok(SubscribeResponse {
            subscription,
            shards,
        })
    }
}

/// More credit for a subscription (0 and 0: a keepalive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditRequest {
    pub subscription: u64,
    pub messages: u32,
    pub bytes: u32,
}

impl CreditRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        Writer(out)
            .u64(self.subscription)
            .u32(self.messages)
            .u32(self.bytes);
    }
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let req = CreditRequest {
            subscription: r.u64("subscription")?,
            messages: r.u32("messages")?,
            bytes: r.u32("bytes")?,
        };
        r.finish()?;
        Ok(req)
    }
}

/// One push: the shard the leases are of, then a receive response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushBatch {
    pub shard: u16,
    pub response: ReceiveResponse,
}

impl PushBatch {
    pub fn decode(mut body: Bytes) -> Result<Self, DecodeError> {
        if body.len() < 2 {
            return Err(DecodeError::Truncated("shard"));
        }
        let shard = u16::from_le_bytes([body[0], body[1]]);
        let response = ReceiveResponse::decode(body.split_off(2))?;
        Ok(PushBatch { shard, response })
    }
}
