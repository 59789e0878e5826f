//! Consumer group offsets of the queues a shard owns: (group, queue id) →
//! next offset to consume. Kept in memory, persisted by the shard's
//! background task to `group-offsets.json` whenever changed (at most once
//! per checkpoint interval) and at shutdown, like RocketMQ's periodic
//! consumer-offset flush: after a crash a group may re-read up to one
//! interval of messages, never skip any.

use crate::ids::QueueId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// File name inside the shard directory.
pub const GROUP_OFFSETS_FILE: &str = "group-offsets.json";
pub use crate::group::config::GROUP_NAME_BYTES_MAX;

/// Why a commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupOffsetError {
    #[error("group name of {0} bytes is empty or over {GROUP_NAME_BYTES_MAX}")]
    BadName(usize),
    #[error("this shard holds {0} committed offsets, limits.group_offsets_max")]
    Full(u32),
}

#[derive(Serialize, Deserialize)]
struct Entry {
    group: String,
    queue_id: u32,
    offset: u64,
}

/// The group offsets of one shard.
#[derive(Default, Debug)]
pub struct GroupOffsets {
    offsets: BTreeMap<(String, u32), u64>,
    dirty: bool,
}

impl GroupOffsets {
    /// Loads from `dir` (blocking); a missing file is empty.
    pub fn load(dir: &Path) -> Result<GroupOffsets, String> {
        let path = dir.join(GROUP_OFFSETS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(GroupOffsets::default())
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let entries: Vec<Entry> =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(GroupOffsets {
            offsets: entries
                .into_iter()
                .map(|e| ((e.group, e.queue_id), e.offset))
                .collect(),
            dirty: false,
        })
    }

    /// Records a commit; a new (group, queue) is refused past `max`.
    pub fn commit(
        &mut self,
        group: &str,
        queue_id: QueueId,
        offset: u64,
        max: u32,
    ) -> Result<(), GroupOffsetError> {
        if group.is_empty() || group.len() > GROUP_NAME_BYTES_MAX {
            return Err(GroupOffsetError::BadName(group.len()));
        }
        let key = (group.to_owned(), queue_id.0);
        if !self.offsets.contains_key(&key) && self.offsets.len() >= max as usize {
            return Err(GroupOffsetError::Full(max));
        }
        self.offsets.insert(key, offset);
        self.dirty = true;
        Ok(())
    }

    /// The committed offset, if any.
    pub fn get(&self, group: &str, queue_id: QueueId) -> Option<u64> {
        self.offsets.get(&(group.to_owned(), queue_id.0)).copied()
    }

    /// Forgets every group's offset of a removed queue.
    pub fn remove_queue(&mut self, queue_id: QueueId) {
        let before = self.offsets.len();
        self.offsets.retain(|(_, q), _| *q != queue_id.0);
        self.dirty |= before != self.offsets.len();
    }

    /// The document to store if anything changed since the last call.
    pub fn take_dirty_snapshot(&mut self) -> Option<String> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        let entries: Vec<Entry> = self
            .offsets
            .iter()
            .map(|((g, q), o)| Entry {
                group: g.clone(),
                queue_id: *q,
                offset: *o,
            })
            .collect();
        Some(serde_json::to_string(&entries).expect("offsets serialise"))
    }

    /// Marks the offsets dirty again (a store failed).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_snapshot_load_round_trip() {
        let mut g = GroupOffsets::default();
        assert!(g.take_dirty_snapshot().is_none());
        g.commit("g1", QueueId(4), 10, 3).unwrap();
        g.commit("g2", QueueId(4), 3, 3).unwrap();
        g.commit("g1", QueueId(5), 7, 3).unwrap();
        assert_eq!(
            g.commit("g3", QueueId(5), 7, 3),
            Err(GroupOffsetError::Full(3))
        );
        g.commit("g1", QueueId(5), 8, 3).unwrap();
        assert_eq!(
            g.commit("", QueueId(5), 7, 3),
            Err(GroupOffsetError::BadName(0))
        );
        assert!(g.commit(&"x".repeat(201), QueueId(5), 7, 9).is_err());
        let snap = g.take_dirty_snapshot().unwrap();
        assert!(g.take_dirty_snapshot().is_none(), "snapshot clears dirty");
        let dir = tempfile::tempdir().unwrap();
        crate::storage::write_atomic(dir.path(), GROUP_OFFSETS_FILE, snap.as_bytes()).unwrap();
        let mut back = GroupOffsets::load(dir.path()).unwrap();
        assert_eq!(back.get("g1", QueueId(4)), Some(10));
        assert_eq!(back.get("g1", QueueId(5)), Some(8));
        assert_eq!(back.get("g3", QueueId(4)), None);
        back.remove_queue(QueueId(4));
        assert_eq!(back.get("g2", QueueId(4)), None);
        assert!(back.take_dirty_snapshot().is_some());
    }
}
