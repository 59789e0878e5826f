//! Group members in queue delivery (clustering: the broker assigns each
//! queue to one member at a time) and broadcast (every instance reads
//! every queue). A member fetches its queues from the group's committed
//! offsets and commits its positions; the broker fences commits by grant
//! epoch, so a member whose queue moved can no longer commit it.
//!
//! The member keeps the rules the coordinator's simulation checks
//! (`group/membership.rs`): it heartbeats every interval from inside
//! [`GroupMember::poll`]; it stops serving a queue before releasing it
//! (after committing its position); it holds nothing once
//! `session_timeout_ms` passed since it sent the last heartbeat that was
//! answered, and joins again.

use bytes::BytesMut;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::conn::Connection;
use super::consumer::{Consumer, SeekTo};
use super::{ClientError, ErrorCode, Message};
use crate::protocol::*;

/// Called when the member starts (`true`) or stops (`false`) serving a
/// queue index, before anything else happens to it.
pub type AssignmentListener = Box<dyn FnMut(u32, bool) + Send>;

/// A member of a consumer group in queue delivery or broadcast.
pub struct GroupMember {
    control: Connection,
    consumer: Consumer,
    group: String,
    topic: String,
    instance: String,
    broadcast: bool,
    start_earliest: bool,
    /// queue index → queue id
    queue_ids: Vec<u32>,
    member: Option<u64>,
    /// queue index → grant epoch (broadcast: every queue, epoch 0)
    held: BTreeMap<u32, u64>,
    to_release: Vec<GrantInfo>,
    session_timeout: Duration,
    heartbeat_interval: Duration,
    /// When the last answered heartbeat (or join) was sent.
    last_answered_send: Instant,
    next_heartbeat: Instant,
    listener: Option<AssignmentListener>,
}

fn group_settings(conn: &mut Connection, group: &str) -> Result<serde_json::Value, ClientError> {
    let mut b = BytesMut::new();
    GroupRequest {
        name: group.to_owned(),
    }
    .encode(&mut b);
    let body = conn.call(Op::DescribeGroup, &b)?;
    serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(format!("describe: {e}")))
}

impl GroupMember {
    /// Connects and joins `group` (created in queue delivery when it does
    /// not exist) as `instance` (a stable name of this process), to consume
    /// `topic`.
    pub fn connect(
        addr: &str,
        group: &str,
        topic: &str,
        instance: &str,
    ) -> Result<GroupMember, ClientError> {
        let mut control = Connection::connect(addr)?;
        let settings = match group_settings(&mut control, group) {
            Ok(v) => v,
            Err(ClientError::Broker {
                code: ErrorCode::UnknownGroup,
                ..
            }) => {
                let mut b = BytesMut::new();
                CreateGroupRequest {
                    name: group.to_owned(),
                    settings_json: serde_json::json!({
                        "delivery": "queue",
                        "subscriptions": [{"topic": topic}],
                    })
                    .to_string(),
                }
                .encode(&mut b);
                match control.call(Op::CreateGroup, &b) {
                    Ok(_)
                    | Err(ClientError::Broker {
                        code: ErrorCode::GroupExists,
                        ..
                    }) => {}
                    Err(e) => return Err(e),
                }
                group_settings(&mut control, group)?
            }
            Err(e) => return Err(e),
        };
        let s = &settings["settings"];
        if s["delivery"] != "queue" {
            return Err(ClientError::InvalidArgument(format!(
                "group {group} uses message delivery: use GroupConsumer"
            )));
        }
        let info = control.topic_info(topic)?;
        let now = Instant::now();
        // The broker applies the group's filter to the member's fetches
        // (skipped messages still move the committed offset on).
        let mut consumer = Consumer::connect(addr)?;
        consumer.set_filter(crate::subscription_filter(s, topic));
        let mut m = GroupMember {
            control,
            consumer,
            group: group.to_owned(),
            topic: topic.to_owned(),
            instance: instance.to_owned(),
            broadcast: s["mode"] == "broadcast",
            start_earliest: s["start"] == "earliest",
            queue_ids: info.queues.iter().map(|q| q.queue_id).collect(),
            member: None,
            held: BTreeMap::new(),
            to_release: Vec::new(),
            session_timeout: Duration::from_millis(
                s["session_timeout_ms"].as_u64().unwrap_or(10_000),
            ),
            heartbeat_interval: Duration::from_secs(1),
            last_answered_send: now,
            next_heartbeat: now,
            listener: None,
        };
        if m.broadcast {
            let all: Vec<u32> = (0..m.queue_ids.len() as u32).collect();
            let added: BTreeMap<u32, u64> = all.iter().map(|&q| (q, 0)).collect();
            m.reassign(added)?;
        } else {
            m.join()?;
        }
        Ok(m)
    }

    /// Calls `f` whenever a queue starts or stops being served (at once
    /// for each queue served now).
    pub fn set_listener(&mut self, mut f: AssignmentListener) {
        for q in self.held() {
            f(q, true);
        }
        self.listener = Some(f);
    }

    /// Busy-poll mode for fetches (see [`Connection::set_busy_poll`]): with
    /// `poll(Duration::ZERO)` an event loop can drive the member without
    /// blocking; fetches long-poll at the broker for 200 ms.
    pub fn set_busy_poll(&mut self, on: bool) -> Result<(), ClientError> {
        self.consumer.set_busy_poll(on)?;
        self.consumer
            .set_fetch_wait(on.then_some(Duration::from_millis(200)));
        Ok(())
    }

    /// Queue indexes served now.
    pub fn held(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// The member id the coordinator gave (queue delivery).
    pub fn member_id(&self) -> Option<u64> {
        self.member
    }

    fn join(&mut self) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        JoinRequest {
            group: self.group.clone(),
            instance: self.instance.clone(),
        }
        .encode(&mut b);
        let sent = Instant::now();
        let a = AssignmentResponse::decode(self.control.call(Op::Join, &b)?)?;
        self.member = Some(a.member);
        self.apply(a, sent)
    }

    fn apply(&mut self, a: AssignmentResponse, sent: Instant) -> Result<(), ClientError> {
        self.last_answered_send = sent;
        self.session_timeout = Duration::from_millis(a.session_timeout_ms);
        self.heartbeat_interval = Duration::from_millis(a.heartbeat_interval_ms.max(10));
        self.next_heartbeat = Instant::now() + self.heartbeat_interval;
        let index_of = |id: u32, ids: &[u32]| ids.iter().position(|&q| q == id).map(|i| i as u32);
        // Revoked: commit while still held, then stop serving (below),
        // then release in the next heartbeat.
        for g in &a.revoke {
            if let Some(q) = index_of(g.queue_id, &self.queue_ids) {
                if self.held.get(&q) == Some(&g.epoch) {
                    self.commit_queue(q)?;
                }
            }
        }
        // Never take back a released grant; release it again if listed.
        let mut want = BTreeMap::new();
        for g in &a.granted {
            if self.to_release.iter().any(|r| r == g) || a.revoke.contains(g) {
                continue;
            }
            if let Some(q) = index_of(g.queue_id, &self.queue_ids) {
                want.insert(q, g.epoch);
            }
        }
        // Stops fetching every queue not in `want` (revoked ones included)
        // before anything is released.
        self.reassign(want)?;
        for g in &a.revoke {
            if !self.to_release.contains(g) {
                self.to_release.push(*g);
            }
        }
        Ok(())
    }

    /// Serves exactly `want` (queue index → epoch) from now on.
    fn reassign(&mut self, want: BTreeMap<u32, u64>) -> Result<(), ClientError> {
        if want == self.held {
            return Ok(());
        }
        let positions = self.consumer.positions();
        for (q, _) in self.held.clone() {
            if !want.contains_key(&q) {
                self.held.remove(&q);
                if let Some(l) = self.listener.as_mut() {
                    l(q, false);
                }
            }
        }
        let queues: Vec<u32> = want.keys().copied().collect();
        self.consumer.assign(&self.topic, &queues)?;
        for (&q, &epoch) in &want {
            let kept = self.held.get(&q) == Some(&epoch);
            let to = match (kept, positions.get(&q)) {
                (true, Some(&p)) => SeekTo::Offset(p),
                _ => match self.committed(q)? {
                    Some(o) => SeekTo::Offset(o),
                    None if self.start_earliest => SeekTo::Earliest,
                    None => SeekTo::Latest,
                },
            };
            self.consumer.seek_queue(q, to)?;
            if !kept {
                if let Some(l) = self.listener.as_mut() {
                    l(q, true);
                }
            }
        }
        self.held = want;
        Ok(())
    }

    fn committed(&mut self, q: u32) -> Result<Option<u64>, ClientError> {
        let mut b = BytesMut::new();
        GroupCommitRequest {
            group: self.group.clone(),
            queue_id: self.queue_ids[q as usize],
            member: 0,
            epoch: 0,
            instance: self.instance.clone(),
            offset: 0,
        }
        .encode(&mut b);
        Ok(decode_opt_u64(
            self.control.call(Op::GroupFetchOffset, &b)?,
        )?)
    }

    fn commit_queue(&mut self, q: u32) -> Result<(), ClientError> {
        let Some(&epoch) = self.held.get(&q) else {
            return Ok(());
        };
        let Some(&offset) = self.consumer.positions().get(&q) else {
            return Ok(());
        };
        let mut b = BytesMut::new();
        GroupCommitRequest {
            group: self.group.clone(),
            queue_id: self.queue_ids[q as usize],
            member: self.member.unwrap_or(0),
            epoch,
            instance: self.instance.clone(),
            offset,
        }
        .encode(&mut b);
        match self.control.call(Op::GroupCommit, &b) {
            Ok(_) => Ok(()),
            // Fenced: the queue moved; the next heartbeat says so.
            Err(ClientError::Broker {
                code: ErrorCode::StaleGeneration,
                ..
            }) => {
                self.next_heartbeat = Instant::now();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Commits the position of every queue served (durable at the group's
    /// level when this returns).
    pub fn commit(&mut self) -> Result<(), ClientError> {
        for q in self.held() {
            self.commit_queue(q)?;
        }
        Ok(())
    }

    fn heartbeat(&mut self) -> Result<(), ClientError> {
        let Some(member) = self.member else {
            return self.join();
        };
        loop {
            let mut b = BytesMut::new();
            HeartbeatRequest {
                group: self.group.clone(),
                member,
                released: self.to_release.clone(),
            }
            .encode(&mut b);
            let sent = Instant::now();
            let released = self.to_release.len();
            match self.control.call(Op::Heartbeat, &b) {
                Ok(body) => {
                    let a = AssignmentResponse::decode(body)?;
                    self.to_release.drain(..released);
                    let revoking = !a.revoke.is_empty();
                    self.apply(a, sent)?;
                    if !revoking || self.to_release.is_empty() {
                        return Ok(());
                    }
                    // Release at once what was just revoked.
                }
                Err(ClientError::Broker {
                    code: ErrorCode::StaleGeneration,
                    ..
                }) => {
                    self.drop_all();
                    return self.join();
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn drop_all(&mut self) {
        for q in self.held() {
            if let Some(l) = self.listener.as_mut() {
                l(q, false);
            }
        }
        self.held.clear();
        self.to_release.clear();
        self.member = None;
        let _ = self.consumer.assign(&self.topic, &[]);
    }

    /// Waits up to `timeout` for messages of the queues served; heartbeats
    /// and follows the assignment meanwhile.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<Message>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.broadcast {
                if self.last_answered_send.elapsed() >= self.session_timeout {
                    // Lapsed: hold nothing, join again.
                    self.drop_all();
                    self.join()?;
                } else if Instant::now() >= self.next_heartbeat {
                    self.heartbeat()?;
                }
            }
            let now = Instant::now();
            let until = if self.broadcast {
                deadline
            } else {
                deadline.min(self.next_heartbeat)
            };
            if self.held.is_empty() {
                std::thread::sleep(
                    until
                        .saturating_duration_since(now)
                        .min(Duration::from_millis(50)),
                );
            } else {
                let got = self.consumer.poll(until.saturating_duration_since(now))?;
                if !got.is_empty() {
                    return Ok(got);
                }
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
        }
    }

    /// Leaves cleanly: commits every position, then leaves at once (its
    /// queues move to the other members without waiting for a timeout).
    pub fn close(&mut self) -> Result<(), ClientError> {
        self.commit()?;
        for q in self.held() {
            if let Some(l) = self.listener.as_mut() {
                l(q, false);
            }
        }
        self.held.clear();
        if let (Some(member), false) = (self.member.take(), self.broadcast) {
            let mut b = BytesMut::new();
            HeartbeatRequest {
                group: self.group.clone(),
                member,
                released: Vec::new(),
            }
            .encode(&mut b);
            match self.control.call(Op::Leave, &b) {
                Ok(_)
                | Err(ClientError::Broker {
                    code: ErrorCode::StaleGeneration,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
