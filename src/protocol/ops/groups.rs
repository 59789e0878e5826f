//! Consumer-group operations: offset commit and fetch.

use crate::protocol::codec::{DecodeError, Reader, Writer};
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
