//! The accept loop's stop, as its connections watch it: one atomic load each time a connection
//! task is polled, and its waker registered once. Ours rather than a `CancellationToken` per
//! connection because that token's future takes its waiter list's lock and compares wakers at
//! every poll, and a connection task is polled several times per request: about 420
//! instructions per proxied request (callgrind, issue 18).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use slab::Slab;

/// Set once, when the accept loop stops; wakes every connection watching it.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    watchers: Mutex<Slab<Waker>>,
}

impl StopSignal {
    fn watchers(&self) -> MutexGuard<'_, Slab<Waker>> {
        // Every change under this lock is one slab call: a poisoned lock is used as it is.
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops: every watch, now and later, reports it.
    pub fn trigger(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = self.watchers().iter().map(|(_, w)| w.clone()).collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn watch(self: &Arc<Self>) -> Watch {
        Watch {
            signal: self.clone(),
            slot: None,
        }
    }
}

/// One connection's view of a [`StopSignal`].
#[derive(Debug)]
pub struct Watch {
    signal: Arc<StopSignal>,
    /// The slot holding our waker, and a copy to compare the next poll's waker with.
    slot: Option<(usize, Waker)>,
}

impl Watch {
    /// Whether the signal has been triggered.
    pub fn stopped(&self) -> bool {
        self.signal.stopped.load(Ordering::Acquire)
    }

    /// Ready once the signal is triggered; otherwise makes sure `cx`'s waker is woken then.
    pub fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        match &self.slot {
            Some((_, w)) if w.will_wake(cx.waker()) => return Poll::Pending,
            Some((key, _)) => {
                let key = *key;
                if let Some(w) = self.signal.watchers().get_mut(key) {
                    *w = cx.waker().clone();
                }
                self.slot = Some((key, cx.waker().clone()));
            }
            None => {
                let key = self.signal.watchers().insert(cx.waker().clone());
                self.slot = Some((key, cx.waker().clone()));
            }
        }
        // A trigger between the first look and the registration: its wake-up may have missed
        // the waker just registered, so look again (SeqCst pairs with `trigger`'s store, made
        // before it takes the lock this registration took).
        if self.signal.stopped.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some((key, _)) = self.slot.take() {
            let removed = self.signal.watchers().try_remove(key);
            drop(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_watch_is_woken_once_triggered_and_stays_stopped() {
        let signal = Arc::new(StopSignal::default());
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut watch = signal.watch();
        assert!(watch.poll_stopped(&mut cx).is_pending());
        // Polled again with the same waker: nothing registered twice.
        assert!(watch.poll_stopped(&mut cx).is_pending());
        assert_eq!(signal.watchers().len(), 1);
        signal.trigger();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(watch.poll_stopped(&mut cx).is_ready());
        // A watch made after the trigger is stopped at once.
        assert!(signal.watch().poll_stopped(&mut cx).is_ready());
    }

    #[test]
    fn a_new_waker_replaces_the_old_and_a_dropped_watch_leaves() {
        let signal = Arc::new(StopSignal::default());
        let (a, b) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let mut watch = signal.watch();
        assert!(watch
            .poll_stopped(&mut Context::from_waker(&wa))
            .is_pending());
        assert!(watch
            .poll_stopped(&mut Context::from_waker(&wb))
            .is_pending());
        assert_eq!(signal.watchers().len(), 1);
        let mut other = signal.watch();
        assert!(other
            .poll_stopped(&mut Context::from_waker(&wa))
            .is_pending());
        drop(other);
        assert_eq!(signal.watchers().len(), 1);
        signal.trigger();
        assert_eq!(
            a.0.load(Ordering::SeqCst),
            0,
            "the replaced and the dropped waker are not woken"
        );
        assert_eq!(b.0.load(Ordering::SeqCst), 1);
        drop(watch);
        assert_eq!(signal.watchers().len(), 0);
    }
}
