//! One pipelined connection: send many requests, read replies in any order.

use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::ClientError;
use crate::protocol::frame::{encode_frame, FrameDecoder};
use crate::protocol::{
    decode_error, ErrorCode, HandshakeRequest, HandshakeResponse, Op, ANY_SHARD, PUSH_FRAME_OP,
};
use crate::protocol::{MetadataRequest, MetadataResponse, TopicInfo};

/// Largest reply frame the client accepts.
const REPLY_FRAME_BYTES_MAX: u32 = 1 << 30;
/// Default time allowed for a synchronous call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to a broker.
pub struct Connection {
    stream: TcpStream,
    rbuf: BytesMut,
    decoder: FrameDecoder,
    next_id: u64,
    /// Replies read while waiting for another one.
    stash: HashMap<u64, (u16, Bytes)>,
    /// Push frames read while waiting for a reply: (subscription, code,
    /// body). What a subscription's credit allows, no more.
    pushed: VecDeque<(u64, u16, Bytes)>,
    wbuf: BytesMut,
    handshake: HandshakeResponse,
    busy_poll: bool,
    /// Where each socket read lands before it joins `rbuf`.
    scratch: Box<[u8]>,
}

impl Connection {
    /// Connects and performs the handshake; any shard serves the connection
    /// (requests for other shards' queues are forwarded inside the broker).
    pub fn connect(addr: &str) -> Result<Connection, ClientError> {
        Connection::connect_to_shard(addr, ANY_SHARD)
    }

    /// Connects to the broker and asks that shard `shard` serve the
    /// connection: requests for the queues it owns (see metadata) then take
    /// the shortest path, with no cross-core hop.
    pub fn connect_to_shard(addr: &str, shard: u16) -> Result<Connection, ClientError> {
        let sockaddr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| ClientError::InvalidArgument(format!("cannot resolve {addr}")))?;
        let stream = TcpStream::connect_timeout(&sockaddr, Duration::from_secs(10))?;
        stream.set_nodelay(true)?;
        let mut conn = Connection {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            decoder: FrameDecoder::new(REPLY_FRAME_BYTES_MAX),
            next_id: 1,
            stash: HashMap::new(),
            pushed: VecDeque::new(),
            wbuf: BytesMut::new(),
            busy_poll: false,
            handshake: HandshakeResponse {
                broker_version: String::new(),
                shard_count: 0,
                shard: 0,
                frame_bytes_max: 0,
                batch_bytes_max: 0,
                ops: Vec::new(),
            },
        };
        let mut body = BytesMut::new();
        HandshakeRequest {
            client: format!("keelmq-rust {}", env!("CARGO_PKG_VERSION")),
            shard,
        }
        .encode(&mut body);
        let reply = conn.call(Op::Handshake, &body)?;
        conn.handshake = HandshakeResponse::decode(reply)?;
        Ok(conn)
    }

    /// Busy-poll mode: waiting for a reply spins on a non-blocking socket
    /// instead of parking the thread (waking a parked thread costs 50-100 µs
    /// on a VM). Burns a core while waiting; for latency-critical clients.
    pub fn set_busy_poll(&mut self, on: bool) -> Result<(), ClientError> {
        self.stream.set_nonblocking(on)?;
        self.busy_poll = on;
        Ok(())
    }

    /// Whether busy-poll mode is on.
    pub fn busy_poll(&self) -> bool {
        self.busy_poll
    }

    /// What the broker said in the handshake.
    pub fn handshake(&self) -> &HandshakeResponse {
        &self.handshake
    }

    /// Sends a request; returns its id. The reply is read by
    /// [`Connection::recv_any`] or [`Connection::wait_for`]. Requests
    /// queued before it go out in the same write.
    pub fn send(&mut self, op: Op, body: &[u8]) -> Result<u64, ClientError> {
        let id = self.queue(op, body);
        self.flush()?;
        Ok(id)
    }

    /// Queues a request to go out with the next [`Connection::send`] or
    /// [`Connection::flush`] (several frames, one write); returns its id.
    /// A read flushes what is queued first, so a queued request is never
    /// left unsent while its caller waits.
    pub fn queue(&mut self, op: Op, body: &[u8]) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        encode_frame(&mut self.wbuf, op as u16, 1, id, body);
        id
    }

    /// Writes the queued requests.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let r = write_all(&mut self.stream, &self.wbuf);
        self.wbuf.clear();
        Ok(r?)
    }

    /// Reads the next reply, whichever request it answers; `None` when the
    /// deadline passes first. Stashed replies are returned first; push
    /// frames are kept for [`Connection::recv_incoming`].
    pub fn recv_any(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(u64, u16, Bytes)>, ClientError> {
        if let Some(&id) = self.stash.keys().next() {
            let (code, body) = self.stash.remove(&id).expect("key just seen");
            return Ok(Some((id, code, body)));
        }
        loop {
            match self.recv_wire(deadline)? {
                None => return Ok(None),
                Some((PUSH_FRAME_OP, id, code, body)) => self.pushed.push_back((id, code, body)),
                Some((_, id, code, body)) => return Ok(Some((id, code, body))),
            }
        }
    }

    /// Reads the next frame, a push or a reply (pushes already read come
    /// first, then stashed replies); `None` when the deadline passes first.
    pub fn recv_incoming(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<Incoming>, ClientError> {
        if let Some((id, code, body)) = self.pushed.pop_front() {
            return Ok(Some(Incoming::Push {
                subscription: id,
                code,
                body,
            }));
        }
        if let Some(&id) = self.stash.keys().next() {
            let (code, body) = self.stash.remove(&id).expect("key just seen");
            return Ok(Some(Incoming::Reply { id, code, body }));
        }
        Ok(self.recv_wire(deadline)?.map(|(op, id, code, body)| {
            if op == PUSH_FRAME_OP {
                Incoming::Push {
                    subscription: id,
                    code,
                    body,
                }
            } else {
                Incoming::Reply { id, code, body }
            }
        }))
    }

    /// Reads the next frame off the socket (not the stash): (op, request
    /// id, code, body).
    fn recv_wire(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(u16, u64, u16, Bytes)>, ClientError> {
        self.flush()?;
        loop {
            if let Some(((op, code, id), body)) = self
                .decoder
                .decode(&mut self.rbuf)
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                return Ok(Some((op, id, code, body)));
            }
            // Blocking mode reads with a timeout; at a passed deadline it
            // still takes whatever already arrived, without waiting.
            let mut peek = false;
            if !self.busy_poll {
                let timeout = match deadline {
                    Some(d) => {
                        let now = Instant::now();
                        peek = now >= d;
                        Some(
                            d.saturating_duration_since(now)
                                .max(Duration::from_millis(1)),
                        )
                    }
                    None => None,
                };
                if peek {
                    self.stream.set_nonblocking(true)?;
                } else {
                    self.stream.set_read_timeout(timeout)?;
                }
            }
            // Through a scratch chunk: a busy-poll loop that finds nothing
            // then costs one syscall, not a 64 KiB memset.
            let res = self.stream.read(&mut self.scratch);
            if peek {
                self.stream.set_nonblocking(false)?;
            }
            match res {
                Ok(0) => {
                    return Err(ClientError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "broker closed the connection",
                    )));
                }
                Ok(n) => self.rbuf.extend_from_slice(&self.scratch[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits for the reply to request `id`, stashing others (and pushes).
    pub fn wait_for(&mut self, id: u64, deadline: Instant) -> Result<(u16, Bytes), ClientError> {
        if let Some(r) = self.stash.remove(&id) {
            return Ok(r);
        }
        loop {
            match self.recv_wire(Some(deadline))? {
                // Busy-poll mode reads without blocking: spin to the deadline.
                None if self.busy_poll && Instant::now() < deadline => std::hint::spin_loop(),
                None => return Err(ClientError::Timeout),
                Some((PUSH_FRAME_OP, got, code, body)) => self.pushed.push_back((got, code, body)),
                Some((_, got, code, body)) if got == id => return Ok((code, body)),
                Some((_, got, code, body)) => {
                    self.stash.insert(got, (code, body));
                }
            }
        }
    }

    /// One topic's metadata (`unknown_topic` when there is none).
    pub fn topic_info(&mut self, topic: &str) -> Result<TopicInfo, ClientError> {
        let mut b = BytesMut::new();
        MetadataRequest {
            topics: vec![topic.to_owned()],
        }
        .encode(&mut b);
        let meta = MetadataResponse::decode(self.call(Op::Metadata, &b)?)?;
        meta.topics
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Broker {
                code: ErrorCode::UnknownTopic,
                message: format!("unknown topic '{topic}'"),
            })
    }

    /// Sends a request and waits for its reply; a broker error becomes
    /// [`ClientError::Broker`].
    pub fn call(&mut self, op: Op, body: &[u8]) -> Result<Bytes, ClientError> {
        let id = self.send(op, body)?;
        let (code, body) = self.wait_for(id, Instant::now() + CALL_TIMEOUT)?;
        check(code, body)
    }
}

/// A frame from the broker: a reply, or a push to a subscription.
#[derive(Debug)]
pub enum Incoming {
    /// The reply to request `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// Error code (0: ok).
        code: u16,
        /// The reply body.
        body: Bytes,
    },
    /// A push frame of `subscription`.
    Push {
        /// The subscription's id (from `subscribe`).
        subscription: u64,
        /// 0: a `PushBatch` body; else the error that ended the
        /// subscription.
        code: u16,
        /// The frame body.
        body: Bytes,
    },
}

/// `write_all` that also works on a non-blocking socket (busy-poll mode).
fn write_all(stream: &mut TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                std::hint::spin_loop()
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Turns a reply into its body or a [`ClientError::Broker`].
pub fn check(code: u16, body: Bytes) -> Result<Bytes, ClientError> {
    match ErrorCode::from_u16(code) {
        ErrorCode::Ok => Ok(body),
        code => Err(ClientError::Broker {
            code,
            message: decode_error(body),
        }),
    }
}
