//! Seeded simulation of a group's membership: members join, heartbeat,
//! release what they are told to revoke, leave, crash and rejoin, over a
//! network that delays, loses and reorders messages, with the coordinator
//! expiring sessions. After every step: no queue is believed held by two
//! members, and no member believes a queue the coordinator gives to another.
//! At the end (no more faults) every queue is held by its target, the
//! target is balanced, and every member's belief is the coordinator's.
//!
//! `KEELMQ_GROUP_SIM_SEEDS=N` runs N seeds per test; `KEELMQ_SEED=S cargo
//! test --lib group::membership::sim::replay` replays one.

use std::collections::BTreeMap;

use super::*;
use crate::group::sim::Log;
use crate::storage::sim::Rng;

const SEEDS_PER_TEST: u64 = 2500;
const FAULT_STEPS: u64 = 600;

enum ToCoord {
    Join {
        seq: u64,
    },
    Heartbeat {
        id: MemberId,
        seq: u64,
        released: Vec<Grant>,
    },
    Leave {
        id: MemberId,
    },
}

struct Msg {
    at: u64,
    member: usize,
    /// The member's incarnation: a restart closes its connections, so
    /// answers to an earlier one never reach it.
    inc: u64,
    body: Body,
}

enum Body {
    Request(ToCoord),
    Reply {
        seq: u64,
        reply: Result<Assignment, MembershipError>,
    },
}

#[derive(Default)]
struct SimMember {
    /// In the group under this id.
    id: Option<MemberId>,
    /// The join or heartbeat awaiting an answer is newer than this.
    applied_seq: u64,
    seq: u64,
    joining: bool,
    held: BTreeMap<QueueId, u64>,
    /// Highest epoch released per queue: never accepted again.
    released_epoch: BTreeMap<QueueId, u64>,
    to_release: Vec<Grant>,
    /// Send time of the last answered heartbeat: held queues lapse
    /// `session_timeout_ms` after it.
    last_ok_sent: u64,
    next_heartbeat: u64,
    alive: bool,
    /// Send time of each request awaiting an answer, by seq.
    sent: BTreeMap<u64, u64>,
    inc: u64,
}

impl SimMember {
    /// Out of the group: answers to anything sent before are ignored.
    fn drop_all(&mut self) {
        self.held.clear();
        self.to_release.clear();
        self.applied_seq = self.seq;
        self.sent.clear();
        self.id = None;
        self.joining = false;
    }
}

fn run_seed(seed: u64, log: &mut Log) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let timeout = 50 + rng.below(400);
    let interval = (timeout / (2 + rng.below(4))).max(1);
    let cfg = MembershipConfig {
        session_timeout_ms: timeout,
        members_max: 1 + rng.below(6) as usize,
    };
    let n_members = 1 + rng.below(6) as usize;
    let n_queues = rng.below(12) as u32;
    let max_delay = rng.below(timeout);
    let loss = rng.below(200) as u32;
    let mut g = Membership::new(cfg);
    g.set_queues((0..n_queues).map(QueueId));
    let mut members: Vec<SimMember> = (0..n_members)
        .map(|_| SimMember {
            alive: true,
            ..SimMember::default()
        })
        .collect();
    let mut net: Vec<Msg> = Vec::new();
    let mut now = 0u64;
    let mut last_epoch: BTreeMap<QueueId, u64> = BTreeMap::new();
    let end = FAULT_STEPS + 3000;
    for step in 0..end {
        let faults = step < FAULT_STEPS;
        now += rng.below(if faults { 20 } else { 5 });
        let send = |net: &mut Vec<Msg>, rng: &mut Rng, member: usize, inc: u64, body: Body| {
            if faults && rng.chance(loss) {
                return;
            }
            let d = if faults { rng.below(max_delay + 1) } else { 1 };
            net.push(Msg {
                at: now + d,
                member,
                inc,
                body,
            });
        };
        // Members act.
        for (i, m) in members.iter_mut().enumerate() {
            if !m.alive {
                if !faults || rng.chance(20) {
                    *m = SimMember {
                        alive: true,
                        inc: m.inc + 1,
                        ..SimMember::default()
                    };
                    log.push(|| format!("{now}: member {i} restarts"));
                }
                continue;
            }
            // Held queues lapse before the coordinator can move them.
            if m.id.is_some() && now >= m.last_ok_sent + timeout {
                log.push(|| format!("{now}: member {i} ({:?}) lapses", m.id));
                m.drop_all();
            }
            if faults && rng.chance(3) {
                log.push(|| format!("{now}: member {i} crashes holding {:?}", m.held));
                m.alive = false;
                m.drop_all();
                continue;
            }
            match m.id {
                None if !m.joining => {
                    m.seq += 1;
                    m.joining = true;
                    m.next_heartbeat = now;
                    m.sent.insert(m.seq, now);
                    log.push(|| format!("{now}: member {i} joins (seq {})", m.seq));
                    send(
                        &mut net,
                        &mut rng,
                        i,
                        m.inc,
                        Body::Request(ToCoord::Join { seq: m.seq }),
                    );
                }
                None => {
                    // A join whose answer was lost: try again after a while.
                    if now >= m.next_heartbeat + timeout {
                        m.joining = false;
                        m.next_heartbeat = now;
                    }
                }
                Some(id) => {
                    if faults && rng.chance(5) {
                        log.push(|| format!("{now}: member {i} ({id}) leaves"));
                        m.drop_all();
                        send(
                            &mut net,
                            &mut rng,
                            i,
                            m.inc,
                            Body::Request(ToCoord::Leave { id }),
                        );
                        continue;
                    }
                    if now >= m.next_heartbeat || !m.to_release.is_empty() {
                        m.seq += 1;
                        m.next_heartbeat = now + interval;
                        m.sent.insert(m.seq, now);
                        let released = std::mem::take(&mut m.to_release);
                        log.push(|| {
                            format!(
                                "{now}: member {i} ({id}) heartbeats seq {} releasing {released:?}",
                                m.seq
                            )
                        });
                        send(
                            &mut net,
                            &mut rng,
                            i,
                            m.inc,
                            Body::Request(ToCoord::Heartbeat {
                                id,
                                seq: m.seq,
                                released,
                            }),
                        );
                    }
                }
            }
        }
        // The coordinator expires sessions.
        let gone = g.expire(now);
        if !gone.is_empty() {
            log.push(|| format!("{now}: coordinator expires {gone:?}"));
        }
        // Deliver what is due, in random order among the due.
        let mut due: Vec<Msg> = Vec::new();
        let mut i = 0;
        while i < net.len() {
            if net[i].at <= now {
                due.push(net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        while !due.is_empty() {
            let msg = due.swap_remove(rng.below(due.len() as u64) as usize);
            let i = msg.member;
            match msg.body {
                Body::Request(req) => {
                    let (seq, reply) = match req {
                        ToCoord::Join { seq } => (seq, g.join(now, &format!("m{i}"))),
                        ToCoord::Heartbeat { id, seq, released } => {
                            (seq, g.heartbeat(now, id, &released))
                        }
                        ToCoord::Leave { id } => {
                            let _ = g.leave(id);
                            log.push(|| format!("{now}: coordinator: {id} left"));
                            continue;
                        }
                    };
                    log.push(|| {
                        format!("{now}: coordinator answers member {i} seq {seq}: {reply:?}")
                    });
                    send(&mut net, &mut rng, i, msg.inc, Body::Reply { seq, reply });
                }
                Body::Reply { seq, reply } => {
                    let m = &mut members[i];
                    // Only the newest answer counts, and only in time: a
                    // lapsed answer would hand out queues already moved.
                    if !m.alive || msg.inc != m.inc || seq <= m.applied_seq {
                        continue;
                    }
                    match reply {
                        Err(MembershipError::UnknownMember(id)) if m.id == Some(id) => {
                            log.push(|| format!("{now}: member {i} learns {id} is gone"));
                            m.drop_all();
                            m.applied_seq = seq;
                        }
                        Err(_) => {
                            if m.joining {
                                m.joining = false;
                            }
                            m.applied_seq = seq;
                        }
                        Ok(a) => {
                            let is_join = m.id.is_none();
                            if is_join && !m.joining || !is_join && m.id != Some(a.member) {
                                continue;
                            }
                            let sent = m.sent_at(seq);
                            if now >= sent + timeout {
                                continue;
                            }
                            m.applied_seq = seq;
                            m.sent.retain(|&s, _| s > seq);
                            m.id = Some(a.member);
                            m.joining = false;
                            m.last_ok_sent = m.last_ok_sent.max(sent);
                            m.held.clear();
                            for gr in &a.granted {
                                if m.released_epoch
                                    .get(&gr.queue)
                                    .is_none_or(|&e| gr.epoch > e)
                                {
                                    m.held.insert(gr.queue, gr.epoch);
                                } else {
                                    // Released, but the release has not
                                    // arrived (it may be lost): again.
                                    m.to_release.push(*gr);
                                }
                            }
                            for r in &a.revoke {
                                m.released_epoch.insert(r.queue, r.epoch);
                                m.to_release.push(*r);
                            }
                            log.push(|| {
                                format!("{now}: member {i} applies seq {seq}: holds {:?}", m.held)
                            });
                        }
                    }
                }
            }
        }
        // Invariants.
        let mut believers: BTreeMap<QueueId, usize> = BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            if !m.alive {
                continue;
            }
            for (&q, &e) in &m.held {
                if let Some(other) = believers.insert(q, i) {
                    return Err(fail(
                        log,
                        format!("queue {q:?} held by members {other} and {i}"),
                    ));
                }
                if let Some((owner, _)) = g.owner(q) {
                    if Some(owner) != m.id {
                        return Err(fail(log, format!("member {i} ({:?}) holds {q:?} epoch {e} but the coordinator gives it to {owner}", m.id)));
                    }
                }
            }
        }
        for q in 0..n_queues {
            if let Some((_, e)) = g.owner(QueueId(q)) {
                let last = last_epoch.entry(QueueId(q)).or_insert(0);
                if e < *last {
                    return Err(fail(
                        log,
                        format!("queue {q} epoch went back from {last} to {e}"),
                    ));
                }
                *last = e;
            }
        }
        if !faults && step > FAULT_STEPS + 1000 && settled(&g, &members, n_queues) {
            return Ok(());
        }
    }
    Err(fail(
        log,
        format!(
            "not settled: target {:?}, holders {:?}, members {:?}",
            (0..n_queues)
                .map(|q| g.target(QueueId(q)))
                .collect::<Vec<_>>(),
            (0..n_queues)
                .map(|q| g.owner(QueueId(q)))
                .collect::<Vec<_>>(),
            members
                .iter()
                .map(|m| (m.id, m.held.clone()))
                .collect::<Vec<_>>()
        ),
    ))
}

impl SimMember {
    /// When the request with `seq` was sent (kept per member, few in flight).
    fn sent_at(&self, seq: u64) -> u64 {
        self.sent.get(&seq).copied().unwrap_or(0)
    }
}

/// Every queue held by its target, members' beliefs match, target balanced.
fn settled(g: &Membership, members: &[SimMember], n_queues: u32) -> bool {
    let live: Vec<MemberId> = g.members().map(|(id, _)| id).collect();
    if live.is_empty() {
        return n_queues == 0 || (0..n_queues).all(|q| g.owner(QueueId(q)).is_none());
    }
    let mut counts: BTreeMap<MemberId, u32> = live.iter().map(|&m| (m, 0)).collect();
    for q in 0..n_queues {
        let q = QueueId(q);
        let Some((owner, epoch)) = g.owner(q) else {
            return false;
        };
        if g.target(q) != Some(owner) {
            return false;
        }
        *counts.get_mut(&owner).expect("owner is a member") += 1;
        if !members
            .iter()
            .any(|m| m.id == Some(owner) && m.held.get(&q) == Some(&epoch))
        {
            return false;
        }
    }
    let (lo, hi) = (
        counts.values().min().unwrap(),
        counts.values().max().unwrap(),
    );
    hi - lo <= 1
}

fn fail(log: &Log, what: String) -> String {
    log.report(40, what)
}

#[test]
fn seeds_0() {
    crate::group::sim::run_seeds(
        0,
        SEEDS_PER_TEST,
        "group::membership::sim::replay",
        run_seed,
    );
}
#[test]
fn seeds_1() {
    crate::group::sim::run_seeds(
        1,
        SEEDS_PER_TEST,
        "group::membership::sim::replay",
        run_seed,
    );
}

#[test]
fn replay() {
    crate::group::sim::replay(run_seed);
}
