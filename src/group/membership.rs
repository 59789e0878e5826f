//! Membership and queue assignment of one consumer group in queue delivery,
//! on its coordinator shard. Plain state, no I/O: the shard feeds it joins,
//! heartbeats, leaves and the time, and tells the queues' shards who owns
//! what ([`Membership::owner`]).
//!
//! The broker owns assignment (no client-side rebalance): every join, leave
//! or expiry bumps the generation and recomputes a balanced, sticky target
//! (each member gets ⌊q/m⌋ or ⌈q/m⌉ queues, keeping what it holds where it
//! can). A queue moves in two steps, so two members never hold it at once:
//! its holder is told to revoke it and releases it explicitly (or leaves,
//! or its session expires); only then is it granted to its new owner, under
//! a fresh *grant epoch*. The queue's shard serves and takes commits only
//! from the current (member, epoch), so a fenced member is refused.
//!
//! A member holds a granted queue until it releases it or until
//! `session_timeout_ms` after it *sent* the last heartbeat that was
//! answered; the coordinator expires it `session_timeout_ms` after it
//! *received* its last heartbeat, which is later: a member always stops
//! before its queues can move. The simulation in `membership/sim.rs`
//! checks that with delayed, lost and reordered messages.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::QueueId;

/// Default time without a heartbeat after which a member leaves.
pub const SESSION_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default heartbeat interval.
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Most members of one group.
pub const GROUP_MEMBERS_MAX: usize = 1_024;

/// A member of a group: assigned at join, never reused within the group.
pub type MemberId = u64;

/// How a group's membership behaves.
#[derive(Clone, Copy, Debug)]
pub struct MembershipConfig {
    pub session_timeout_ms: u64,
    pub members_max: usize,
}

impl Default for MembershipConfig {
    fn default() -> MembershipConfig {
        MembershipConfig {
            session_timeout_ms: SESSION_TIMEOUT_MS_DEFAULT,
            members_max: GROUP_MEMBERS_MAX,
        }
    }
}

/// Why a membership request was refused (nothing changed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("the group has {0} members, the most it may have")]
    TooManyMembers(usize),
    #[error("member {0} is not in the group (it left or its session expired): join again")]
    UnknownMember(MemberId),
}

/// One granted queue: the member serves it under this epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub queue: QueueId,
    pub epoch: u64,
}

/// The answer to a join or heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub member: MemberId,
    pub generation: u64,
    /// Every queue the member holds now (idempotent: a lost answer is
    /// repaired by the next).
    pub granted: Vec<Grant>,
    /// Queues it must stop serving and release in its next heartbeat.
    pub revoke: Vec<Grant>,
}

#[derive(Clone, Debug)]
struct Member {
    instance: String,
    last_heartbeat_ms: u64,
}

/// The membership of one group.
#[derive(Clone, Debug)]
pub struct Membership {
    cfg: MembershipConfig,
    generation: u64,
    next_member: MemberId,
    next_epoch: u64,
    members: BTreeMap<MemberId, Member>,
    queues: BTreeSet<QueueId>,
    target: BTreeMap<QueueId, MemberId>,
    holder: BTreeMap<QueueId, (MemberId, u64)>,
}

impl Membership {
    pub fn new(cfg: MembershipConfig) -> Membership {
        Membership {
            cfg,
            generation: 0,
            next_member: 1,
            next_epoch: 1,
            members: BTreeMap::new(),
            queues: BTreeSet::new(),
            target: BTreeMap::new(),
            holder: BTreeMap::new(),
        }
    }

    /// Like [`Membership::new`], numbering members and grant epochs from
    /// `first` up (a coordinator that restarted starts above any id or
    /// epoch it handed out before: from the clock, in microseconds).
    pub fn numbered_from(cfg: MembershipConfig, first: u64) -> Membership {
        let mut m = Membership::new(cfg);
        m.next_member = first.max(1);
        m.next_epoch = first.max(1);
        m
    }

    /// The queues the group consumes now.
    pub fn queues(&self) -> impl Iterator<Item = QueueId> + '_ {
        self.queues.iter().copied()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn members(&self) -> impl Iterator<Item = (MemberId, &str)> {
        self.members
            .iter()
            .map(|(&id, m)| (id, m.instance.as_str()))
    }
    /// Who may serve `queue` now, under which epoch.
    pub fn owner(&self, queue: QueueId) -> Option<(MemberId, u64)> {
        self.holder.get(&queue).copied()
    }
    /// Who should hold `queue` once moves finish.
    pub fn target(&self, queue: QueueId) -> Option<MemberId> {
        self.target.get(&queue).copied()
    }
    /// When the next session could expire: the shard wakes then.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.members
            .values()
            .map(|m| m.last_heartbeat_ms + self.cfg.session_timeout_ms)
            .min()
    }

    /// The queues the group consumes (its subscriptions' topics' queues).
    pub fn set_queues(&mut self, queues: impl IntoIterator<Item = QueueId>) {
        self.queues = queues.into_iter().collect();
        let queues = &self.queues;
        self.holder.retain(|q, _| queues.contains(q));
        self.rebalance();
    }

    /// A new member joins: it gets an id and, in later heartbeats, queues.
    pub fn join(&mut self, now_ms: u64, instance: &str) -> Result<Assignment, MembershipError> {
        if self.members.len() >= self.cfg.members_max {
            return Err(MembershipError::TooManyMembers(self.members.len()));
        }
        let id = self.next_member;
        self.next_member += 1;
        self.members.insert(
            id,
            Member {
                instance: instance.to_string(),
                last_heartbeat_ms: now_ms,
            },
        );
        self.rebalance();
        Ok(self.assignment(id))
    }

    /// A member is alive and has released `released` (grants it was told
    /// to revoke). Answers what it holds now and what it must revoke.
    pub fn heartbeat(
        &mut self,
        now_ms: u64,
        member: MemberId,
        released: &[Grant],
    ) -> Result<Assignment, MembershipError> {
        let m = self
            .members
            .get_mut(&member)
            .ok_or(MembershipError::UnknownMember(member))?;
        m.last_heartbeat_ms = m.last_heartbeat_ms.max(now_ms);
        for g in released {
            if self.holder.get(&g.queue) == Some(&(member, g.epoch)) {
                self.holder.remove(&g.queue);
            }
        }
        Ok(self.assignment(member))
    }

    /// A member leaves cleanly: its queues move at once.
    pub fn leave(&mut self, member: MemberId) -> Result<(), MembershipError> {
        self.members
            .remove(&member)
            .ok_or(MembershipError::UnknownMember(member))?;
        self.holder.retain(|_, (m, _)| *m != member);
        self.rebalance();
        Ok(())
    }

    /// Removes members whose session expired; returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<MemberId> {
        let timeout = self.cfg.session_timeout_ms;
        let gone: Vec<MemberId> = self
            .members
            .iter()
            .filter(|(_, m)| m.last_heartbeat_ms + timeout <= now_ms)
            .map(|(&id, _)| id)
            .collect();
        if !gone.is_empty() {
            for id in &gone {
                self.members.remove(id);
            }
            self.holder.retain(|_, (m, _)| !gone.contains(m));
            self.rebalance();
        }
        gone
    }

    /// Grants the member's free target queues; lists what it holds and
    /// what it must give up.
    fn assignment(&mut self, member: MemberId) -> Assignment {
        let mine: Vec<QueueId> = self
            .target
            .iter()
            .filter(|(_, &m)| m == member)
            .map(|(&q, _)| q)
            .collect();
        for q in mine {
            if !self.holder.contains_key(&q) {
                self.holder.insert(q, (member, self.next_epoch));
                self.next_epoch += 1;
            }
        }
        let mut granted = Vec::new();
        let mut revoke = Vec::new();
        for (&queue, &(m, epoch)) in &self.holder {
            if m != member {
                continue;
            }
            let g = Grant { queue, epoch };
            if self.target.get(&queue) == Some(&member) {
                granted.push(g);
            } else {
                revoke.push(g);
            }
        }
        Assignment {
            member,
            generation: self.generation,
            granted,
            revoke,
        }
    }

    /// A new generation and a balanced target that moves as few queues as
    /// it can: members keep what they hold (or were to get) up to their
    /// share, the rest goes to the members with the fewest.
    fn rebalance(&mut self) {
        self.generation += 1;
        let n = self.members.len();
        if n == 0 {
            self.target.clear();
            return;
        }
        let q = self.queues.len();
        // The first `q % n` members (in id order) may take one more.
        let mut quota: BTreeMap<MemberId, usize> = self
            .members
            .keys()
            .enumerate()
            .map(|(i, &id)| (id, q / n + usize::from(i < q % n)))
            .collect();
        let mut target = BTreeMap::new();
        let mut free = Vec::new();
        for &queue in &self.queues {
            // Its holder keeps it, else whoever was to get it, within
            // their share.
            let keep = [
                self.holder.get(&queue).map(|&(m, _)| m),
                self.target.get(&queue).copied(),
            ]
            .into_iter()
            .flatten()
            .find(|m| quota.get(m).is_some_and(|&left| left > 0));
            match keep {
                Some(m) => {
                    *quota.get_mut(&m).expect("a member") -= 1;
                    target.insert(queue, m);
                }
                None => free.push(queue),
            }
        }
        for queue in free {
            let (&m, left) = quota
                .iter_mut()
                .filter(|(_, left)| **left > 0)
                .max_by_key(|(_, left)| **left)
                .expect("quotas add up to the queues");
            *left -= 1;
            target.insert(queue, m);
        }
        self.target = target;
    }
}

#[cfg(test)]
mod sim;

#[cfg(test)]
mod tests {
    use super::*;

    fn queues(n: u32) -> Vec<QueueId> {
        (0..n).map(QueueId).collect()
    }

    #[test]
    fn a_queue_moves_only_after_its_holder_releases_it() {
        let mut g = Membership::new(MembershipConfig::default());
        g.set_queues(queues(4));
        let a = g.join(0, "a").unwrap();
        assert_eq!(a.granted.len(), 4);
        let b = g.join(10, "b").unwrap();
        // b's two queues are still a's: nothing granted yet.
        assert!(b.granted.is_empty());
        let a2 = g.heartbeat(20, a.member, &[]).unwrap();
        assert_eq!(a2.revoke.len(), 2);
        assert_eq!(g.heartbeat(25, b.member, &[]).unwrap().granted.len(), 0);
        let a3 = g.heartbeat(30, a.member, &a2.revoke).unwrap();
        assert_eq!((a3.granted.len(), a3.revoke.len()), (2, 0));
        let b2 = g.heartbeat(35, b.member, &[]).unwrap();
        assert_eq!(b2.granted.len(), 2);
        // New epochs: the old grants are fenced at the queues' shards.
        for gr in &b2.granted {
            assert!(a2.revoke.iter().all(|r| r.epoch < gr.epoch));
            assert_eq!(g.owner(gr.queue), Some((b.member, gr.epoch)));
        }
        // A stale release (old epoch) changes nothing.
        g.heartbeat(40, b.member, &a2.revoke).unwrap();
        assert_eq!(g.heartbeat(41, b.member, &[]).unwrap().granted, b2.granted);
    }

    #[test]
    fn a_clean_leave_moves_at_once_and_an_expired_session_after_the_timeout() {
        let mut g = Membership::new(MembershipConfig {
            session_timeout_ms: 100,
            members_max: 2,
        });
        g.set_queues(queues(3));
        let a = g.join(0, "a").unwrap();
        let b = g.join(0, "b").unwrap();
        assert_eq!(g.join(0, "c"), Err(MembershipError::TooManyMembers(2)));
        let ra = g.heartbeat(1, a.member, &[]).unwrap();
        g.heartbeat(1, a.member, &ra.revoke).unwrap();
        assert_eq!(g.heartbeat(2, b.member, &[]).unwrap().granted.len(), 1);
        g.leave(a.member).unwrap();
        assert_eq!(g.heartbeat(3, b.member, &[]).unwrap().granted.len(), 3);
        let c = g.join(50, "c").unwrap();
        // b's last heartbeat was at 3: it expires at 103, not before.
        assert!(g.expire(102).is_empty());
        assert_eq!(g.expire(103), [b.member]);
        assert_eq!(g.heartbeat(104, c.member, &[]).unwrap().granted.len(), 3);
        assert_eq!(
            g.heartbeat(105, b.member, &[]),
            Err(MembershipError::UnknownMember(b.member))
        );
        assert_eq!(g.next_expiry_ms(), Some(204));
    }

    #[test]
    fn the_target_is_balanced_and_sticky() {
        let mut g = Membership::new(MembershipConfig::default());
        g.set_queues(queues(10));
        let ids: Vec<MemberId> = (0..3)
            .map(|i| g.join(0, &i.to_string()).unwrap().member)
            .collect();
        let count =
            |g: &Membership, m| (0..10).filter(|&q| g.target(QueueId(q)) == Some(m)).count();
        let mut counts: Vec<usize> = ids.iter().map(|&m| count(&g, m)).collect();
        counts.sort();
        assert_eq!(counts, [3, 3, 4]);
        let before: Vec<Option<MemberId>> = (0..10).map(|q| g.target(QueueId(q))).collect();
        g.join(0, "3").unwrap();
        let moved = (0..10)
            .filter(|&q| g.target(QueueId(q)) != before[q as usize])
            .count();
        assert_eq!(moved, 2, "from 3,3,4 to 3,3,2,2 only two queues move");
    }
}
