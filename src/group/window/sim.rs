//! Seeded simulation of the delivery window against a model: random
//! receives, acks (current and stale), nacks, invisible-time changes,
//! consumers that vanish with their leases, dead-letter stores that come
//! late, producers, time steps and jumps. After every step it checks the
//! window's rules (module docs of `window.rs`); at the end consumers behave
//! and every message must finish exactly once.
//!
//! `KEELMQ_GROUP_SIM_SEEDS=N` runs N seeds per test (`KEELMQ_GROUP_SIM_BASE`
//! moves the range); a failure prints the command that replays its seed.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::group::journal::Event;
use crate::group::sim::Log;
use crate::storage::sim::Rng;

/// Seeds per test in CI: four tests, 10,000 seeds.
const SEEDS_PER_TEST: u64 = 2500;
const STEPS: usize = 300;

#[derive(Clone, Copy, Debug, PartialEq)]
enum M {
    /// May be delivered once `due` is reached.
    Waiting {
        due: u64,
    },
    Leased {
        lease: u64,
        deadline: u64,
    },
    DeadLettering,
    Acked,
    DeadLettered,
}

struct Model {
    cfg: WindowConfig,
    now: u64,
    visible_end: u64,
    state: BTreeMap<u64, M>,
    attempts: HashMap<u64, u32>,
    last_lease: u64,
    group_of: HashMap<u64, MessageGroup>,
    /// Each offset's priority (priority seeds).
    priority_of: HashMap<u64, u8>,
    /// When the window took each offset in (priority seeds: aging).
    taken_at: HashMap<u64, u64>,
    /// Offsets that ever had an ahead slot (their waiting time is the
    /// window's own: aging is not checked exactly for them).
    ahead_touched: std::collections::HashSet<u64>,
    /// Dead letters reported and not yet stored.
    dlq_pending: Vec<u64>,
    /// The last lease of each delivered offset.
    leases: HashMap<u64, u64>,
    /// Every offset below is finished (advanced as they finish).
    floor: u64,
}

impl Model {
    fn group(&self, o: u64) -> MessageGroup {
        if self.cfg.orderly {
            self.group_of[&o]
        } else {
            0
        }
    }
    fn finished(&self, o: u64) -> bool {
        matches!(self.state.get(&o), Some(M::Acked | M::DeadLettered))
    }
    /// Applies the passing of time to the model: expired leases fail.
    fn tick(&mut self, now: u64) {
        self.now = self.now.max(now);
        let max = self.cfg.attempts_max;
        for (o, s) in self.state.iter_mut() {
            if let M::Leased { deadline, .. } = *s {
                if deadline <= self.now {
                    *s = if self.attempts[o] >= max {
                        M::DeadLettering
                    } else {
                        M::Waiting { due: deadline }
                    };
                }
            }
        }
    }
    /// Advances the model's floor over finished offsets.
    fn settle_floor(&mut self) {
        while self.finished(self.floor) {
            self.floor += 1;
        }
    }
    /// Orderly: the lowest unfinished offset of each group below `upto`.
    fn heads(&self, upto: u64) -> HashMap<MessageGroup, u64> {
        let mut heads = HashMap::new();
        for o in self.floor..upto.min(self.visible_end) {
            if !self.finished(o) {
                heads.entry(self.group(o)).or_insert(o);
            }
        }
        heads
    }
    /// Whether `o` may be delivered now (`heads` from [`Model::heads`]
    /// covering `o`).
    fn eligible(&self, o: u64, heads: &HashMap<MessageGroup, u64>) -> bool {
        let due_ok = match self.state.get(&o) {
            None => true,
            Some(M::Waiting { due }) => *due <= self.now,
            _ => false,
        };
        due_ok && (!self.cfg.orderly || heads.get(&self.group(o)) == Some(&o))
    }
    fn last_lease_of(&self, o: u64) -> Option<u64> {
        self.leases.get(&o).copied()
    }
}

fn run_seed(seed: u64, log: &mut Log) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let steps_ms: Vec<u64> = (0..1 + rng.below(3)).map(|_| rng.below(80)).collect();
    let window_span = if rng.chance(300) { 4 } else { 48 };
    let cfg = WindowConfig {
        inflight_max: 1 + rng.below(window_span) as u32,
        attempts_max: 1 + rng.below(5) as u32,
        orderly: rng.chance(500),
        backoff: Backoff::new(steps_ms).unwrap(),
        priority_age_boost_ms: 0,
    };
    // Half the non-orderly seeds receive by priority; some of those age.
    let prioritized = !cfg.orderly && rng.chance(500);
    let mut cfg = cfg;
    if prioritized && rng.chance(300) {
        cfg.priority_age_boost_ms = 1 + rng.below(200);
    }
    let levels = 1 + rng.below(10) as u8;
    let groups = 1 + rng.below(4);
    let floor = rng.below(3) * 1000;
    let first_lease = 1 + rng.below(5);
    let mut w = DeliveryWindow::new(cfg.clone(), floor, first_lease);
    // Everything the window journaled, through the record codec.
    let mut journal: Vec<Event> = Vec::new();
    let crash_at = rng.below(STEPS as u64 + 500) as usize;
    let snapshot_at = rng.below(crash_at as u64 + 1) as usize;
    // (snapshot bytes, journal records before it)
    let mut snapshot: (Vec<u8>, usize) = (Vec::new(), 0);
    let mut m = Model {
        cfg: cfg.clone(),
        now: 0,
        visible_end: floor,
        state: BTreeMap::new(),
        attempts: HashMap::new(),
        last_lease: 0,
        group_of: HashMap::new(),
        priority_of: HashMap::new(),
        taken_at: HashMap::new(),
        ahead_touched: std::collections::HashSet::new(),
        dlq_pending: Vec::new(),
        leases: HashMap::new(),
        floor,
    };
    // Leases consumers hold (some stale), as handles.
    let mut held: Vec<Lease> = Vec::new();
    let total = STEPS + 2000;
    for step in 0..total {
        let settle = step >= STEPS;
        let pick = match (settle, step % 2) {
            (true, 0) => 1000,
            (true, _) => 700,
            _ => rng.below(1000),
        };
        match pick {
            // Time passes; sometimes a jump.
            0..=199 => {
                let dt = if rng.chance(30) {
                    rng.below(20_000)
                } else {
                    rng.below(40)
                };
                let now = m.now + dt;
                w.advance(now);
                m.tick(now);
                log.push(|| format!("advance {dt} -> {now}"));
            }
            // Producers append.
            200..=299 => {
                let n = 1 + rng.below(8);
                for o in m.visible_end..m.visible_end + n {
                    m.group_of.insert(o, rng.below(groups));
                    m.priority_of.insert(o, rng.below(u64::from(levels)) as u8);
                }
                m.visible_end += n;
                log.push(|| format!("produce {n} -> {}", m.visible_end));
            }
            // Ack a held lease (maybe stale).
            300..=499 if !held.is_empty() => {
                let l = held.swap_remove(rng.below(held.len() as u64) as usize);
                let expect_ok = matches!(m.state.get(&l.offset),
                    Some(M::Leased { lease, .. }) if *lease == l.lease)
                    || matches!(m.state.get(&l.offset), Some(M::Waiting { .. }))
                        && m.last_lease_of(l.offset) == Some(l.lease);
                let r = w.ack(l.offset, l.lease);
                log.push(|| format!("ack {l:?} -> {r:?}"));
                if r.is_ok() != expect_ok {
                    return Err(fail(
                        log,
                        format!("ack of {l:?} gave {r:?}, model expected ok={expect_ok}"),
                    ));
                }
                if r.is_ok() {
                    m.state.insert(l.offset, M::Acked);
                }
            }
            // Nack a held lease.
            500..=599 if !held.is_empty() => {
                let i = rng.below(held.len() as u64) as usize;
                let l = held[i];
                let delay = rng.chance(500).then(|| rng.below(60));
                let current = matches!(m.state.get(&l.offset),
                    Some(M::Leased { lease, .. }) if *lease == l.lease);
                let r = w.nack(l.offset, l.lease, delay);
                log.push(|| format!("nack {l:?} delay {delay:?} -> {r:?}"));
                if r.is_ok() != current {
                    return Err(fail(
                        log,
                        format!("nack of {l:?} gave {r:?}, model expected ok={current}"),
                    ));
                }
                if r.is_ok() {
                    held.swap_remove(i);
                    let a = m.attempts[&l.offset];
                    let due = m.now + delay.unwrap_or_else(|| cfg.backoff.delay_ms(a));
                    m.state.insert(
                        l.offset,
                        if a >= cfg.attempts_max {
                            M::DeadLettering
                        } else {
                            M::Waiting { due }
                        },
                    );
                }
            }
            // Extend a held lease.
            600..=649 if !held.is_empty() => {
                let i = rng.below(held.len() as u64) as usize;
                let l = held[i];
                let inv = 10 + rng.below(100);
                let current = matches!(m.state.get(&l.offset),
                    Some(M::Leased { lease, .. }) if *lease == l.lease);
                let r = w.change_invisible(l.offset, l.lease, inv);
                log.push(|| format!("change_invisible {l:?} {inv} -> {r:?}"));
                if r.is_ok() != current {
                    return Err(fail(
                        log,
                        format!(
                            "change_invisible of {l:?} gave {r:?}, model expected ok={current}"
                        ),
                    ));
                }
                if let Ok(deadline) = r {
                    if deadline != m.now + inv {
                        return Err(fail(
                            log,
                            format!("new deadline {deadline}, expected {}", m.now + inv),
                        ));
                    }
                    m.state.insert(
                        l.offset,
                        M::Leased {
                            lease: l.lease,
                            deadline,
                        },
                    );
                }
            }
            // A consumer vanishes with some of its leases.
            650..=689 if !held.is_empty() => {
                let n = 1 + rng.below(held.len() as u64) as usize;
                held.truncate(held.len() - n.min(held.len()));
                log.push(|| format!("consumer lost {n} handles"));
            }
            // The shard stores reported dead letters (some later).
            690..=749 => {
                let reported = w.take_dead_letters();
                for d in &reported {
                    if m.state.get(&d.offset) != Some(&M::DeadLettering)
                        || d.attempts != cfg.attempts_max
                        || m.attempts[&d.offset] != d.attempts
                    {
                        return Err(fail(
                            log,
                            format!(
                                "unexpected dead letter {d:?}, model {:?}",
                                m.state.get(&d.offset)
                            ),
                        ));
                    }
                    m.dlq_pending.push(d.offset);
                }
                let keep = if settle {
                    0
                } else {
                    rng.below(m.dlq_pending.len() as u64 + 1) as usize
                };
                let stored: Vec<u64> = m.dlq_pending.drain(keep..).collect();
                for o in stored {
                    w.dead_lettered(o);
                    m.state.insert(o, M::DeadLettered);
                }
                log.push(|| format!("dead letters {reported:?}"));
            }
            // Receive.
            _ => {
                let max = 1 + rng.below(10) as usize;
                let inv = 10 + rng.below(200);
                let now = m.now + if settle { 50 } else { 0 };
                m.tick(now);
                let visible_end = m.visible_end;
                let group_of = &m.group_of;
                let heads = m.heads(m.floor + u64::from(cfg.inflight_max) + 1);
                if prioritized {
                    // The window takes in what it has room for, now.
                    let end = visible_end.min(m.floor + u64::from(cfg.inflight_max));
                    for o in m.floor..end {
                        m.taken_at.entry(o).or_insert(m.now.max(1));
                    }
                }
                let got = if prioritized {
                    let prio = &m.priority_of;
                    // The shard: take in, scan beyond the window (a budget
                    // of a few offsets), offer what it found, lease.
                    w.take_prioritized(now, visible_end, |o| prio[&o]);
                    let next = w.next();
                    let scan = w.ahead_scan_from(visible_end);
                    if scan.is_none()
                        && next < visible_end
                        && w.len() == cfg.inflight_max as usize
                        && w.ahead_len() < w.ahead_max()
                    {
                        if let Some(p) = (1..=PRIORITY_MAX)
                            .find(|&p| w.ahead_cursor(p).1.max(next) < visible_end)
                        {
                            return Err(fail(
                                log,
                                format!("no scan with room while priority {p} is behind"),
                            ));
                        }
                    }
                    if let Some(from) = scan {
                        let known_to = visible_end.min(from + 1 + rng.below(40));
                        let found: Vec<(u64, u8)> = (from..known_to)
                            .filter_map(|o| (prio[&o] > 0).then_some((o, prio[&o])))
                            .collect();
                        let before: Vec<u64> = (0..=PRIORITY_MAX)
                            .map(|p| w.ahead_cursor(p).1.max(next))
                            .collect();
                        let short = w.offer_ahead(from, known_to, &found);
                        // Unless it ran out of room, every priority the
                        // scan covered took all of it.
                        if !short {
                            for p in 1..=PRIORITY_MAX {
                                let after = w.ahead_cursor(p).1;
                                if before[usize::from(p)] >= from && after < known_to {
                                    return Err(fail(
                                        log,
                                        format!("priority {p} stopped at {after} of {from}..{known_to} with room"),
                                    ));
                                }
                            }
                        }
                        log.push(|| format!("scan ahead {from}..{known_to}: {found:?}"));
                        for &(o, _) in &found {
                            if w.is_ahead(o) {
                                m.ahead_touched.insert(o);
                                m.taken_at.entry(o).or_insert(m.now.max(1));
                            }
                        }
                    }
                    let mut out = Vec::new();
                    w.receive_prioritized(now, max, inv, visible_end, |o| prio[&o], &mut out);
                    out
                } else {
                    w.receive(now, max, inv, visible_end, |o| group_of[&o])
                };
                log.push(|| format!("receive {max} at {now} -> {got:?}"));
                // What the window knows: its run of slots, and beyond it,
                // what its scans promise (and ahead slots a replay made).
                let base_end = w.next();
                let known = |o: u64, m: &Model| {
                    o < base_end || {
                        let p = m.priority_of[&o];
                        p > 0 && (o < w.ahead_cursor(p).1 || w.is_ahead(o))
                    }
                };
                for l in &got {
                    if prioritized {
                        // The highest priority deliverable message, the
                        // lowest offset among equals (with aging, also the
                        // oldest deliverable one may go first).
                        let eligible: Vec<u64> = (m.floor..visible_end)
                            .filter(|&o| known(o, &m) && m.eligible(o, &heads))
                            .collect();
                        let best = eligible
                            .iter()
                            .copied()
                            .min_by_key(|&o| (std::cmp::Reverse(m.priority_of[&o]), o));
                        let oldest = eligible.first().copied();
                        let aging = cfg.priority_age_boost_ms > 0;
                        // Before any restart the model knows when each
                        // message began to wait (a replay re-takes them
                        // later): then the aged choice is exact.
                        let touched = oldest.is_some_and(|o| m.ahead_touched.contains(&o));
                        let want = match (best, oldest) {
                            (Some(b), Some(o))
                                if aging && step < crash_at && o != b && !touched =>
                            {
                                let since = match m.state.get(&o) {
                                    Some(M::Waiting { due }) => *due,
                                    _ => m.taken_at[&o],
                                };
                                let aged = u64::from(m.priority_of[&o])
                                    + m.now.saturating_sub(since) / cfg.priority_age_boost_ms;
                                if aged >= u64::from(m.priority_of[&b]) {
                                    Some(o)
                                } else {
                                    Some(b)
                                }
                            }
                            _ => best,
                        };
                        let loose = aging
                            && (step >= crash_at && Some(l.offset) == oldest
                                || touched && [oldest, best].contains(&Some(l.offset)));
                        if Some(l.offset) != want && !loose {
                            return Err(fail(
                                log,
                                format!(
                                    "leased {} (priority {}) but {best:?} (priority {:?}) was deliverable",
                                    l.offset,
                                    m.priority_of[&l.offset],
                                    best.map(|b| m.priority_of[&b])
                                ),
                            ));
                        }
                    }
                    if !m.eligible(l.offset, &heads) {
                        return Err(fail(
                            log,
                            format!(
                                "delivered {l:?} while not eligible: {:?}",
                                m.state.get(&l.offset)
                            ),
                        ));
                    }
                    if l.lease <= m.last_lease {
                        return Err(fail(
                            log,
                            format!("lease {} not above {}", l.lease, m.last_lease),
                        ));
                    }
                    m.last_lease = l.lease;
                    let a = m.attempts.entry(l.offset).or_insert(0);
                    *a += 1;
                    if l.attempt != *a || *a > cfg.attempts_max {
                        return Err(fail(
                            log,
                            format!("attempt {} of {l:?}, model {a}", l.attempt),
                        ));
                    }
                    if l.deadline_ms != now + inv {
                        return Err(fail(log, format!("deadline of {l:?}")));
                    }
                    m.state.insert(
                        l.offset,
                        M::Leased {
                            lease: l.lease,
                            deadline: l.deadline_ms,
                        },
                    );
                    m.leases.insert(l.offset, l.lease);
                }
                // Work-conserving: a short receive left nothing eligible in
                // the window, and stopped only at the window's bound or the
                // visible end.
                if got.len() < max {
                    let heads = m.heads(w.next());
                    let known_due = (w.floor()..visible_end)
                        .find(|&o| (o < w.next() || w.is_ahead(o)) && m.eligible(o, &heads));
                    if let Some(o) = known_due {
                        return Err(fail(
                            log,
                            format!(
                                "receive of {max} gave {} while {o} was due: {:?}",
                                got.len(),
                                m.state.get(&o)
                            ),
                        ));
                    }
                    if w.next() < visible_end && w.len() < cfg.inflight_max as usize {
                        return Err(fail(
                            log,
                            "receive stopped short of new messages with room".into(),
                        ));
                    }
                }
                for l in &got {
                    if settle {
                        // Well-behaved consumers at the end: ack or nack.
                        if rng.chance(700) {
                            w.ack(l.offset, l.lease)
                                .map_err(|e| fail(log, format!("settle ack {e}")))?;
                            m.state.insert(l.offset, M::Acked);
                        } else {
                            let d = rng.below(30);
                            w.nack(l.offset, l.lease, Some(d))
                                .map_err(|e| fail(log, format!("settle nack {e}")))?;
                            let dead = m.attempts[&l.offset] >= cfg.attempts_max;
                            m.state.insert(
                                l.offset,
                                if dead {
                                    M::DeadLettering
                                } else {
                                    M::Waiting { due: now + d }
                                },
                            );
                        }
                    } else if !rng.chance(100) {
                        held.push(*l);
                    }
                }
            }
        }
        for e in w.take_journal() {
            journal.push(Event::decode(&e.encode()).expect("own record"));
        }
        if step == snapshot_at {
            snapshot = (w.snapshot(), journal.len());
        }
        if step == crash_at {
            check_replay(&mut w, &journal, &m, first_lease, floor).map_err(|e| fail(log, e))?;
            // The run goes on with the restored window: a restart.
            w = check_restore(&mut w, &snapshot, &journal, &m).map_err(|e| fail(log, e))?;
            log.push(|| format!("restart from the snapshot of step {snapshot_at}"));
        }
        // After every step.
        if prioritized {
            check_ahead(&w, &m, step < crash_at).map_err(|e| fail(log, e))?;
        }
        if w.len() > cfg.inflight_max as usize {
            return Err(fail(
                log,
                format!("window holds {} > {}", w.len(), cfg.inflight_max),
            ));
        }
        m.settle_floor();
        let lowest_open = m.floor.min(w.next());
        if w.floor() != lowest_open {
            return Err(fail(
                log,
                format!("floor {} but lowest unfinished {lowest_open}", w.floor()),
            ));
        }
        if settle && step > STEPS + 200 && w.floor() == m.visible_end && m.dlq_pending.is_empty() {
            break;
        }
    }
    check_replay(&mut w, &journal, &m, first_lease, floor).map_err(|e| fail(log, e))?;
    // Everything produced finished exactly once.
    if w.floor() != m.visible_end {
        return Err(fail(
            log,
            format!(
                "stuck: floor {} of {} produced, window {w:?}",
                w.floor(),
                m.visible_end
            ),
        ));
    }
    for o in floor..m.visible_end {
        if !m.finished(o) {
            return Err(fail(log, format!("offset {o} never finished")));
        }
    }
    Ok(())
}

/// The scan's promise: per priority, every offset of it in `[next, done)`
/// is finished and every unfinished one in `[max(next, done), cursor)` has
/// an ahead slot; and (before a restart) the ahead slots stay in bound.
fn check_ahead(w: &DeliveryWindow, m: &Model, bounded: bool) -> Result<(), String> {
    let next = w.next();
    for p in 1..=PRIORITY_MAX {
        let (done, cursor) = w.ahead_cursor(p);
        let of_p = |o: &u64| m.priority_of.get(o) == Some(&p);
        for o in (next..done.min(m.visible_end)).filter(of_p) {
            if !m.finished(o) {
                return Err(format!(
                    "priority {p}: {o} below done {done} but not finished"
                ));
            }
        }
        for o in (next.max(done)..cursor.min(m.visible_end)).filter(of_p) {
            if !m.finished(o) && !w.is_ahead(o) {
                return Err(format!(
                    "priority {p}: {o} below cursor {cursor} but has no ahead slot"
                ));
            }
        }
    }
    if bounded && w.ahead_len() > w.ahead_max() {
        return Err(format!("{} ahead slots > {}", w.ahead_len(), w.ahead_max()));
    }
    Ok(())
}

/// Replays one record as the shard does: priorities known only up to the
/// window's reach first, and all the way when that is refused.
fn replay_one(r: &mut DeliveryWindow, e: &Event, m: &Model) -> Result<(), JournalError> {
    let known_to = match *e {
        Event::Deliver { offset, count, .. } => {
            let cap = r.floor() + u64::from(m.cfg.inflight_max);
            (offset + u64::from(count)).min(cap.max(r.next()))
        }
        _ => u64::MAX,
    };
    let prio = |o| m.priority_of[&o];
    match r.apply_known(e, |o| m.group_of[&o], prio, known_to) {
        Ok(()) => Ok(()),
        Err((applied, _)) => r.apply_from(e, applied, |o| m.group_of[&o], prio),
    }
}

/// A restart: the window rebuilt from its journal is the one that ran
/// (once both clocks agree).
fn check_replay(
    w: &mut DeliveryWindow,
    journal: &[Event],
    m: &Model,
    first_lease: u64,
    floor: u64,
) -> Result<(), String> {
    let mut r = DeliveryWindow::new(m.cfg.clone(), floor, first_lease);
    for (i, e) in journal.iter().enumerate() {
        replay_one(&mut r, e, m).map_err(|err| format!("replay of record {i} {e:?}: {err}"))?;
    }
    r.advance(m.now);
    w.advance(m.now);
    let end = m.visible_end;
    let prio = |o| m.priority_of.get(&o).copied().unwrap_or(0);
    if r.durable_view(end, prio) != w.durable_view(end, prio) {
        return Err(format!(
            "replayed window differs:\n  ran      {:?}\n  replayed {:?}",
            w.durable_view(end, prio),
            r.durable_view(end, prio)
        ));
    }
    Ok(())
}

/// A restart from a snapshot and the journal after it.
fn check_restore(
    w: &mut DeliveryWindow,
    (bytes, from): &(Vec<u8>, usize),
    journal: &[Event],
    m: &Model,
) -> Result<DeliveryWindow, String> {
    let mut r =
        DeliveryWindow::restore(m.cfg.clone(), bytes).map_err(|e| format!("restore: {e}"))?;
    for (i, e) in journal[*from..].iter().enumerate() {
        replay_one(&mut r, e, m)
            .map_err(|err| format!("replay after the snapshot, record {i} {e:?}: {err}"))?;
    }
    r.replayed();
    r.advance(m.now);
    w.advance(m.now);
    let end = m.visible_end;
    let prio = |o| m.priority_of.get(&o).copied().unwrap_or(0);
    if r.durable_view(end, prio) != w.durable_view(end, prio) {
        return Err(format!(
            "restored window differs:\n  ran      {:?}\n  restored {:?}",
            w.durable_view(end, prio),
            r.durable_view(end, prio)
        ));
    }
    Ok(r)
}

fn fail(log: &Log, what: String) -> String {
    log.report(25, what)
}

#[test]
fn seeds_0() {
    crate::group::sim::run_seeds(0, SEEDS_PER_TEST, "group::window::sim::replay", run_seed);
}
#[test]
fn seeds_1() {
    crate::group::sim::run_seeds(1, SEEDS_PER_TEST, "group::window::sim::replay", run_seed);
}
#[test]
fn seeds_2() {
    crate::group::sim::run_seeds(2, SEEDS_PER_TEST, "group::window::sim::replay", run_seed);
}
#[test]
fn seeds_3() {
    crate::group::sim::run_seeds(3, SEEDS_PER_TEST, "group::window::sim::replay", run_seed);
}

#[test]
fn replay() {
    crate::group::sim::replay(run_seed);
}
