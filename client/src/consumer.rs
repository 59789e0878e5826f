//! Consuming: assign queues, seek, poll. Assigned queues are fetched in
//! groups: the queues one shard owns, up to [`FETCH_GROUP_QUEUES_MAX`] per
//! group, share one fetch-many request (one long poll at the broker, woken
//! by any of them). Each group has at most one fetch in flight; groups are
//! pipelined on the one connection, so `poll` returns as soon as any queue
//! has messages, with ten thousand queues as with one.

use bytes::BytesMut;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::conn::{check, Connection};
use super::{decode_batch, ClientError, ErrorCode, Message};
use crate::protocol::*;

/// Where to start reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekTo {
    /// The oldest stored message.
    Earliest,
    /// After the newest visible message: only new messages.
    Latest,
    /// This offset.
    Offset(u64),
    /// The first message the broker appended at or after this time (ms
    /// since the epoch).
    Timestamp(i64),
}

struct Cursor {
    next: u64,
    shard: u16,
    group: usize,
    /// Index of the queue in its group's `queues`.
    slot: usize,
}

/// Queues fetched together.
struct FetchGroup {
    queues: Vec<u32>,
    /// Index in `queues` the next request starts at: the broker fills a
    /// response in request order, so the start rotates past the last queue
    /// served and every queue gets its turn.
    start: usize,
    /// Id of the fetch in flight, if any.
    in_flight: Option<u64>,
}

/// A consumer over one connection.
pub struct Consumer {
    conn: Connection,
    /// Shared by every message handed out.
    topic: std::sync::Arc<str>,
    cursors: crate::ids::IdMap<Cursor>,
    groups: Vec<FetchGroup>,
    /// fetch request id → group
    fetches: HashMap<u64, usize>,
    ready: VecDeque<Message>,
    fetch_bytes_max: u32,
    fetch_wait: Option<Duration>,
    filter: Option<FilterSpec>,
}

/// Most queues in one fetch-many request (12 bytes each on the wire).
pub const FETCH_GROUP_QUEUES_MAX: usize = 1024;

impl Consumer {
    /// Connects to the broker at `addr`.
    pub fn connect(addr: &str) -> Result<Consumer, ClientError> {
        Ok(Consumer::over(Connection::connect(addr)?))
    }

    fn over(conn: Connection) -> Consumer {
        Consumer {
            conn,
            topic: "".into(),
            cursors: Default::default(),
            groups: Vec::new(),
            fetches: HashMap::new(),
            ready: VecDeque::new(),
            fetch_bytes_max: 1 << 20,
            fetch_wait: None,
            filter: None,
        }
    }

    /// Connects with shard `shard` serving the connection: fetches of the
    /// queues it owns take no cross-core hop.
    pub fn connect_to_shard(addr: &str, shard: u16) -> Result<Consumer, ClientError> {
        Ok(Consumer::over(Connection::connect_to_shard(addr, shard)?))
    }

    /// Busy-poll mode (see [`Connection::set_busy_poll`]).
    pub fn set_busy_poll(&mut self, on: bool) -> Result<(), ClientError> {
        self.conn.set_busy_poll(on)
    }

    /// Makes every fetch long-poll for `wait` at the broker, whatever the
    /// `poll` timeout. With busy-poll mode and `poll(Duration::ZERO)` this
    /// gives a non-blocking consumer that an event loop can drive without
    /// flooding the broker with empty fetches.
    pub fn set_fetch_wait(&mut self, wait: Option<Duration>) {
        self.fetch_wait = wait;
    }

    /// Sets the filter the broker applies to every fetch (`None`: every
    /// message). Records it does not pass never reach this consumer; the
    /// positions still move past them. A bad expression is refused at the
    /// next `poll` with where and why (`invalid_filter`).
    pub fn set_filter(&mut self, filter: Option<FilterSpec>) {
        if self.filter != filter {
            // Replies in flight were filtered by the old one.
            for g in &mut self.groups {
                if let Some(id) = g.in_flight.take() {
                    self.fetches.remove(&id);
                }
            }
            self.filter = filter;
        }
    }

    /// Sets the most bytes one fetch returns (over all queues of a group).
    pub fn set_fetch_bytes_max(&mut self, bytes: u32) {
        self.fetch_bytes_max = bytes.max(1);
    }

    fn topic_info(&mut self, topic: &str) -> Result<TopicInfo, ClientError> {
        self.conn.topic_info(topic)
    }

    /// Assigns the given queues of `topic`, each starting at its earliest
    /// offset until [`Consumer::seek`] says otherwise.
    pub fn assign(&mut self, topic: &str, queues: &[u32]) -> Result<(), ClientError> {
        let info = self.topic_info(topic)?;
        self.topic = topic.into();
        self.cursors.clear();
        self.groups.clear();
        self.fetches.clear();
        self.ready.clear();
        let mut by_shard: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
        for &q in queues {
            let qi = info
                .queues
                .get(q as usize)
                .ok_or_else(|| ClientError::Broker {
                    code: ErrorCode::UnknownQueue,
                    message: format!(
                        "topic '{topic}' has {} queues; no queue {q}",
                        info.queues.len()
                    ),
                })?;
            if self.cursors.contains_key(&q) {
                continue;
            }
            self.cursors.insert(
                q,
                Cursor {
                    next: 0,
                    shard: qi.shard,
                    group: 0,
                    slot: 0,
                },
            );
            by_shard.entry(qi.shard).or_default().push(q);
        }
        for queues in by_shard.values() {
            for chunk in queues.chunks(FETCH_GROUP_QUEUES_MAX) {
                for (slot, q) in chunk.iter().enumerate() {
                    let c = self.cursors.get_mut(q).expect("cursor");
                    (c.group, c.slot) = (self.groups.len(), slot);
                }
                self.groups.push(FetchGroup {
                    queues: chunk.to_vec(),
                    start: 0,
                    in_flight: None,
                });
            }
        }
        self.seek(SeekTo::Earliest)
    }

    /// Assigns every queue of `topic`.
    pub fn assign_all(&mut self, topic: &str) -> Result<(), ClientError> {
        let n = self.topic_info(topic)?.queues.len() as u32;
        self.assign(topic, &(0..n).collect::<Vec<_>>())
    }

    /// Moves every assigned queue to `to`.
    pub fn seek(&mut self, to: SeekTo) -> Result<(), ClientError> {
        let queues: Vec<u32> = self.cursors.keys().copied().collect();
        for q in queues {
            self.seek_queue(q, to)?;
        }
        Ok(())
    }

    /// Moves one assigned queue to `to`.
    pub fn seek_queue(&mut self, queue: u32, to: SeekTo) -> Result<(), ClientError> {
        let next = match to {
            SeekTo::Offset(o) => o,
            SeekTo::Earliest => self.list_offset(queue, OffsetSpec::Earliest)?,
            SeekTo::Latest => self.list_offset(queue, OffsetSpec::Latest)?,
            SeekTo::Timestamp(t) => self.list_offset(queue, OffsetSpec::Timestamp(t))?,
        };
        let c = self.cursors.get_mut(&queue).ok_or_else(|| {
            ClientError::InvalidArgument(format!("queue {queue} is not assigned"))
        })?;
        c.next = next;
        // A fetch in flight answers for the old position: drop its reply
        // (the group's other queues are fetched again from where they are).
        if let Some(id) = self.groups[c.group].in_flight.take() {
            self.fetches.remove(&id);
        }
        self.ready.retain(|m| m.queue != queue);
        Ok(())
    }

    fn list_offset(&mut self, queue: u32, spec: OffsetSpec) -> Result<u64, ClientError> {
        let mut b = BytesMut::new();
        ListOffsetsRequest {
            topic: self.topic.to_string(),
            queue,
            spec,
        }
        .encode(&mut b);
        Ok(decode_u64(self.conn.call(Op::ListOffsets, &b)?)?)
    }

    /// Next offset to be returned for each assigned queue.
    pub fn positions(&self) -> BTreeMap<u32, u64> {
        self.cursors.iter().map(|(q, c)| (*q, c.next)).collect()
    }

    /// Waits up to `timeout` for messages from any assigned queue and
    /// returns what arrived (empty on timeout). Order within a queue is
    /// preserved.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<Message>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.ready.is_empty() {
                return Ok(self.ready.drain(..).collect());
            }
            self.send_fetches(deadline)?;
            let Some((id, code, body)) = self.conn.recv_any(Some(deadline))? else {
                return Ok(Vec::new());
            };
            let Some(group) = self.fetches.remove(&id) else {
                continue; // a reply for a seek-abandoned fetch
            };
            self.groups[group].in_flight = None;
            self.on_fetch_reply(group, code, body)?;
        }
    }

    fn send_fetches(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let wait = self
            .fetch_wait
            .unwrap_or_else(|| deadline.saturating_duration_since(Instant::now()));
        let wait_ms = wait.as_millis().min(u128::from(u32::MAX)) as u32;
        for g in 0..self.groups.len() {
            if self.groups[g].in_flight.is_some() {
                continue;
            }
            let group = &self.groups[g];
            let (tail, head) = group.queues.split_at(group.start);
            let mut b = BytesMut::new();
            FetchManyRequest {
                topic: self.topic.to_string(),
                max_bytes: self.fetch_bytes_max,
                wait_ms,
                filter: self.filter.clone(),
                queues: head
                    .iter()
                    .chain(tail)
                    .map(|q| (*q, self.cursors[q].next))
                    .collect(),
            }
            .encode(&mut b);
            let id = self.conn.send(Op::FetchMany, &b)?;
            self.fetches.insert(id, g);
            self.groups[g].in_flight = Some(id);
        }
        Ok(())
    }

    fn on_fetch_reply(
        &mut self,
        group: usize,
        code: u16,
        body: bytes::Bytes,
    ) -> Result<(), ClientError> {
        let resp = FetchManyResponse::decode(check(code, body)?)?;
        let mut last_served = None;
        for e in resp.entries {
            let Some(cursor) = self.cursors.get_mut(&e.queue) else {
                continue;
            };
            match ErrorCode::from_u16(e.error) {
                ErrorCode::Ok => {}
                ErrorCode::OffsetOutOfRange => {
                    // Retention removed what we wanted (resume at the
                    // earliest), or the position is past the end (resume at
                    // the latest).
                    let (earliest, latest) = (e.offsets.earliest, e.offsets.latest);
                    cursor.next = cursor.next.clamp(earliest, latest.max(earliest));
                    continue;
                }
                code => {
                    return Err(ClientError::Broker {
                        code,
                        message: format!("fetch of queue {} of '{}'", e.queue, self.topic),
                    })
                }
            }
            let (shard, mut next) = (cursor.shard, cursor.next);
            for b in &e.batches {
                for m in decode_batch(&self.topic, e.queue, shard, b, next)? {
                    next = m.offset + 1;
                    self.ready.push_back(m);
                }
            }
            // Under a filter the broker looked past what it sent.
            if e.next > next && e.next <= e.offsets.latest {
                next = e.next;
            }
            let cursor = self.cursors.get_mut(&e.queue).expect("cursor");
            cursor.next = next;
            last_served = Some(cursor.slot);
        }
        // Start the next request after the last queue served.
        if let Some(slot) = last_served {
            let g = &mut self.groups[group];
            g.start = (slot + 1) % g.queues.len();
        }
        Ok(())
    }

    /// Commits every assigned queue's position for `group`.
    pub fn commit(&mut self, group: &str) -> Result<(), ClientError> {
        for (q, next) in self.positions() {
            let mut b = BytesMut::new();
            GroupOffsetRequest {
                group: group.to_owned(),
                topic: self.topic.to_string(),
                queue: q,
                offset: Some(next),
            }
            .encode(&mut b);
            self.conn.call(Op::CommitOffset, &b)?;
        }
        Ok(())
    }

    /// Moves each assigned queue to `group`'s committed offset, where one
    /// exists.
    pub fn seek_to_committed(&mut self, group: &str) -> Result<(), ClientError> {
        for q in self.cursors.keys().copied().collect::<Vec<_>>() {
            let mut b = BytesMut::new();
            GroupOffsetRequest {
                group: group.to_owned(),
                topic: self.topic.to_string(),
                queue: q,
                offset: None,
            }
            .encode(&mut b);
            if let Some(o) = decode_opt_u64(self.conn.call(Op::FetchOffset, &b)?)? {
                self.seek_queue(q, SeekTo::Offset(o))?;
            }
        }
        Ok(())
    }
}
