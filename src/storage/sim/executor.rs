//! A deterministic single-threaded executor for the storage simulation.
//!
//! Tasks run one poll at a time, in an order a seeded RNG picks among the
//! ready ones (so I/O completions, the flusher, the syncer and the
//! checkpointer interleave differently per seed); time is virtual and jumps
//! to the next timer when no task is ready. The same seed gives the same
//! run, step for step. [`Sim::crash`] drops every task mid-flight: a
//! process that died at that instant.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// SplitMix64: small, fast, good enough to drive a simulation.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `p_per_mille / 1000`.
    pub fn chance(&mut self, p_per_mille: u32) -> bool {
        self.below(1000) < u64::from(p_per_mille)
    }
}

type Task = Pin<Box<dyn Future<Output = ()>>>;

#[derive(Default)]
struct ReadyQueue {
    ids: Vec<usize>,
    queued: Vec<bool>,
}

impl ReadyQueue {
    fn push(&mut self, id: usize) {
        if self.queued.len() <= id {
            self.queued.resize(id + 1, false);
        }
        if !self.queued[id] {
            self.queued[id] = true;
            self.ids.push(id);
        }
    }
}

struct TaskWaker {
    id: usize,
    /// Which generation of tasks the waker belongs to (a crash starts a new
    /// one; wakers of dropped tasks are ignored).
    generation: u64,
    queue: Arc<Mutex<(u64, ReadyQueue)>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let mut q = self.queue.lock().expect("ready queue");
        if q.0 == self.generation {
            q.1.push(self.id);
        }
    }
}

struct Inner {
    tasks: RefCell<Vec<Option<Task>>>,
    /// Tasks spawned during a poll, added after it.
    spawned: RefCell<Vec<Task>>,
    queue: Arc<Mutex<(u64, ReadyQueue)>>,
    now_us: Cell<u64>,
    timers: RefCell<BTreeMap<(u64, u64), Waker>>,
    timer_seq: Cell<u64>,
    rng: RefCell<Rng>,
    steps: Cell<u64>,
}

/// Handle on the executor; cheap to clone.
#[derive(Clone)]
pub struct Sim(Rc<Inner>);

/// Why [`Sim::run_until`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The condition held.
    Done,
    /// No task is ready and no timer is pending.
    Idle,
    /// The step budget ran out.
    StepLimit,
}

impl Sim {
    /// An executor whose scheduling choices follow `seed`; virtual time
    /// starts at `start_us`.
    pub fn new(seed: u64, start_us: u64) -> Sim {
        Sim(Rc::new(Inner {
            tasks: RefCell::new(Vec::new()),
            spawned: RefCell::new(Vec::new()),
            queue: Arc::new(Mutex::new((0, ReadyQueue::default()))),
            now_us: Cell::new(start_us),
            timers: RefCell::new(BTreeMap::new()),
            timer_seq: Cell::new(0),
            rng: RefCell::new(Rng::new(seed)),
            steps: Cell::new(0),
        }))
    }

    /// Runs `f` as a task.
    pub fn spawn(&self, f: impl Future<Output = ()> + 'static) {
        self.0.spawned.borrow_mut().push(Box::pin(f));
    }

    fn adopt_spawned(&self) {
        let new: Vec<Task> = std::mem::take(&mut *self.0.spawned.borrow_mut());
        for t in new {
            let mut tasks = self.0.tasks.borrow_mut();
            let id = match tasks.iter().position(Option::is_none) {
                Some(i) => {
                    tasks[i] = Some(t);
                    i
                }
                None => {
                    tasks.push(Some(t));
                    tasks.len() - 1
                }
            };
            drop(tasks);
            self.0.queue.lock().expect("ready queue").1.push(id);
        }
    }

    /// Virtual microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.0.now_us.get()
    }

    /// Scheduling steps taken so far.
    pub fn steps(&self) -> u64 {
        self.0.steps.get()
    }

    /// The simulation's random source.
    pub fn rng(&self) -> std::cell::RefMut<'_, Rng> {
        self.0.rng.borrow_mut()
    }

    /// Resolves once virtual time passed `d`.
    pub fn sleep(&self, d: Duration) -> Sleep {
        Sleep {
            sim: self.clone(),
            deadline_us: self.now_us() + d.as_micros() as u64,
            key: None,
        }
    }

    /// Runs tasks until `done()` holds (checked after every step), nothing
    /// can run, or `step_limit` more steps were taken.
    pub fn run_until(&self, mut done: impl FnMut() -> bool, step_limit: u64) -> RunOutcome {
        let until = self.steps() + step_limit;
        loop {
            self.adopt_spawned();
            if done() {
                return RunOutcome::Done;
            }
            if self.steps() >= until {
                return RunOutcome::StepLimit;
            }
            let (generation, next) = {
                let mut q = self.0.queue.lock().expect("ready queue");
                let n = q.1.ids.len();
                if n == 0 {
                    (q.0, None)
                } else {
                    let i = self.0.rng.borrow_mut().below(n as u64) as usize;
                    let id = q.1.ids.swap_remove(i);
                    q.1.queued[id] = false;
                    (q.0, Some(id))
                }
            };
            let Some(id) = next else {
                if !self.fire_next_timer() {
                    return RunOutcome::Idle;
                }
                continue;
            };
            self.0.steps.set(self.steps() + 1);
            let task = self.0.tasks.borrow_mut().get_mut(id).and_then(Option::take);
            let Some(mut task) = task else { continue };
            let waker = Waker::from(Arc::new(TaskWaker {
                id,
                generation,
                queue: self.0.queue.clone(),
            }));
            let mut cx = Context::from_waker(&waker);
            if task.as_mut().poll(&mut cx).is_pending() {
                self.0.tasks.borrow_mut()[id] = Some(task);
            }
        }
    }

    /// Advances virtual time to the next timer and wakes it (and every
    /// other due one); false when there is none.
    fn fire_next_timer(&self) -> bool {
        let mut timers = self.0.timers.borrow_mut();
        let Some((&(deadline, _), _)) = timers.iter().next() else {
            return false;
        };
        self.0.now_us.set(self.now_us().max(deadline));
        let later = timers.split_off(&(deadline + 1, 0));
        let due = std::mem::replace(&mut *timers, later);
        drop(timers);
        for (_, w) in due {
            w.wake();
        }
        true
    }

    /// Drops every task and timer: the process died here.
    pub fn crash(&self) {
        let tasks: Vec<Option<Task>> = std::mem::take(&mut *self.0.tasks.borrow_mut());
        let spawned: Vec<Task> = std::mem::take(&mut *self.0.spawned.borrow_mut());
        {
            let mut q = self.0.queue.lock().expect("ready queue");
            q.0 += 1;
            q.1 = ReadyQueue::default();
        }
        // Dropping a task may run destructors that touch the executor.
        drop(tasks);
        drop(spawned);
        self.0.timers.borrow_mut().clear();
        self.0.spawned.borrow_mut().clear();
    }
}

/// Future of [`Sim::sleep`].
pub struct Sleep {
    sim: Sim,
    deadline_us: u64,
    key: Option<(u64, u64)>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.sim.now_us() >= self.deadline_us {
            return Poll::Ready(());
        }
        let key = match self.key {
            Some(k) => k,
            None => {
                let seq = self.sim.0.timer_seq.get();
                self.sim.0.timer_seq.set(seq + 1);
                (self.deadline_us, seq)
            }
        };
        self.key = Some(key);
        self.sim
            .0
            .timers
            .borrow_mut()
            .insert(key, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            self.sim.0.timers.borrow_mut().remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_interleaving() {
        let trace = |seed: u64| {
            let sim = Sim::new(seed, 0);
            let log = Rc::new(RefCell::new(Vec::new()));
            for t in 0..4u32 {
                let (s, l) = (sim.clone(), log.clone());
                sim.spawn(async move {
                    for i in 0..5u32 {
                        l.borrow_mut().push(t * 10 + i);
                        s.sleep(Duration::from_micros(u64::from(t % 2))).await;
                    }
                });
            }
            assert_eq!(sim.run_until(|| false, 10_000), RunOutcome::Idle);
            let v = log.borrow().clone();
            v
        };
        assert_eq!(trace(7), trace(7));
        assert_ne!(trace(7), trace(8), "seeds should change the order");
        assert_eq!(trace(7).len(), 20);
    }

    #[test]
    fn crash_drops_every_task() {
        let sim = Sim::new(1, 0);
        let ran = Rc::new(Cell::new(0));
        let (s, r) = (sim.clone(), ran.clone());
        sim.spawn(async move {
            loop {
                r.set(r.get() + 1);
                s.sleep(Duration::from_millis(1)).await;
            }
        });
        sim.run_until(|| ran.get() >= 3, 1000);
        sim.crash();
        let before = ran.get();
        assert_eq!(sim.run_until(|| false, 1000), RunOutcome::Idle);
        assert_eq!(ran.get(), before);
    }
}
