//! Push delivery: a connection's subscriptions.
//!
//! A subscription streams a message-delivery group's messages of one topic
//! to the connection as they become visible, as long as the consumer has
//! credit (messages and bytes it can take). For each shard owning queues
//! of the topic it runs one loop on the connection's shard: a receive at
//! that shard (local, or over the mesh: the same path as a client's
//! receive, with its long poll), then the leases go out as one push frame
//! (`PUSH_FRAME_OP`, the subscription id as request id). The consumer acks,
//! nacks and extends them with ordinary requests.
//!
//! Bounds: [`SUBSCRIPTIONS_PER_CONNECTION_MAX`] per connection; unspent
//! credit at most [`PUSH_CREDIT_MESSAGES_MAX`] messages and
//! `connection_reply_bytes_max` bytes. Message credit is reserved before a
//! receive and is never exceeded; byte credit is checked before one, so a
//! push may pass it by at most one receive (`fetch_bytes_max` plus one
//! batch). Pushed frames wait in the connection's outbox; a client that
//! stops reading stops getting credit-covered pushes written and is cut off
//! after `connection_idle_ms_max` like any other.
//!
//! Messages leased after the subscription stopped (unsubscribe, the
//! connection closing or breaking) are handed back at once (a nack with no
//! delay), so nothing waits out its invisible time.

use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use super::connection::Outbox;
use super::handlers::{body, herr, ready, receive_target, reply, submit, HResult, Pending, Reply};
use crate::protocol::*;
use crate::runtime::{self, Watch};
use crate::shard::Shard;

/// How long each receive of a subscription's loop waits at its shard when
/// nothing is ready: also the most an unsubscribe waits for its loops.
pub const PUSH_POLL_MS: u32 = 250;
/// Pause before a loop retries a receive the broker was too busy for.
const PUSH_RETRY_WAIT: Duration = Duration::from_millis(10);

/// Whether the connection itself serves `op` (not a shard's handler).
pub fn is_subscription_op(op: u16) -> bool {
    matches!(
        Op::from_u16(op),
        Some(Op::Subscribe | Op::Credit | Op::Unsubscribe)
    )
}

/// The subscriptions of one connection.
pub struct Subscriptions {
    next_id: Cell<u64>,
    subs: RefCell<HashMap<u64, Rc<Subscription>>>,
}

struct Subscription {
    id: u64,
    group: String,
    topic: String,
    invisible_ms: u64,
    /// Unspent credit; messages reserved by a receive in flight are taken
    /// out while it runs.
    messages: Cell<i64>,
    bytes: Cell<i64>,
    /// Bumped on every credit change and on stop.
    changed: Watch,
    stopped: Cell<bool>,
    /// Loops still running, and a counter bumped as each ends.
    running: Cell<usize>,
    ended: Watch,
    handed_back: Cell<u64>,
}

impl Subscription {
    fn stop(&self) {
        self.stopped.set(true);
        self.changed.advance(self.changed.get() + 1);
    }
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            next_id: Cell::new(1),
            subs: RefCell::new(HashMap::new()),
        }
    }
}

impl Subscriptions {
    /// Stops every subscription (the connection is closing): their loops
    /// end within [`PUSH_POLL_MS`] and hand back what they lease meanwhile.
    pub fn stop_all(&self) {
        for (_, s) in self.subs.borrow_mut().drain() {
            s.stop();
        }
    }
}

/// Serves `subscribe`, `credit` or `unsubscribe` on this connection.
pub fn handle(
    shard: &Rc<Shard>,
    subs: &Rc<Subscriptions>,
    outbox: &Rc<Outbox>,
    op: u16,
    request: Bytes,
) -> Pending {
    match Op::from_u16(op) {
        Some(Op::Subscribe) => ready(subscribe(shard, subs, outbox, request)),
        Some(Op::Credit) => ready(credit(shard, subs, request)),
        Some(Op::Unsubscribe) => {
            let subs = subs.clone();
            Pending::Later(Box::pin(
                async move { reply(unsubscribe(&subs, request).await) },
            ))
        }
        _ => ready(Err(herr(
            ErrorCode::UnknownOperation,
            "not a subscription operation",
        ))),
    }
}

fn credit_bytes_max(shard: &Shard) -> i64 {
    shard.config.limits.connection_reply_bytes_max as i64
}

fn subscribe(
    shard: &Rc<Shard>,
    subs: &Rc<Subscriptions>,
    outbox: &Rc<Outbox>,
    request: Bytes,
) -> HResult {
    let req = SubscribeRequest::decode(request)?;
    // Busy or a full disk pass: the loops wait them out.
    if let Err(e) = receive_target(shard, &req.group, &req.topic, req.invisible_ms) {
        if !e.code.is_retriable() {
            return Err(e);
        }
    }
    if subs.subs.borrow().len() >= SUBSCRIPTIONS_PER_CONNECTION_MAX {
        return Err(herr(
            ErrorCode::InvalidArgument,
            format!("a connection holds at most {SUBSCRIPTIONS_PER_CONNECTION_MAX} subscriptions"),
        ));
    }
    let mut shards: Vec<u16> = shard
        .metadata
        .borrow()
        .queues(&req.topic)?
        .into_iter()
        .map(|(_, s)| s.0)
        .collect();
    shards.sort_unstable();
    shards.dedup();
    let id = subs.next_id.get();
    subs.next_id.set(id + 1);
    let sub = Rc::new(Subscription {
        id,
        group: req.group,
        topic: req.topic,
        invisible_ms: req.invisible_ms,
        messages: Cell::new(i64::from(req.credit_messages.min(PUSH_CREDIT_MESSAGES_MAX))),
        bytes: Cell::new(i64::from(req.credit_bytes).min(credit_bytes_max(shard))),
        changed: Watch::new(0),
        stopped: Cell::new(false),
        running: Cell::new(shards.len()),
        ended: Watch::new(0),
        handed_back: Cell::new(0),
    });
    subs.subs.borrow_mut().insert(id, sub.clone());
    for &target in &shards {
        runtime::spawn_local_into(
            push_loop(
                shard.clone(),
                sub.clone(),
                outbox.clone(),
                target,
                shards.len(),
            ),
            shard.tq.data,
        )
        .expect("data queue")
        .detach();
    }
    Ok(body(|b| {
        SubscribeResponse {
            subscription: id,
            shards,
        }
        .encode(b)
    }))
}

fn no_subscription(id: u64) -> super::handlers::HandlerError {
    herr(
        ErrorCode::InvalidArgument,
        format!("no subscription {id} on this connection"),
    )
}

fn credit(shard: &Shard, subs: &Subscriptions, request: Bytes) -> HResult {
    let req = CreditRequest::decode(request)?;
    let sub = subs
        .subs
        .borrow()
        .get(&req.subscription)
        .cloned()
        .ok_or_else(|| no_subscription(req.subscription))?;
    let m = (sub.messages.get() + i64::from(req.messages)).min(i64::from(PUSH_CREDIT_MESSAGES_MAX));
    let b = (sub.bytes.get() + i64::from(req.bytes)).min(credit_bytes_max(shard));
    sub.messages.set(m);
    sub.bytes.set(b);
    sub.changed.advance(sub.changed.get() + 1);
    Ok(Vec::new())
}

async fn unsubscribe(subs: &Subscriptions, request: Bytes) -> HResult {
    let id = decode_u64(request)?;
    let sub = subs
        .subs
        .borrow_mut()
        .remove(&id)
        .ok_or_else(|| no_subscription(id))?;
    sub.stop();
    while sub.running.get() > 0 {
        let seen = sub.ended.get();
        let _ = sub.ended.wait_for(seen + 1).await;
    }
    Ok(body(|b| encode_u64(b, sub.handed_back.get())))
}

/// Leases in a receive reply (the head's first field).
fn lease_count(body: &[Bytes]) -> u32 {
    let mut head = [0u8; 4];
    let mut got = 0;
    for c in body {
        let n = (4 - got).min(c.len());
        head[got..got + n].copy_from_slice(&c[..n]);
        got += n;
        if got == 4 {
            return u32::from_le_bytes(head);
        }
    }
    0
}

/// One shard's share of a subscription: receive, push, until stopped.
async fn push_loop(
    shard: Rc<Shard>,
    sub: Rc<Subscription>,
    outbox: Rc<Outbox>,
    target: u16,
    loops: usize,
) {
    loop {
        if sub.stopped.get() || outbox.is_broken() {
            break;
        }
        let (m, b) = (sub.messages.get(), sub.bytes.get());
        if m <= 0 || b <= 0 {
            let seen = sub.changed.get();
            let _ = sub.changed.wait_for(seen + 1).await;
            continue;
        }
        let take = (m as u64)
            .div_ceil(loops as u64)
            .min(u64::from(super::handlers::RECEIVE_MESSAGES_MAX)) as i64;
        sub.messages.set(m - take);
        let mut req = BytesMut::new();
        ReceiveRequest {
            group: sub.group.clone(),
            topic: sub.topic.clone(),
            shard: target,
            max_messages: take as u32,
            invisible_ms: sub.invisible_ms,
            wait_ms: PUSH_POLL_MS,
        }
        .encode(&mut req);
        let reply = submit(&shard, Op::Receive as u16, 1, req.freeze())
            .await
            .resolve()
            .await;
        let got = if reply.code == ErrorCode::Ok {
            i64::from(lease_count(&reply.body))
        } else {
            0
        };
        sub.messages.set(sub.messages.get() + take - got);
        match reply.code {
            ErrorCode::Ok if got == 0 => {}
            ErrorCode::Ok if sub.stopped.get() || outbox.is_broken() => {
                hand_back(&shard, &sub, target, reply.body).await;
                break;
            }
            ErrorCode::Ok => {
                let len: usize = reply.body.iter().map(Bytes::len).sum();
                sub.bytes.set(sub.bytes.get() - len as i64);
                let mut body = Vec::with_capacity(reply.body.len() + 1);
                body.push(Bytes::copy_from_slice(&target.to_le_bytes()));
                body.extend(reply.body);
                shard.metrics.borrow_mut().push_frames += 1;
                outbox.push_frame(
                    PUSH_FRAME_OP,
                    sub.id,
                    Reply {
                        code: ErrorCode::Ok,
                        body,
                    },
                );
            }
            code if code.is_retriable() => runtime::sleep(PUSH_RETRY_WAIT).await,
            _ => {
                // The group, its subscription or the topic went away: the
                // subscription ends, and says why.
                if !sub.stopped.get() {
                    sub.stop();
                    outbox.push_frame(PUSH_FRAME_OP, sub.id, reply);
                }
                break;
            }
        }
    }
    sub.running.set(sub.running.get() - 1);
    sub.ended.advance(sub.ended.get() + 1);
}

/// Nacks (no delay) what a stopped subscription leased, so it is
/// redelivered at once rather than after its invisible time.
async fn hand_back(shard: &Rc<Shard>, sub: &Subscription, target: u16, body: Vec<Bytes>) {
    let mut all = BytesMut::new();
    for c in &body {
        all.extend_from_slice(c);
    }
    let Ok(resp) = ReceiveResponse::decode(all.freeze()) else {
        return;
    };
    let handles: Vec<Bytes> = resp.leases.into_iter().map(|l| l.handle).collect();
    let n = handles.len() as u64;
    for chunk in handles.chunks(HANDLES_PER_REQUEST_MAX) {
        let mut b = BytesMut::new();
        SettleRequest {
            delay_ms: Some(0),
            handles: chunk.to_vec(),
        }
        .encode(true, &mut b);
        let r = submit(shard, Op::Nack as u16, 1, b.freeze())
            .await
            .resolve()
            .await;
        if r.code != ErrorCode::Ok {
            tracing::debug!(
                shard = shard.id,
                target,
                "handing back a stopped subscription's leases: {}",
                r.code.name()
            );
        }
    }
    sub.handed_back.set(sub.handed_back.get() + n);
    shard.metrics.borrow_mut().push_handed_back += n;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_count_is_read_across_chunks() {
        let n = 300u32.to_le_bytes();
        assert_eq!(lease_count(&[Bytes::copy_from_slice(&n)]), 300);
        let split = [
            Bytes::copy_from_slice(&n[..1]),
            Bytes::new(),
            Bytes::copy_from_slice(&n[1..]),
        ];
        assert_eq!(lease_count(&split), 300);
        assert_eq!(lease_count(&[Bytes::copy_from_slice(&n[..3])]), 0);
    }
}
