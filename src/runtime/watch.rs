//! A single-threaded watched counter: tasks wait until it reaches a target.
//! Used for the log's written and synced positions and for each queue's
//! visible offset. Waiters that give up (a long poll timing out) remove
//! themselves, so an idle queue never accumulates stale wakers.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// The watch was closed (the log failed or the shard is stopping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchClosed;

#[derive(Default)]
struct Inner {
    value: Cell<u64>,
    closed: Cell<bool>,
    next_id: Cell<u64>,
    /// (target, id) -> waker
    waiters: RefCell<BTreeMap<(u64, u64), Waker>>,
}

/// A counter that only grows, with waiters on targets.
#[derive(Clone, Default)]
pub struct Watch(Rc<Inner>);

impl Watch {
    /// A watch starting at `value`.
    pub fn new(value: u64) -> Watch {
        let w = Watch::default();
        w.0.value.set(value);
        w
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.value.get()
    }

    /// Raises the value to `value` (no-op if lower) and wakes every waiter
    /// whose target is now reached.
    pub fn advance(&self, value: u64) {
        if value <= self.0.value.get() {
            return;
        }
        self.0.value.set(value);
        let mut waiters = self.0.waiters.borrow_mut();
        let rest = waiters.split_off(&(value + 1, 0));
        let ready = std::mem::replace(&mut *waiters, rest);
        drop(waiters);
        for (_, w) in ready {
            w.wake();
        }
    }

    /// Closes the watch: every current and future waiter gets `WatchClosed`.
    pub fn close(&self) {
        self.0.closed.set(true);
        let all = std::mem::take(&mut *self.0.waiters.borrow_mut());
        for (_, w) in all {
            w.wake();
        }
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.0.closed.get()
    }

    /// Waits until the value is at least `target`, the watch closes, or
    /// `timer` resolves, whichever comes first (a long poll). Returns true
    /// when the target was reached.
    pub async fn wait_for_within(&self, target: u64, timer: impl Future<Output = ()>) -> bool {
        if self.get() >= target {
            return true;
        }
        let reached = async { self.wait_for(target).await.is_ok() };
        let timer = async {
            timer.await;
            false
        };
        futures_lite::future::or(reached, timer).await
    }

    /// Resolves once the value is at least `target`.
    pub fn wait_for(&self, target: u64) -> WaitFor {
        WaitFor {
            watch: self.clone(),
            target,
            id: None,
        }
    }

    /// Waiters currently registered (for tests and stats).
    pub fn waiter_count(&self) -> usize {
        self.0.waiters.borrow().len()
    }
}

/// Future of [`Watch::wait_for`].
pub struct WaitFor {
    watch: Watch,
    target: u64,
    id: Option<u64>,
}

impl Future for WaitFor {
    type Output = Result<(), WatchClosed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &self.watch.0;
        if inner.value.get() >= self.target {
            return Poll::Ready(Ok(()));
        }
        if inner.closed.get() {
            return Poll::Ready(Err(WatchClosed));
        }
        let id = match self.id {
            Some(id) => id,
            None => {
                let id = inner.next_id.get();
                inner.next_id.set(id + 1);
                id
            }
        };
        inner
            .waiters
            .borrow_mut()
            .insert((self.target, id), cx.waker().clone());
        self.id = Some(id);
        Poll::Pending
    }
}

impl Drop for WaitFor {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.watch.0.waiters.borrow_mut().remove(&(self.target, id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;

    #[test]
    fn waiters_wake_in_order_of_targets_and_clean_up() {
        let w = Watch::new(0);
        let mut a = Box::pin(w.wait_for(5));
        let mut b = Box::pin(w.wait_for(10));
        assert!(future::block_on(future::poll_once(&mut a)).is_none());
        assert!(future::block_on(future::poll_once(&mut b)).is_none());
        assert_eq!(w.waiter_count(), 2);
        w.advance(7);
        assert_eq!(future::block_on(future::poll_once(&mut a)), Some(Ok(())));
        assert!(future::block_on(future::poll_once(&mut b)).is_none());
        drop(b);
        assert_eq!(w.waiter_count(), 0, "dropped waiter left its waker");
        w.advance(3);
        assert_eq!(w.get(), 7, "a watch never goes back");
        let c = w.wait_for(100);
        w.close();
        assert_eq!(future::block_on(c), Err(WatchClosed));
    }
}
