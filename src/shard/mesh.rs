//! The mesh between shards: one bounded glommio shared channel for each
//! ordered pair of shards, carrying requests for a queue another shard owns
//! and their replies. Payloads travel as `bytes::Bytes` (a reference count
//! moves between cores, the bytes do not). A sender awaits channel capacity,
//! which is the back-pressure between cores; a channel preserves order, so
//! produce requests for one queue are appended in the order they arrived.

use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::ids::QueueIndex;
use crate::runtime::{oneshot, OneshotReceiver, OneshotSender};
use crate::runtime::{
    shared_channel, spawn_local, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};

/// Requests in flight between two shards before senders wait.
pub const MESH_CHANNEL_DEPTH: usize = 1024;

/// A message between shards.
pub enum MeshMsg {
    /// A request for the receiving shard; `queue` is the resolved queue
    /// of a produce.
    Request {
        from: u16,
        id: u64,
        op: u16,
        queue: Option<QueueIndex>,
        body: Bytes,
    },
    /// The reply to request `id`, as a wire error code and body chunks.
    Reply {
        id: u64,
        code: u16,
        body: Vec<Bytes>,
    },
    /// A client connection handed over because its handshake asked for the
    /// receiving shard: the socket (a duplicated descriptor the receiver now
    /// owns) and the bytes already read from it, handshake first.
    Adopt { fd: i32, buffered: Bytes },
}

/// One shard's unconnected ends of the mesh, built before the executors
/// start and moved into each shard's thread.
pub struct MeshEnds {
    senders: Vec<Option<SharedSender<MeshMsg>>>,
    receivers: Vec<Option<SharedReceiver<MeshMsg>>>,
}

/// Builds the ends for `n` shards: `ends[i].senders[j]` feeds
/// `ends[j].receivers[i]`.
pub fn build_mesh(n: usize) -> Vec<MeshEnds> {
    let mut ends: Vec<MeshEnds> = (0..n)
        .map(|_| MeshEnds {
            senders: (0..n).map(|_| None).collect(),
            receivers: (0..n).map(|_| None).collect(),
        })
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(MESH_CHANNEL_DEPTH);
                ends[from].senders[to] = Some(tx);
                ends[to].receivers[from] = Some(rx);
            }
        }
    }
    ends
}

/// Why a mesh send failed.
#[derive(Debug, thiserror::Error)]
#[error("shard {0} is not reachable (stopping?)")]
pub struct MeshError(pub u16);

/// Where the reply to a forwarded request is delivered: code and body.
type ReplySlot = OneshotSender<(u16, Vec<Bytes>)>;

/// One shard's connected view of the mesh.
pub struct Mesh {
    me: u16,
    senders: Vec<Option<ConnectedSender<MeshMsg>>>,
    pending: RefCell<HashMap<u64, ReplySlot>>,
    next_id: Cell<u64>,
}

impl Mesh {
    /// Connects this shard's ends; returns the mesh and the receivers to
    /// drain, by peer shard.
    pub async fn connect(
        me: u16,
        ends: MeshEnds,
    ) -> (Mesh, Vec<(u16, ConnectedReceiver<MeshMsg>)>) {
        // Each end waits for its peer to connect, so all connect at once.
        let senders: Vec<_> = ends
            .senders
            .into_iter()
            .map(|s| s.map(|s| spawn_local(s.connect())))
            .collect();
        let receivers: Vec<_> = ends
            .receivers
            .into_iter()
            .enumerate()
            .filter_map(|(peer, r)| r.map(|r| (peer as u16, spawn_local(r.connect()))))
            .collect();
        let mut connected_senders = Vec::new();
        for s in senders {
            connected_senders.push(match s {
                Some(task) => Some(task.await),
                None => None,
            });
        }
        let mut connected_receivers = Vec::new();
        for (peer, task) in receivers {
            connected_receivers.push((peer, task.await));
        }
        (
            Mesh {
                me,
                senders: connected_senders,
                pending: RefCell::new(HashMap::new()),
                next_id: Cell::new(1),
            },
            connected_receivers,
        )
    }

    /// Sends a request to shard `to`, waiting for channel capacity; the
    /// returned receiver yields the reply (`None` if the peer went away).
    pub async fn request(
        &self,
        to: u16,
        op: u16,
        queue: Option<QueueIndex>,
        body: Bytes,
    ) -> Result<OneshotReceiver<(u16, Vec<Bytes>)>, MeshError> {
        let sender = self
            .senders
            .get(to as usize)
            .and_then(Option::as_ref)
            .ok_or(MeshError(to))?;
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let (tx, rx) = oneshot();
        self.pending.borrow_mut().insert(id, tx);
        let msg = MeshMsg::Request {
            from: self.me,
            id,
            op,
            queue,
            body,
        };
        if sender.send(msg).await.is_err() {
            self.pending.borrow_mut().remove(&id);
            return Err(MeshError(to));
        }
        Ok(rx)
    }

    /// Sends the reply to request `id` back to shard `to`.
    pub async fn reply(
        &self,
        to: u16,
        id: u64,
        code: u16,
        body: Vec<Bytes>,
    ) -> Result<(), MeshError> {
        let sender = self
            .senders
            .get(to as usize)
            .and_then(Option::as_ref)
            .ok_or(MeshError(to))?;
        sender
            .send(MeshMsg::Reply { id, code, body })
            .await
            .map_err(|_| MeshError(to))
    }

    /// Hands a client connection to shard `to`. On failure the descriptor is
    /// closed.
    pub async fn adopt(&self, to: u16, fd: i32, buffered: Bytes) -> Result<(), MeshError> {
        let sent = match self.senders.get(to as usize).and_then(Option::as_ref) {
            Some(sender) => sender.send(MeshMsg::Adopt { fd, buffered }).await.is_ok(),
            None => false,
        };
        if !sent {
            // SAFETY: `fd` was duplicated for this hand-off and is owned here.
            unsafe { libc::close(fd) };
            return Err(MeshError(to));
        }
        Ok(())
    }

    /// Delivers a reply that arrived for one of our requests.
    pub fn complete(&self, id: u64, code: u16, body: Vec<Bytes>) {
        if let Some(tx) = self.pending.borrow_mut().remove(&id) {
            tx.send((code, body));
        }
    }

    /// Closes every outgoing channel (shutdown).
    pub fn close(&self) {
        for s in self.senders.iter().flatten() {
            s.close();
        }
    }
}
