//! Client connections: the accept loop of a shard and, per connection, a
//! reader task (frames → [`submit`], in order) and a writer task (replies,
//! in completion order, coalesced into few writes).
//!
//! Bad input never reaches an assertion: a frame over `frame_bytes_max` or
//! under the minimum length gets an error reply and the connection is
//! closed (its length cannot be trusted to find the next frame); an unknown
//! operation or a malformed body gets an error reply and the connection
//! carries on. A client vanishing mid-frame just ends its tasks.

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use super::handlers::{submit, Reply};
use crate::protocol::frame::{frame_header, FrameDecoder, FrameError, FRAME_LEN_MIN};
use crate::protocol::{
    encode_error, ErrorCode, HandshakeRequest, Op, ANY_SHARD, FRAME_HEADER_BYTES,
};
use crate::runtime::{self, split, ReadHalf, Semaphore, TcpListener, TcpStream, Watch, WriteHalf};
use crate::shard::Shard;
use std::os::unix::io::{AsRawFd, FromRawFd};

/// Bytes asked of each socket read when no larger frame is pending.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Replies smaller than this are copied into one write buffer.
const COALESCE_BYTES_MAX: usize = 16 * 1024;

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
                runtime::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if shard.stopping.get() {
            return;
        }
        let open = shard.metrics.borrow().connections_open;
        if open >= u64::from(shard.config.limits.connections_max) {
            tracing::warn!(
                shard = shard.id,
                "refusing connection: connections_max reached"
            );
            continue;
        }
        let s = shard.clone();
        runtime::spawn_local_into(route_connection(s, stream), shard.tq.data)
            .expect("data queue")
            .detach();
    }
}

/// Serves a new connection here, or hands it to the shard its handshake
/// asks for. Only the first frame is looked at; it stays in the buffer and
/// is answered by whichever shard serves the connection.
async fn route_connection(shard: Rc<Shard>, mut stream: TcpStream) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let target = loop {
        match requested_shard(&buf, shard.config.limits.frame_bytes_max) {
            Some(t) => break t,
            None => {
                let len = buf.len();
                buf.resize(len + READ_CHUNK_BYTES, 0);
                match stream.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.truncate(len + n),
                }
            }
        }
    };
    if target == shard.id || target >= shard.shard_count {
        serve(shard, stream, buf).await;
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
    if buf.len() < 4 + len as usize {
        return None;
    }
    let op = u16::from_le_bytes([buf[4], buf[5]]);
    if op != Op::Handshake as u16 {
        return Some(ANY_SHARD);
    }
    let body = Bytes::copy_from_slice(&buf[FRAME_HEADER_BYTES..4 + len as usize]);
    Some(HandshakeRequest::decode(body).map_or(ANY_SHARD, |h| h.shard))
}

/// Takes over a connection another shard handed to this one.
pub fn adopt(shard: &Rc<Shard>, fd: i32, buffered: Bytes) {
    // SAFETY: the descriptor was duplicated for this hand-off and is owned
    // by this message alone.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let s = shard.clone();
    runtime::spawn_local_into(
        serve(s, stream, BytesMut::from(&buffered[..])),
        shard.tq.data,
    )
    .expect("data queue")
    .detach();
}

/// Replies waiting to be written, shared by the reader's reply tasks and
/// the writer.
struct Outbox {
    frames: RefCell<VecDeque<Bytes>>,
    /// Event counter: bumped on every push and on close.
    event: Watch,
    reader_done: Cell<bool>,
    in_flight: Cell<usize>,
    broken: Cell<bool>,
}

impl Outbox {
    fn push_reply(&self, op: u16, request_id: u64, reply: Reply) {
        let len: usize = reply.body.iter().map(Bytes::len).sum();
        let head = frame_header(op, reply.code as u16, request_id, len);
        let mut frames = self.frames.borrow_mut();
        frames.push_back(Bytes::copy_from_slice(&head));
        frames.extend(reply.body);
        drop(frames);
        self.event.advance(self.event.get() + 1);
    }
    fn bump(&self) {
        self.event.advance(self.event.get() + 1);
    }
}

async fn serve(shard: Rc<Shard>, stream: TcpStream, buf: BytesMut) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    {
        let mut m = shard.metrics.borrow_mut();
        m.connections_open += 1;
        m.connections_total += 1;
    }
    let (rd, wr) = split(stream);
    let outbox = Rc::new(Outbox {
        frames: RefCell::new(VecDeque::new()),
        event: Watch::new(0),
        reader_done: Cell::new(false),
        in_flight: Cell::new(0),
        broken: Cell::new(false),
    });
    let writer = runtime::spawn_local_into(write_loop(wr, outbox.clone()), shard.tq.data)
        .expect("data queue");
    if let Err(reason) = read_loop(&shard, rd, &outbox, buf).await {
        tracing::debug!(shard = shard.id, ?peer, "closing connection: {reason}");
    }
    outbox.reader_done.set(true);
    outbox.bump();
    writer.await;
    shard.metrics.borrow_mut().connections_open -= 1;
}

async fn read_loop(
    shard: &Rc<Shard>,
    mut rd: ReadHalf,
    outbox: &Rc<Outbox>,
    mut buf: BytesMut,
) -> Result<(), String> {
    let decoder = FrameDecoder::new(shard.config.limits.frame_bytes_max);
    let mut scratch = vec![0u8; READ_CHUNK_BYTES];
    let permits = Rc::new(Semaphore::new(u64::from(
        shard.config.limits.in_flight_requests_max,
    )));
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(((op, version, request_id), body))) => {
                    let permit = permits
                        .clone()
                        .acquire_static_permit(1)
                        .await
                        .map_err(|e| format!("permits closed: {e}"))?;
                    let pending = submit(shard, op, version, body).await;
                    outbox.in_flight.set(outbox.in_flight.get() + 1);
                    let ob = outbox.clone();
                    runtime::spawn_local_into(
                        async move {
                            let reply = pending.resolve().await;
                            ob.in_flight.set(ob.in_flight.get() - 1);
                            ob.push_reply(op, request_id, reply);
                            drop(permit);
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
        let read = if frame_rest > READ_CHUNK_BYTES {
            // A large frame is pending: read up to 1 MiB straight into the
            // buffer, so big batches arrive in few reads.
            buf.resize(len + frame_rest.min(1 << 20), 0);
            let r = rd.read(&mut buf[len..]).await;
            buf.truncate(len + r.as_ref().map_or(0, |n| *n));
            r
        } else {
            // Small reads go through a scratch chunk, so each read copies
            // the bytes that came instead of zeroing a whole chunk of `buf`.
            let r = rd.read(&mut scratch).await;
            if let Ok(n) = r {
                buf.extend_from_slice(&scratch[..n]);
            }
            r
        };
        let n = read.map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return if len == 0 {
                Ok(())
            } else {
                Err(format!("peer closed mid-frame with {len} bytes buffered"))
            };
        }
    }
}

async fn write_loop(mut wr: WriteHalf, outbox: Rc<Outbox>) {
    let mut coalesced = BytesMut::with_capacity(COALESCE_BYTES_MAX);
    loop {
        let seen = outbox.event.get();
        let frames: Vec<Bytes> = outbox.frames.borrow_mut().drain(..).collect();
        if frames.is_empty() {
            if outbox.reader_done.get() && outbox.in_flight.get() == 0 {
                break;
            }
            let _ = outbox.event.wait_for(seen + 1).await;
            continue;
        }
        for f in frames {
            if f.len() < COALESCE_BYTES_MAX {
                coalesced.extend_from_slice(&f);
                if coalesced.len() < COALESCE_BYTES_MAX {
                    continue;
                }
            }
            if !coalesced.is_empty() {
                if wr.write_all(&coalesced).await.is_err() {
                    outbox.broken.set(true);
                    return;
                }
                coalesced.clear();
            }
            if f.len() >= COALESCE_BYTES_MAX && wr.write_all(&f).await.is_err() {
                outbox.broken.set(true);
                return;
            }
        }
        if !coalesced.is_empty() {
            if wr.write_all(&coalesced).await.is_err() {
                outbox.broken.set(true);
                return;
            }
            coalesced.clear();
        }
    }
    let _ = wr.flush().await;
    let _ = wr.close().await;
}
