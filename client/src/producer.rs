//! Producing: single messages, batches, and a pipelined mode that keeps
//! many batches in flight.

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::conn::{check, Connection, CALL_TIMEOUT};
use super::{ClientError, MessageId, Record};
use crate::batch::BatchBuilder;
pub use crate::protocol::SCHEDULED_OFFSET;
use crate::protocol::{Op, ProduceRequest, ProduceResponse, QUEUE_BY_KEY};

/// Which queue of the topic a batch goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueSelector {
    /// This queue index.
    Queue(u32),
    /// The queue this routing key hashes to (CRC32 of the key modulo the
    /// queue count): every message with the key lands in one queue, in order.
    Key(Bytes),
    /// The broker spreads batches over the queues.
    RoundRobin,
}

/// Where one produced message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendReceipt {
    /// Queue index.
    pub queue: u32,
    /// Offset in the queue; [`SCHEDULED_OFFSET`] for a scheduled message
    /// (its offset is assigned when it is delivered).
    pub offset: u64,
    /// Broker-assigned message id.
    pub id: MessageId,
    /// Broker time of the append, ms since the epoch.
    pub append_time_ms: i64,
}

impl SendReceipt {
    /// Whether the message was scheduled (delivered later, when its time
    /// comes; cancel it with `Admin::cancel_message(id)`).
    pub fn is_scheduled(&self) -> bool {
        self.offset == SCHEDULED_OFFSET
    }
}

/// A producer over one connection.
pub struct Producer {
    conn: Connection,
    /// request id → records in that batch
    in_flight: HashMap<u64, u32>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Producer {
    /// Connects to the broker at `addr` (`host:port`).
    pub fn connect(addr: &str) -> Result<Producer, ClientError> {
        Ok(Producer {
            conn: Connection::connect(addr)?,
            in_flight: HashMap::new(),
        })
    }

    /// Connects with shard `shard` serving the connection: batches for the
    /// queues it owns (metadata says which) take no cross-core hop.
    pub fn connect_to_shard(addr: &str, shard: u16) -> Result<Producer, ClientError> {
        Ok(Producer {
            conn: Connection::connect_to_shard(addr, shard)?,
            in_flight: HashMap::new(),
        })
    }

    /// The shard serving this producer's connection.
    pub fn shard(&self) -> u16 {
        self.conn.handshake().shard
    }

    /// Busy-poll mode (see [`Connection::set_busy_poll`]).
    pub fn set_busy_poll(&mut self, on: bool) -> Result<(), ClientError> {
        self.conn.set_busy_poll(on)
    }

    /// Largest batch the broker accepts, in bytes.
    pub fn batch_bytes_max(&self) -> usize {
        self.conn.handshake().batch_bytes_max as usize
    }

    /// Sends one message and waits for its acknowledgement. With a key it
    /// goes to the key's queue, otherwise round-robin.
    pub fn send(&mut self, topic: &str, record: Record) -> Result<SendReceipt, ClientError> {
        let sel = match &record.key {
            Some(k) => QueueSelector::Key(k.clone()),
            None => QueueSelector::RoundRobin,
        };
        Ok(self.send_batch(topic, sel, &[record])?.remove(0))
    }

    /// Sends records as one batch (appended atomically, in order) and waits.
    pub fn send_batch(
        &mut self,
        topic: &str,
        sel: QueueSelector,
        records: &[Record],
    ) -> Result<Vec<SendReceipt>, ClientError> {
        let id = self.submit_batch(topic, sel, records)?;
        let (code, body) = self.conn.wait_for(id, Instant::now() + CALL_TIMEOUT)?;
        self.in_flight.remove(&id);
        let resp = ProduceResponse::decode(check(code, body)?)?;
        Ok(receipts(&resp))
    }

    /// Encodes `records` as one batch (filling zero timestamps with now).
    pub fn encode_batch(&self, records: &[Record]) -> Result<Bytes, ClientError> {
        if records.is_empty() {
            return Err(ClientError::InvalidArgument("empty batch".into()));
        }
        let now = now_ms();
        let mut b = BatchBuilder::new();
        for r in records {
            r.check()
                .map_err(|e| ClientError::InvalidArgument(e.into()))?;
            let ts = if r.timestamp_ms == 0 {
                now
            } else {
                r.timestamp_ms
            };
            b.push_at(r, ts);
        }
        if b.encoded_len() > self.batch_bytes_max() {
            return Err(ClientError::InvalidArgument(format!(
                "batch of {} bytes exceeds the broker's batch_bytes_max {}",
                b.encoded_len(),
                self.batch_bytes_max()
            )));
        }
        Ok(b.finish())
    }

    /// Sends a batch without waiting; returns a ticket that
    /// [`Producer::poll_ack`] reports. Batches to one queue are appended in
    /// the order they were submitted.
    pub fn submit_batch(
        &mut self,
        topic: &str,
        sel: QueueSelector,
        records: &[Record],
    ) -> Result<u64, ClientError> {
        let batch = self.encode_batch(records)?;
        let (queue, routing_key) = match sel {
            QueueSelector::Queue(q) => (q, Bytes::new()),
            QueueSelector::Key(k) => {
                if k.len() > u16::MAX as usize {
                    return Err(ClientError::InvalidArgument(
                        "routing key over 65535 bytes".into(),
                    ));
                }
                if k.is_empty() {
                    return Err(ClientError::InvalidArgument("empty routing key".into()));
                }
                (QUEUE_BY_KEY, k)
            }
            QueueSelector::RoundRobin => (QUEUE_BY_KEY, Bytes::new()),
        };
        let mut body = BytesMut::with_capacity(batch.len() + topic.len() + 16);
        ProduceRequest {
            topic: topic.to_owned(),
            queue,
            routing_key,
            batch,
        }
        .encode(&mut body);
        let id = self.conn.send(Op::Produce, &body)?;
        self.in_flight.insert(id, records.len() as u32);
        Ok(id)
    }

    /// Batches sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Waits up to `timeout` for the acknowledgement of any in-flight batch:
    /// `(ticket, result)`. `None` if nothing arrived in time.
    #[allow(clippy::type_complexity)]
    pub fn poll_ack(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(u64, Result<Vec<SendReceipt>, ClientError>)>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some((id, code, body)) = self.conn.recv_any(Some(deadline))? else {
                return Ok(None);
            };
            if self.in_flight.remove(&id).is_none() {
                continue;
            }
            let result = check(code, body).and_then(|b| Ok(receipts(&ProduceResponse::decode(b)?)));
            return Ok(Some((id, result)));
        }
    }
}

fn receipts(resp: &ProduceResponse) -> Vec<SendReceipt> {
    (0..resp.count)
        .map(|i| SendReceipt {
            queue: resp.queue,
            offset: if resp.base_offset == SCHEDULED_OFFSET {
                SCHEDULED_OFFSET
            } else {
                resp.base_offset + u64::from(i)
            },
            id: resp.message_id(i),
            append_time_ms: resp.append_time_ms,
        })
        .collect()
}
