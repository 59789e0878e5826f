//! Client connections: the accept loop of a shard and, per connection, a
//! reader task (frames → [`submit`], in order) and a writer task (replies,
//! in completion order, coalesced into few writes).
//!
//! Bad input never reaches an assertion: a frame over `frame_bytes_max` or
//! under the minimum length gets an error reply and the connection is
//! closed (its length cannot be trusted to find the next frame); an unknown
//! operation or a malformed body gets an error reply and the connection
//! carries on. A client vanishing mid-frame just ends its tasks.
//!
//! Nothing a client does grows without bound:
//! - a connection counts against `connections_max` from its accept, across
//!   a hand-off (the target shard checks its own limit), until it closes;
//! - its first frame must arrive within `connection_first_frame_ms_max`,
//!   and a connection owing nothing that sends nothing for
//!   `connection_idle_ms_max` is closed, as is one whose replies cannot be
//!   written for that long (a client that never reads);
//! - a request holds one of `in_flight_requests_max` permits and a share of
//!   `connection_reply_bytes_max` (the most its reply can take) until its
//!   reply is *written*, so a client that pipelines without reading stops
//!   being read, and the broker holds at most that much for it;
//! - read buffers start at 4 KiB and grow only as bytes arrive.

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::handlers::{submit, Reply};
use super::push::{self, Subscriptions};
use crate::config::LimitsConfig;
use crate::protocol::frame::{frame_header, FrameDecoder, FrameError, FRAME_LEN_MIN};
use crate::protocol::{
    encode_error, ErrorCode, HandshakeRequest, Op, ANY_SHARD, FRAME_HEADER_BYTES,
};
use crate::runtime::{self, split, ReadHalf, Semaphore, TcpListener, TcpStream, Watch, WriteHalf};
use crate::shard::Shard;
use std::os::unix::io::{AsRawFd, FromRawFd};

/// First size of a connection's read chunk; doubles while reads fill it.
const READ_CHUNK_BYTES_MIN: usize = 4 * 1024;
/// Largest read chunk through the scratch buffer.
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Largest direct read into a large frame's buffer.
const FRAME_READ_BYTES_MAX: usize = 1 << 20;
/// Replies smaller than this are copied into one write buffer.
const COALESCE_BYTES_MAX: usize = 16 * 1024;
/// Most chunks (iovecs) a reply may have to be written by its own task.
const WRITE_NOW_CHUNKS_MAX: usize = 64;
/// Reply share of requests whose reply is small or bounded by the request.
const REPLY_BYTES_SMALL: u64 = 4 * 1024;
/// Reply share of requests that list topics or queues.
const REPLY_BYTES_LISTING: u64 = 2 << 20;

/// One open connection's place in its shard's `connections_max`: counted
/// while it lives, released when dropped.
pub struct ConnectionSlot {
    shard: Rc<Shard>,
}

impl ConnectionSlot {
    /// Takes a place on `shard`, or `None` when it is full.
    fn take(shard: &Rc<Shard>) -> Option<ConnectionSlot> {
        let mut m = shard.metrics.borrow_mut();
        if m.connections_open >= u64::from(shard.config.limits.connections_max) {
            m.connections_refused += 1;
            return None;
        }
        m.connections_open += 1;
        m.connections_total += 1;
        drop(m);
        Some(ConnectionSlot {
            shard: shard.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shard.metrics.borrow_mut().connections_open -= 1;
    }
}

/// Accepts connections on this shard's listener (SO_REUSEPORT: every shard
/// listens on the broker's port and the kernel spreads connections).
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                if shard.stopping.get() {
                    return;
                }
                tracing::warn!(shard = shard.id, "accept failed: {e}");
                runtime::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shard.stopping.get() {
            return;
        }
        let Some(slot) = ConnectionSlot::take(&shard) else {
            let refused = shard.metrics.borrow().connections_refused;
            if refused.is_power_of_two() {
                tracing::warn!(
                    shard = shard.id,
                    "refusing connections: connections_max reached ({refused} refused so far)"
                );
            }
            continue;
        };
        let s = shard.clone();
        let accepted = Instant::now();
        runtime::spawn_local_into(route_connection(s, stream, slot, accepted), shard.tq.data)
            .expect("data queue")
            .detach();
    }
}

/// Serves a new connection here, or hands it to the shard its handshake
/// asks for. Only the first frame is looked at; it stays in the buffer and
/// is answered by whichever shard serves the connection.
async fn route_connection(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    slot: ConnectionSlot,
    accepted: Instant,
) {
    let limits = &shard.config.limits;
    let first_frame_by = accepted + Duration::from_millis(limits.connection_first_frame_ms_max);
    let first = async {
        let mut buf = BytesMut::new();
        let mut chunk = vec![0u8; READ_CHUNK_BYTES_MIN];
        loop {
            if let Some(t) = requested_shard(&buf, limits.frame_bytes_max) {
                return Some((t, buf));
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if n == chunk.len() && chunk.len() < READ_CHUNK_BYTES_MAX {
                        chunk.resize(chunk.len() * 2, 0);
                    }
                }
            }
        }
    };
    let deadline = async {
        runtime::sleep(first_frame_by.saturating_duration_since(Instant::now())).await;
        None
    };
    let Some((target, buf)) = futures_lite::future::or(first, deadline).await else {
        shard.metrics.borrow_mut().connections_timed_out += 1;
        return;
    };
    if target == shard.id || target >= shard.shard_count {
        serve(shard, stream, buf, slot, Some(first_frame_by)).await;
        return;
    }
    // Keep the socket alive past this stream: duplicate, then drop ours.
    // SAFETY: dup of a descriptor we own; the copy goes to the target shard.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    drop(stream);
    if fd < 0 {
        tracing::warn!(
            shard = shard.id,
            "cannot hand a connection over: dup failed"
        );
        return;
    }
    if let Err(e) = shard.mesh.adopt(target, fd, buf.freeze()).await {
        tracing::warn!(shard = shard.id, "cannot hand a connection over: {e}");
    }
    // Counted here until the target has it (and counts it itself).
    drop(slot);
}

/// The shard the first frame asks for: `Some(ANY_SHARD)` when it is not a
/// handshake naming one (or is bad: the normal path answers it), `None`
/// while the frame is incomplete.
fn requested_shard(buf: &[u8], frame_bytes_max: u32) -> Option<u16> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap());
    if !(FRAME_LEN_MIN..=frame_bytes_max).contains(&len) {
        return Some(ANY_SHARD);
    }
    if buf.len() < 6 {
        return None;
    }
    let op = u16::from_le_bytes([buf[4], buf[5]]);
    if op != Op::Handshake as u16 {
        return Some(ANY_SHARD);
    }
    if buf.len() < 4 + len as usize {
        return None;
    }
    let body = Bytes::copy_from_slice(&buf[FRAME_HEADER_BYTES..4 + len as usize]);
    Some(HandshakeRequest::decode(body).map_or(ANY_SHARD, |h| h.shard))
}

/// Takes over a connection another shard handed to this one (refused when
/// this shard is at `connections_max`).
pub fn adopt(shard: &Rc<Shard>, fd: i32, buffered: Bytes) {
    // SAFETY: the descriptor was duplicated for this hand-off and is owned
    // by this message alone.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let Some(slot) = ConnectionSlot::take(shard) else {
        tracing::debug!(
            shard = shard.id,
            "refusing a handed-over connection: connections_max reached"
        );
        return;
    };
    let s = shard.clone();
    runtime::spawn_local_into(
        // The handshake that routed it here is whole: no first-frame wait.
        serve(s, stream, BytesMut::from(&buffered[..]), slot, None),
        shard.tq.data,
    )
    .expect("data queue")
    .detach();
}

/// What a request holds until its reply is written.
struct Held {
    _request: runtime::StaticPermit,
    _reply_bytes: runtime::StaticPermit,
}

/// Replies waiting to be written, shared by the reader's reply tasks, the
/// connection's push subscriptions and the writer.
pub struct Outbox {
    /// Frame chunks; a reply's last chunk carries what its request holds.
    frames: RefCell<VecDeque<(Bytes, Option<Held>)>>,
    /// Event counter: bumped on every push and on close.
    event: Watch,
    reader_done: Cell<bool>,
    /// Requests submitted whose reply is not queued yet.
    in_flight: Cell<usize>,
    /// The write side failed or stalled: the connection closes.
    broken: Cell<bool>,
    /// The writer is writing, or has closed the socket: a reply may not
    /// be written past it.
    writing: Cell<bool>,
    /// The socket, for [`Outbox::write_now`].
    fd: std::os::unix::io::RawFd,
    /// Bumped to 1 when broken (wakes a reader blocked in a read).
    closed: Watch,
    /// Since when the connection owes nothing (no request in flight, every
    /// reply written); `None` while it owes something.
    quiet_since: Cell<Option<Instant>>,
    /// Bumped whenever `quiet_since` changes.
    quiet_changed: Watch,
}

impl Outbox {
    fn push_reply(&self, op: u16, request_id: u64, reply: Reply, held: Option<Held>) {
        let len: usize = reply.body.iter().map(Bytes::len).sum();
        let head = frame_header(op, reply.code as u16, request_id, len);
        let mut chunks = Vec::with_capacity(reply.body.len() + 1);
        chunks.push(Bytes::copy_from_slice(&head));
        chunks.extend(reply.body);
        let delivery = matches!(
            Op::from_u16(op),
            Some(Op::Fetch | Op::FetchMany | Op::Receive)
        ) || op == crate::protocol::PUSH_FRAME_OP;
        if delivery || self.in_flight.get() == 0 {
            chunks = self.write_now(chunks);
            if chunks.is_empty() {
                // All written: what the request held is released now; the
                // writer still hears of it (its idle clock).
                drop(held);
                self.bump();
                return;
            }
        }
        let mut frames = self.frames.borrow_mut();
        frames.extend(chunks.into_iter().map(|c| (c, None)));
        frames.back_mut().expect("a frame header at least").1 = held;
        drop(frames);
        self.event.advance(self.event.get() + 1);
    }
    /// Writes a reply at once, from the task that made it, when the
    /// writer is idle with nothing queued (no wait for the writer's turn:
    /// the reply of a long poll or of the only request owed). One
    /// non-blocking `sendmsg`; returns what it did not take (all of it
    /// when the writer is busy, the socket full, or the write failed; the
    /// writer then writes it, or sees the error).
    fn write_now(&self, chunks: Vec<Bytes>) -> Vec<Bytes> {
        if self.writing.get()
            || self.broken.get()
            || !self.frames.borrow().is_empty()
            || chunks.len() > WRITE_NOW_CHUNKS_MAX
        {
            return chunks;
        }
        let iov: Vec<libc::iovec> = chunks
            .iter()
            .map(|c| libc::iovec {
                iov_base: c.as_ptr() as *mut libc::c_void,
                iov_len: c.len(),
            })
            .collect();
        // SAFETY: a zeroed msghdr is valid; `iov` outlives the call and
        // points at live, initialized buffers.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n <= 0 {
            return chunks;
        }
        unsent(chunks, n as usize)
    }

    /// Queues a frame that answers no request (a push): it holds no
    /// request permit; what bounds it is the subscription's credit.
    pub(super) fn push_frame(&self, op: u16, id: u64, frame: Reply) {
        self.push_reply(op, id, frame, None);
    }
    /// Whether the write side failed or stalled (the connection is closing).
    pub(super) fn is_broken(&self) -> bool {
        self.broken.get()
    }
    fn bump(&self) {
        self.event.advance(self.event.get() + 1);
    }
    fn set_quiet(&self, since: Option<Instant>) {
        if self.quiet_since.get().is_some() != since.is_some() {
            self.quiet_since.set(since);
            self.quiet_changed.advance(self.quiet_changed.get() + 1);
        }
    }
    fn break_off(&self) {
        self.broken.set(true);
        self.closed.advance(1);
        self.bump();
    }
}

/// What is left of `chunks` once their first `sent` bytes are written.
fn unsent(mut chunks: Vec<Bytes>, mut sent: usize) -> Vec<Bytes> {
    let mut first = 0;
    while first < chunks.len() && sent >= chunks[first].len() {
        sent -= chunks[first].len();
        first += 1;
    }
    let mut rest = chunks.split_off(first);
    if let Some(c) = rest.first_mut() {
        *c = c.slice(sent..);
    }
    rest
}

async fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    buf: BytesMut,
    slot: ConnectionSlot,
    first_frame_by: Option<Instant>,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let fd = stream.as_raw_fd();
    let (rd, wr) = split(stream);
    let outbox = Rc::new(Outbox {
        writing: Cell::new(false),
        fd,
        frames: RefCell::new(VecDeque::new()),
        event: Watch::new(0),
        reader_done: Cell::new(false),
        in_flight: Cell::new(0),
        broken: Cell::new(false),
        closed: Watch::new(0),
        quiet_since: Cell::new(Some(Instant::now())),
        quiet_changed: Watch::new(0),
    });
    let idle = idle_limit(&shard.config.limits);
    let writer = runtime::spawn_local_into(write_loop(wr, outbox.clone(), idle), shard.tq.data)
        .expect("data queue");
    let subs = Rc::new(Subscriptions::default());
    if let Err(reason) = read_loop(&shard, rd, &outbox, &subs, buf, first_frame_by).await {
        tracing::debug!(shard = shard.id, ?peer, "closing connection: {reason}");
    }
    subs.stop_all();
    outbox.reader_done.set(true);
    outbox.bump();
    writer.await;
    drop(slot);
}

fn idle_limit(limits: &LimitsConfig) -> Option<Duration> {
    (limits.connection_idle_ms_max > 0)
        .then(|| Duration::from_millis(limits.connection_idle_ms_max))
}

/// The most bytes the reply to this request can take: its share of
/// `connection_reply_bytes_max` while it is owed.
fn reply_bytes_bound(op: u16, body: &[u8], limits: &LimitsConfig) -> u64 {
    let fetch = |max_bytes_at: Option<usize>| {
        let asked = max_bytes_at
            .and_then(|at| body.get(at..at + 4))
            .map_or(limits.fetch_bytes_max, |b| {
                u32::from_le_bytes(b.try_into().unwrap())
            });
        // The last batch may pass `max_bytes`, and as a view (a filter's
        // selection, fired scheduled messages) it adds its table: 16
        // bytes per record of at least 28, under 0.6 of the batch; the
        // slack covers the heads (and the 64 entries of queues a filtered
        // fetch-many moved on).
        let batch = u64::from(limits.batch_bytes_max);
        u64::from(asked.clamp(1, limits.fetch_bytes_max)) + batch * 2 + 4096
    };
    // Both fetch bodies start with the topic as a `string`.
    let topic_end = body
        .get(0..2)
        .map(|b| 2 + u16::from_le_bytes([b[0], b[1]]) as usize);
    let bound = match Op::from_u16(op) {
        Some(Op::Fetch) => fetch(topic_end.map(|t| t + 4 + 8)),
        Some(Op::FetchMany) => fetch(topic_end),
        Some(Op::GetMessage) => u64::from(limits.batch_bytes_max) + 1024,
        Some(Op::Metadata | Op::DescribeTopic | Op::Stats | Op::CreateTopic) => REPLY_BYTES_LISTING,
        _ => REPLY_BYTES_SMALL,
    };
    bound.min(limits.connection_reply_bytes_max)
}

async fn read_loop(
    shard: &Rc<Shard>,
    mut rd: ReadHalf,
    outbox: &Rc<Outbox>,
    subs: &Rc<Subscriptions>,
    mut buf: BytesMut,
    mut first_frame_by: Option<Instant>,
) -> Result<(), String> {
    let limits = &shard.config.limits;
    let decoder = FrameDecoder::new(limits.frame_bytes_max);
    let mut scratch = vec![0u8; READ_CHUNK_BYTES_MIN];
    let requests = Rc::new(Semaphore::new(u64::from(limits.in_flight_requests_max)));
    let reply_bytes = Rc::new(Semaphore::new(limits.connection_reply_bytes_max));
    let idle = idle_limit(limits);
    // When the first byte of the incomplete frame in `buf` arrived.
    let mut partial_since: Option<Instant> = None;
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(((op, version, request_id), body))) => {
                    first_frame_by = None;
                    partial_since = None;
                    // Owed replies hold their permits until written: a client
                    // that does not read stops being read here.
                    let request = or_closed(outbox, requests.clone().acquire_static_permit(1))
                        .await
                        .ok_or("write side closed")?
                        .map_err(|e| format!("permits closed: {e}"))?;
                    let share = reply_bytes_bound(op, &body, limits);
                    let reply_share =
                        or_closed(outbox, reply_bytes.clone().acquire_static_permit(share))
                            .await
                            .ok_or("write side closed")?
                            .map_err(|e| format!("permits closed: {e}"))?;
                    outbox.in_flight.set(outbox.in_flight.get() + 1);
                    outbox.set_quiet(None);
                    let pending = if push::is_subscription_op(op) {
                        push::handle(shard, subs, outbox, op, body)
                    } else {
                        submit(shard, op, version, body).await
                    };
                    let ob = outbox.clone();
                    runtime::spawn_local_into(
                        async move {
                            let reply = pending.resolve().await;
                            ob.in_flight.set(ob.in_flight.get() - 1);
                            let held = Held {
                                _request: request,
                                _reply_bytes: reply_share,
                            };
                            ob.push_reply(op, request_id, reply, Some(held));
                        },
                        shard.tq.data,
                    )
                    .expect("data queue")
                    .detach();
                }
                Ok(None) => break,
                Err(e) => {
                    let (op, request_id) = FrameDecoder::peek_header(&buf).unwrap_or((0, 0));
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        FrameError::TooShort(_) => ErrorCode::Malformed,
                    };
                    let mut b = BytesMut::new();
                    encode_error(&mut b, &e.to_string());
                    outbox.push_reply(
                        op,
                        request_id,
                        Reply {
                            code,
                            body: vec![b.freeze()],
                        },
                        None,
                    );
                    shard.metrics.borrow_mut().errors += 1;
                    return Err(e.to_string());
                }
            }
        }
        if outbox.broken.get() {
            return Err("write side failed".into());
        }
        let len = buf.len();
        let frame_rest = if len >= 4 {
            (u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize + 4).saturating_sub(len)
        } else {
            0
        };
        let read = async {
            if frame_rest > scratch.len() && len >= READ_CHUNK_BYTES_MAX {
                // A large frame that has been arriving: read straight into
                // the buffer, at most twice what has arrived so far (so
                // memory follows the bytes actually sent).
                let n = frame_rest.min(2 * len).min(FRAME_READ_BYTES_MAX);
                buf.resize(len + n, 0);
                let r = rd.read(&mut buf[len..]).await;
                buf.truncate(len + r.as_ref().map_or(0, |n| *n));
                r
            } else {
                // Through a scratch chunk that grows while reads fill it, so
                // each read copies the bytes that came and an idle
                // connection keeps 4 KiB.
                let r = rd.read(&mut scratch).await;
                if let Ok(n) = r {
                    buf.extend_from_slice(&scratch[..n]);
                }
                r
            }
        };
        if len > 0 && partial_since.is_none() {
            partial_since = Some(Instant::now());
        }
        let limit = read_limit(outbox, first_frame_by, partial_since, idle);
        let n = match or_closed(
            outbox,
            futures_lite::future::or(async { Ok(read.await) }, limit),
        )
        .await
        {
            Some(Ok(r)) => r.map_err(|e| format!("read failed: {e}"))?,
            None => return Err("write side failed".into()),
            Some(Err(reason)) => {
                shard.metrics.borrow_mut().connections_timed_out += 1;
                return Err(reason.into());
            }
        };
        if n == scratch.len() && scratch.len() < READ_CHUNK_BYTES_MAX {
            scratch.resize(scratch.len() * 2, 0);
        }
        if n == 0 {
            return if len == 0 {
                Ok(())
            } else {
                Err(format!("peer closed mid-frame with {len} bytes buffered"))
            };
        }
    }
}

/// `f`, unless the connection breaks first (`None`).
async fn or_closed<T>(outbox: &Outbox, f: impl std::future::Future<Output = T>) -> Option<T> {
    let done = async { Some(f.await) };
    let closed = async {
        let _ = outbox.closed.wait_for(1).await;
        None
    };
    futures_lite::future::or(done, closed).await
}

/// Resolves (with the reason) when the connection's read has waited too
/// long: for its first frame past `first_frame_by`; for the rest of a frame
/// `idle` after its first byte; owing nothing, `idle` after it last owed
/// something. Never resolves without a limit.
async fn read_limit<T>(
    outbox: &Outbox,
    first_frame_by: Option<Instant>,
    partial_since: Option<Instant>,
    idle: Option<Duration>,
) -> Result<T, &'static str> {
    if let Some(by) = first_frame_by {
        runtime::sleep(by.saturating_duration_since(Instant::now())).await;
        return Err("no whole first frame within connection_first_frame_ms_max");
    }
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    if let Some(t) = partial_since {
        runtime::sleep((t + idle).saturating_duration_since(Instant::now())).await;
        return Err("a frame not completed within connection_idle_ms_max");
    }
    loop {
        let seen = outbox.quiet_changed.get();
        let changed = async {
            let _ = outbox.quiet_changed.wait_for(seen + 1).await;
            false
        };
        match outbox.quiet_since.get() {
            None => {
                changed.await;
            }
            Some(t) => {
                let expired = async {
                    runtime::sleep((t + idle).saturating_duration_since(Instant::now())).await;
                    true
                };
                if futures_lite::future::or(expired, changed).await {
                    return Err("idle for connection_idle_ms_max");
                }
            }
        }
    }
}

async fn write_loop(mut wr: WriteHalf, outbox: Rc<Outbox>, stall: Option<Duration>) {
    let mut coalesced = BytesMut::with_capacity(COALESCE_BYTES_MAX);
    // What the frames in `coalesced` hold: released once they are written.
    let mut held: Vec<Held> = Vec::new();
    loop {
        let seen = outbox.event.get();
        let frames: Vec<(Bytes, Option<Held>)> = outbox.frames.borrow_mut().drain(..).collect();
        if frames.is_empty() {
            if outbox.reader_done.get() && outbox.in_flight.get() == 0 || outbox.broken.get() {
                break;
            }
            if outbox.in_flight.get() == 0 {
                // Everything owed is written: the idle clock starts.
                outbox.set_quiet(Some(Instant::now()));
            }
            let _ = outbox.event.wait_for(seen + 1).await;
            continue;
        }
        outbox.writing.set(true);
        for (f, h) in frames {
            if f.len() < COALESCE_BYTES_MAX {
                coalesced.extend_from_slice(&f);
                held.extend(h);
                if coalesced.len() >= COALESCE_BYTES_MAX {
                    if !write_within(&mut wr, &coalesced, stall, &outbox).await {
                        return;
                    }
                    coalesced.clear();
                    held.clear();
                }
                continue;
            }
            // A large chunk goes as it is, after what was gathered before it.
            if !coalesced.is_empty() {
                if !write_within(&mut wr, &coalesced, stall, &outbox).await {
                    return;
                }
                coalesced.clear();
                held.clear();
            }
            if !write_within(&mut wr, &f, stall, &outbox).await {
                return;
            }
            drop(h);
        }
        if !coalesced.is_empty() {
            if !write_within(&mut wr, &coalesced, stall, &outbox).await {
                return;
            }
            coalesced.clear();
            held.clear();
        }
        outbox.writing.set(false);
    }
    // Nothing may be written past the close (the descriptor's number may
    // be reused by the next connection).
    outbox.writing.set(true);
    let _ = wr.flush().await;
    let _ = wr.close().await;
}

/// Writes `b`; false (and the connection broken) when the write fails or
/// makes no progress within `stall`.
async fn write_within(
    wr: &mut WriteHalf,
    b: &[u8],
    stall: Option<Duration>,
    outbox: &Outbox,
) -> bool {
    let write = async { wr.write_all(b).await.is_ok() };
    let ok = match stall {
        None => write.await,
        Some(d) => {
            let timer = async {
                runtime::sleep(d).await;
                false
            };
            futures_lite::future::or(write, timer).await
        }
    };
    if !ok {
        outbox.break_off();
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_partial_write_leaves_exactly_the_bytes_not_sent() {
        let chunks = || {
            vec![
                Bytes::from_static(b"head"),
                Bytes::from_static(b""),
                Bytes::from_static(b"body-one"),
                Bytes::from_static(b"xy"),
            ]
        };
        let all: Vec<u8> = chunks().concat();
        for sent in 0..=all.len() {
            let rest: Vec<u8> = unsent(chunks(), sent).concat();
            assert_eq!(rest, all[sent..], "after {sent} bytes");
        }
        assert!(unsent(chunks(), all.len()).is_empty());
    }

    #[test]
    fn a_reply_share_follows_what_the_request_can_get_back() {
        let l = Config::default().limits;
        let fetch = |max_bytes: u32| {
            let mut b = BytesMut::new();
            crate::protocol::FetchRequest {
                topic: "orders".into(),
                queue: 1,
                offset: 0,
                max_bytes,
                wait_ms: 0,
                filter: None,
            }
            .encode(&mut b);
            b
        };
        let small = reply_bytes_bound(Op::Fetch as u16, &fetch(1000), &l);
        let batch = u64::from(l.batch_bytes_max);
        assert_eq!(small, 1000 + batch * 2 + 4096);
        let huge = reply_bytes_bound(Op::Fetch as u16, &fetch(u32::MAX), &l);
        assert_eq!(huge, u64::from(l.fetch_bytes_max) + batch * 2 + 4096);
        // A truncated body claims the most a fetch can get.
        assert_eq!(reply_bytes_bound(Op::Fetch as u16, b"\x06", &l), huge);
        assert_eq!(
            reply_bytes_bound(Op::Produce as u16, b"", &l),
            REPLY_BYTES_SMALL
        );
        assert!(
            reply_bytes_bound(Op::FetchMany as u16, &[0xff; 3], &l) <= l.connection_reply_bytes_max
        );
    }

    #[test]
    fn a_handshake_is_routed_only_once_whole() {
        let mut f = BytesMut::new();
        let mut body = BytesMut::new();
        HandshakeRequest {
            client: "c".into(),
            shard: 1,
        }
        .encode(&mut body);
        crate::protocol::frame::encode_frame(&mut f, Op::Handshake as u16, 1, 1, &body);
        assert_eq!(requested_shard(&f[..3], 1 << 20), None);
        assert_eq!(requested_shard(&f[..f.len() - 1], 1 << 20), None);
        assert_eq!(requested_shard(&f, 1 << 20), Some(1));
        // Another op's first frame is answered where it arrived, at once.
        let mut p = BytesMut::new();
        crate::protocol::frame::encode_frame(&mut p, Op::Produce as u16, 1, 1, &[0u8; 100]);
        assert_eq!(requested_shard(&p[..6], 1 << 20), Some(ANY_SHARD));
    }
}
