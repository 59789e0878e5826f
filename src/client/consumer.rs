//! Consuming: assign queues, seek, poll. Every assigned queue has at most
//! one fetch in flight; fetches of different queues are pipelined on the
//! one connection and long-poll at the broker, so `poll` returns as soon as
//! any queue has messages.

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
    /// Id of the fetch in flight for this queue, if any.
    in_flight: Option<u64>,
}

/// A consumer over one connection.
pub struct Consumer {
    conn: Connection,
    topic: String,
    cursors: BTreeMap<u32, Cursor>,
    /// fetch request id → queue
    fetches: HashMap<u64, u32>,
    ready: VecDeque<Message>,
    fetch_bytes_max: u32,
    fetch_wait: Option<Duration>,
    /// Where the next round of fetches starts (queues take turns).
    next_fetch_queue: u32,
}

/// Fetches one consumer keeps in flight at most (well under the broker's
/// default `in_flight_requests_max`).
pub const FETCHES_IN_FLIGHT_MAX: usize = 256;

impl Consumer {
    /// Connects to the broker at `addr`.
    pub fn connect(addr: &str) -> Result<Consumer, ClientError> {
        Ok(Consumer::over(Connection::connect(addr)?))
    }

    fn over(conn: Connection) -> Consumer {
        Consumer {
            conn,
            topic: String::new(),
            cursors: BTreeMap::new(),
            fetches: HashMap::new(),
            ready: VecDeque::new(),
            fetch_bytes_max: 1 << 20,
            fetch_wait: None,
            next_fetch_queue: 0,
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

    /// Sets the most bytes one fetch returns (per queue).
    pub fn set_fetch_bytes_max(&mut self, bytes: u32) {
        self.fetch_bytes_max = bytes.max(1);
    }

    fn topic_info(&mut self, topic: &str) -> Result<TopicInfo, ClientError> {
        let mut b = BytesMut::new();
        MetadataRequest {
            topics: vec![topic.to_owned()],
        }
        .encode(&mut b);
        let meta = MetadataResponse::decode(self.conn.call(Op::Metadata, &b)?)?;
        meta.topics
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Broker {
                code: ErrorCode::UnknownTopic,
                message: format!("unknown topic '{topic}'"),
            })
    }

    /// Assigns the given queues of `topic`, each starting at its earliest
    /// offset until [`Consumer::seek`] says otherwise.
    pub fn assign(&mut self, topic: &str, queues: &[u32]) -> Result<(), ClientError> {
        let info = self.topic_info(topic)?;
        self.topic = topic.to_owned();
        self.cursors.clear();
        self.fetches.clear();
        self.ready.clear();
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
            self.cursors.insert(
                q,
                Cursor {
                    next: 0,
                    shard: qi.shard,
                    in_flight: None,
                },
            );
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
        // A fetch in flight answers for the old position: drop its reply.
        if let Some(id) = c.in_flight.take() {
            self.fetches.remove(&id);
        }
        self.ready.retain(|m| m.queue != queue);
        Ok(())
    }

    fn list_offset(&mut self, queue: u32, spec: OffsetSpec) -> Result<u64, ClientError> {
        let mut b = BytesMut::new();
        ListOffsetsRequest {
            topic: self.topic.clone(),
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
            let Some(queue) = self.fetches.remove(&id) else {
                continue; // a reply for a seek-abandoned fetch
            };
            self.on_fetch_reply(queue, code, body)?;
        }
    }

    fn send_fetches(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let wait = self
            .fetch_wait
            .unwrap_or_else(|| deadline.saturating_duration_since(Instant::now()));
        // More queues than fetches allowed in flight: fetch without waiting
        // at the broker, so an empty queue never holds a slot another
        // queue's messages need; queues take turns.
        let many = self.cursors.len() > FETCHES_IN_FLIGHT_MAX;
        let wait_ms = if many {
            0
        } else {
            wait.as_millis().min(30_000) as u32
        };
        let room = FETCHES_IN_FLIGHT_MAX.saturating_sub(self.fetches.len());
        let queues: Vec<u32> = self.cursors.keys().copied().collect();
        let start = queues.partition_point(|&q| q < self.next_fetch_queue);
        let idle: Vec<u32> = queues[start..]
            .iter()
            .chain(&queues[..start])
            .copied()
            .filter(|q| self.cursors[q].in_flight.is_none())
            .take(room)
            .collect();
        if let Some(&last) = idle.last() {
            self.next_fetch_queue = last.wrapping_add(1);
        }
        for q in idle {
            let c = &self.cursors[&q];
            let mut b = BytesMut::new();
            FetchRequest {
                topic: self.topic.clone(),
                queue: q,
                offset: c.next,
                max_bytes: self.fetch_bytes_max,
                wait_ms,
            }
            .encode(&mut b);
            let id = self.conn.send(Op::Fetch, &b)?;
            self.fetches.insert(id, q);
            self.cursors.get_mut(&q).expect("cursor").in_flight = Some(id);
        }
        Ok(())
    }

    fn on_fetch_reply(
        &mut self,
        queue: u32,
        code: u16,
        body: bytes::Bytes,
    ) -> Result<(), ClientError> {
        let cursor = self
            .cursors
            .get_mut(&queue)
            .expect("fetch for an assigned queue");
        cursor.in_flight = None;
        let body = match check(code, body) {
            Ok(b) => b,
            Err(ClientError::Broker {
                code: ErrorCode::OffsetOutOfRange,
                ..
            }) => {
                // Retention removed what we wanted (resume at the earliest),
                // or the position is past the end (resume at the latest).
                let earliest = self.list_offset(queue, OffsetSpec::Earliest)?;
                let latest = self.list_offset(queue, OffsetSpec::Latest)?;
                let c = self.cursors.get_mut(&queue).expect("cursor");
                c.next = c.next.clamp(earliest, latest.max(earliest));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let resp = FetchResponse::decode(body)?;
        let (shard, mut next) = (cursor.shard, cursor.next);
        for b in &resp.batches {
            for m in decode_batch(&self.topic, queue, shard, b, next)? {
                next = m.offset + 1;
                self.ready.push_back(m);
            }
        }
        self.cursors.get_mut(&queue).expect("cursor").next = next;
        Ok(())
    }

    /// Commits every assigned queue's position for `group`.
    pub fn commit(&mut self, group: &str) -> Result<(), ClientError> {
        for (q, next) in self.positions() {
            let mut b = BytesMut::new();
            GroupOffsetRequest {
                group: group.to_owned(),
                topic: self.topic.clone(),
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
                topic: self.topic.clone(),
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
