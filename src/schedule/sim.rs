//! Seeded property test of the timer state against a reference model (a
//! sorted map of pending entries): random schedules (due in the past, in a
//! few ms, seconds, days, and beyond the wheel's range), cancels of pending,
//! fired and unknown origins, carries, time steps of 1 ms to days, and
//! restarts from a snapshot (`timers` + `pins` into a fresh state). After
//! every step: the state holds exactly the model's entries, where the model
//! says they are stored; an advance fires exactly the entries due by then,
//! each once, in (due, origin) order, none early; the wheel never means to
//! sleep past its earliest entry.
//!
//! `KEELMQ_GROUP_SIM_SEEDS=N` runs N seeds per test (`KEELMQ_GROUP_SIM_BASE`
//! moves the range); a failure prints the command that replays its seed.

use std::collections::BTreeMap;

use super::*;
use crate::group::sim::{replay as replay_with, run_seeds, Log};
use crate::storage::sim::Rng;

const SEEDS_PER_TEST: u64 = 2500;
const STEPS: usize = 400;

struct Model {
    now: u64,
    /// (due, origin) → (pending, location)
    pending: BTreeMap<(u64, RecordAt), (Pending, Location)>,
    next_position: u64,
}

impl Model {
    fn find(&self, origin: RecordAt) -> Option<(u64, RecordAt)> {
        self.pending.keys().find(|k| k.1 == origin).copied()
    }
}

fn run(seed: u64, log: &mut Log) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let start = 1_700_000_000_000 + rng.below(1 << 30);
    let mut s = TimerState::new(start);
    let mut m = Model {
        now: start,
        pending: BTreeMap::new(),
        next_position: 4096,
    };
    let mut known: Vec<RecordAt> = Vec::new();
    for step in 0..STEPS {
        match rng.below(100) {
            0..=39 => {
                let n = 1 + rng.below(4) as u32;
                let position = m.next_position;
                m.next_position += 100 + rng.below(1000);
                for index in 0..n {
                    let due = match rng.below(10) {
                        0 => m.now.saturating_sub(rng.below(10_000)),
                        1..=4 => m.now + rng.below(100),
                        5..=6 => m.now + rng.below(10_000),
                        7 => m.now + rng.below(3 * 86_400_000),
                        8 => m.now + rng.below(2 * WHEEL_RANGE_MS),
                        _ => m.now + 1 + rng.below(3),
                    };
                    let p = Pending {
                        origin: RecordAt { position, index },
                        target: rng.below(4) as u32,
                        tags: rng.next_u64() as u32,
                        len: 30 + rng.below(200) as u32,
                        crc: rng.next_u64() as u32,
                        offset: 80 + index * 64,
                        priority: rng.below(10) as u8,
                    };
                    log.push(|| {
                        format!(
                            "{step}: schedule {:?} due +{}",
                            p.origin,
                            due as i64 - m.now as i64
                        )
                    });
                    if !s.schedule(due, p) {
                        return Err(log.report(
                            20,
                            format!("schedule of a new origin {:?} refused", p.origin),
                        ));
                    }
                    m.pending.insert((due, p.origin), (p, p.origin_location()));
                    known.push(p.origin);
                }
            }
            40..=49 if !known.is_empty() => {
                let o = known[rng.below(known.len() as u64) as usize];
                log.push(|| format!("{step}: cancel {o:?}"));
                let got = s.remove(o);
                let want = m.find(o).and_then(|k| m.pending.remove(&k).map(|v| (k, v)));
                match (got, want) {
                    (None, None) => {}
                    (Some(t), Some(((due, _), (p, loc))))
                        if t.due_ms == due && t.pending == p && t.location == loc => {}
                    (g, w) => {
                        return Err(
                            log.report(20, format!("cancel of {o:?}: state {g:?}, model {w:?}"))
                        )
                    }
                }
            }
            50..=54 if !known.is_empty() => {
                let o = known[rng.below(known.len() as u64) as usize];
                let to = Location {
                    position: m.next_position,
                    index: rng.below(8) as u32,
                    offset: 80 + rng.below(4000) as u32,
                };
                s.carried(o, to);
                if let Some(k) = m.find(o) {
                    m.pending.get_mut(&k).unwrap().1 = to;
                }
            }
            55..=59 => {
                log.push(|| format!("{step}: restart from a snapshot"));
                let mut fresh = TimerState::new(s.now());
                for t in s.timers() {
                    fresh.restore(t);
                }
                for (b, min) in s.pins() {
                    fresh.restore_pin(b, min);
                }
                s = fresh;
            }
            _ => {
                let step_ms = match rng.below(10) {
                    0..=5 => 1 + rng.below(5),
                    6..=7 => rng.below(2_000),
                    8 => rng.below(86_400_000),
                    _ => rng.below(3 * WHEEL_RANGE_MS),
                };
                // The driver's way: wake at next_wake when it comes first.
                let target = m.now + step_ms;
                let to = match s.next_wake() {
                    Some(w) if w < target && rng.chance(500) => w.max(m.now),
                    _ => target,
                };
                log.push(|| format!("{step}: advance +{}", to - m.now));
                let fired = s.advance(to);
                m.now = to;
                let due: Vec<(u64, RecordAt)> = m
                    .pending
                    .range(
                        ..(
                            to + 1,
                            RecordAt {
                                position: 0,
                                index: 0,
                            },
                        ),
                    )
                    .map(|(k, _)| *k)
                    .collect();
                let got: Vec<(u64, RecordAt)> =
                    fired.iter().map(|t| (t.due_ms, t.pending.origin)).collect();
                if got != due {
                    return Err(
                        log.report(20, format!("advance to {to}: fired {got:?}, due {due:?}"))
                    );
                }
                for t in &fired {
                    let (p, loc) = m.pending.remove(&(t.due_ms, t.pending.origin)).unwrap();
                    if t.pending != p || t.location != loc {
                        return Err(log.report(20, format!("fired {t:?}, model {p:?} at {loc:?}")));
                    }
                }
            }
        }
        // What is about to come due, as a read-ahead sees it.
        if rng.chance(100) {
            let (from, to) = (m.now + rng.below(1000), m.now + rng.below(5_000_000));
            let mut got: Vec<(u64, RecordAt)> = s
                .upcoming(from, to)
                .iter()
                .map(|t| (t.due_ms, t.pending.origin))
                .collect();
            got.sort_unstable();
            let want: Vec<(u64, RecordAt)> = m
                .pending
                .keys()
                .filter(|(d, _)| *d >= from.max(m.now + 1) && *d < to)
                .copied()
                .collect();
            if got != want {
                return Err(log.report(
                    20,
                    format!("upcoming [{from}, {to}): {got:?}, model {want:?}"),
                ));
            }
        }
        // After every step: same entries, same locations, no early wake-up
        // missed.
        if s.len() != m.pending.len() {
            return Err(log.report(
                20,
                format!("{} pending, model {}", s.len(), m.pending.len()),
            ));
        }
        for (&(due, origin), &(p, loc)) in &m.pending {
            match s.get(origin) {
                Some(t) if t.due_ms == due && t.pending == p && t.location == loc => {}
                g => {
                    return Err(log.report(
                        20,
                        format!("{origin:?}: state {g:?}, model due {due} at {loc:?}"),
                    ))
                }
            }
        }
        if let Some((&(first, _), _)) = m.pending.iter().next() {
            match s.next_wake() {
                Some(w) if w <= first.max(s.now()) => {}
                w => {
                    return Err(
                        log.report(20, format!("next wake {w:?} after the first due {first}"))
                    )
                }
            }
        }
    }
    Ok(())
}

#[test]
fn timer_state_agrees_with_the_model() {
    run_seeds(0, SEEDS_PER_TEST, "schedule::sim::replay", run);
}

#[test]
fn timer_state_agrees_with_the_model_more_seeds() {
    run_seeds(1, SEEDS_PER_TEST, "schedule::sim::replay", run);
}

#[test]
fn replay() {
    replay_with(run);
}
