//! Coarse deadlines for the timeouts every request arms and almost none reaches: the client's
//! header read (`server/head.rs`) and the upstream's answer ([`timeout_at`]). A [`Sleep`] here ends up to [`TICK`] after its deadline, never before.
//! Knows nothing of requests; a bottom module like `net`.
//!
//! Why not tokio's timer (issue 18): a tokio `Sleep` that is created, polled once and dropped
//! goes into the runtime's timer wheel and out again under the time driver's lock, and the
//! driver does work for it at every park. Measured with `bench/instructions` (callgrind), the
//! two per-request timers of a proxied request cost about 2 400 instructions, 4.7 % of the
//! request. These deadlines are long (seconds) and a fraction of a second late is harmless, so
//! a sleep here is one slot in a table of its thread (registered when first polled, freed when
//! dropped: a lock nobody else holds and a slab insert or remove), and one sweeper thread
//! wakes the sleeps whose deadline passed, every [`TICK`] while any is registered, and parks
//! while none is. No crate offered this (tokio-util's `DelayQueue` is a second timer wheel
//! behind `&mut`, without wakers per entry); `slab` holds the slots.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

thread_local! {
    /// The clocks read when the connection task being polled on this thread started its poll
    /// ([`freeze`]); `None` outside such a poll.
    static FROZEN: std::cell::Cell<Option<(Instant, std::time::SystemTime)>> = const { std::cell::Cell::new(None) };
}

/// The current time, as [`Instant::now`]; within a connection's poll ([`freeze`]), the time
/// that poll started. A request reads the clock about a dozen times (its latency, the
/// upstream's deadline, the pool's idle times, the header timer, the key's rest, the user's
/// last use, the log and `date` lines); two readings per poll serve them all (a reading costs
/// about 25 ns here, issue 18). A poll lasts microseconds, so what is measured across polls
/// (an upstream's latency, an idle time) is as exact as the millisecond it is reported in.
pub fn now() -> Instant {
    FROZEN
        .with(|f| f.get())
        .map_or_else(Instant::now, |(mono, _)| mono)
}

/// The wall-clock time, as [`std::time::SystemTime::now`]; within a connection's poll, the
/// time that poll started.
pub fn system_now() -> std::time::SystemTime {
    FROZEN
        .with(|f| f.get())
        .map_or_else(std::time::SystemTime::now, |(_, wall)| wall)
}

/// Reads the clocks once for the poll that begins: [`now`] and [`system_now`] return those
/// readings until the returned guard is dropped (at the poll's end), when the previous state
/// comes back.
pub fn freeze() -> Frozen {
    let readings = (Instant::now(), std::time::SystemTime::now());
    Frozen(FROZEN.with(|f| f.replace(Some(readings))))
}

/// See [`freeze`].
#[must_use]
pub struct Frozen(Option<(Instant, std::time::SystemTime)>);

impl Drop for Frozen {
    fn drop(&mut self) {
        let previous = self.0;
        FROZEN.with(|f| f.set(previous));
    }
}

/// How late a [`Sleep`] may end: the sweeper's period while sleeps are registered.
pub const TICK: Duration = Duration::from_millis(100);

/// A deadline that resolves at most [`TICK`] after `deadline` (and never before it), once
/// polled. Dropping it before then cancels it.
#[derive(Debug)]
pub struct Sleep {
    deadline: Instant,
    /// The table and slot this sleep is registered in (from its first poll on).
    slot: Option<(Arc<Table>, usize)>,
    /// The deadline in the slot, which fires it: at most `deadline` (a later `deadline` is
    /// armed when this one fires, so that moving the deadline later, as the header timer does
    /// for every request, takes no lock; issue 18).
    armed: Instant,
    /// The waker the slot holds, as `Waker::will_wake` compares it (its data and vtable): a
    /// poll from the same task with the slot not yet due looks at nothing shared.
    woken: Option<(usize, usize)>,
}

/// One thread's registered sleeps. Sleeps register in the table of the thread that first
/// polls them, so the lock is normally taken by that thread only (and by the sweeper at each
/// tick); a sleep moved to another thread keeps its slot there.
#[derive(Debug, Default)]
struct Table {
    slots: Mutex<Slab<Slot>>,
}

#[derive(Debug)]
struct Slot {
    deadline: Instant,
    /// Taken when the sweeper fires the slot.
    waker: Option<Waker>,
    fired: bool,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, Slab<Slot>> {
        // A panic while holding this lock leaves the slab consistent (every change is one
        // slab call), so a poisoned lock is used as it is.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

thread_local! {
    static TABLE: Arc<Table> = {
        let table = Arc::new(Table::default());
        sweeper().tables.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&table));
        table
    };
}

impl Sleep {
    pub fn until(deadline: Instant) -> Sleep {
        Sleep {
            deadline,
            slot: None,
            armed: deadline,
            woken: None,
        }
    }

    /// Moves the deadline (later or earlier); a sleep that had already ended waits again.
    /// Later is noted here only: the slot fires at the deadline it has, and the poll that sees
    /// it fired arms the new one.
    pub fn reset(&mut self, deadline: Instant) {
        self.deadline = deadline;
        if deadline >= self.armed {
            return;
        }
        self.armed = deadline;
        if let Some((table, key)) = &self.slot {
            if let Some(slot) = table.lock().get_mut(*key) {
                slot.deadline = deadline;
                slot.fired = false;
            }
            // The slot may have fired and given its waker away: the next poll looks.
            self.woken = None;
            // The sweeper may have parked since (nothing else waiting): it must look again.
            sweeper().registered();
        }
    }
}

/// What `Waker::will_wake` compares, as addresses (compared, never followed).
fn identity(w: &Waker) -> (usize, usize) {
    (w.data() as usize, std::ptr::from_ref(w.vtable()) as usize)
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match &this.slot {
            None => {
                let table = TABLE.with(Arc::clone);
                let key = table.lock().insert(Slot {
                    deadline: this.deadline,
                    waker: Some(cx.waker().clone()),
                    fired: false,
                });
                this.slot = Some((table, key));
                this.armed = this.deadline;
                this.woken = Some(identity(cx.waker()));
                sweeper().registered();
                Poll::Pending
            }
            Some((table, key)) => {
                // Not due yet, and the slot wakes this task: nothing to look at. (The sweeper
                // may fire it meanwhile; its wake-up brings another poll, which looks.) The
                // clock itself, not the poll's frozen reading: a slot that fired before this
                // look is seen as due, so its waker, which the sweeper took (and which kept the
                // task it wakes, and so the identity compared, from being reused until then),
                // is never taken for this task's.
                if Instant::now() < this.armed && this.woken == Some(identity(cx.waker())) {
                    return Poll::Pending;
                }
                let mut slots = table.lock();
                let Some(slot) = slots.get_mut(*key) else {
                    return Poll::Ready(());
                };
                if slot.fired {
                    if this.deadline <= this.armed || Instant::now() >= this.deadline {
                        return Poll::Ready(());
                    }
                    // The deadline moved later after the slot was armed: arm it now.
                    slot.deadline = this.deadline;
                    slot.fired = false;
                    slot.waker = Some(cx.waker().clone());
                    this.armed = this.deadline;
                    this.woken = Some(identity(cx.waker()));
                    drop(slots);
                    sweeper().registered();
                    return Poll::Pending;
                }
                match &slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                this.woken = Some(identity(cx.waker()));
                Poll::Pending
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((table, key)) = self.slot.take() {
            let removed = table.lock().try_remove(key);
            // The waker (a task reference) is dropped outside the lock.
            drop(removed);
        }
    }
}

/// The sweeper thread and the tables it sweeps.
struct Sweeper {
    tables: Mutex<Vec<Weak<Table>>>,
    /// Set by the sweeper before it parks (no sleep registered anywhere); a registration that
    /// sees it set unparks the sweeper.
    idle: AtomicBool,
    thread: OnceLock<Option<std::thread::Thread>>,
}

fn sweeper() -> &'static Sweeper {
    static SWEEPER: Sweeper = Sweeper {
        tables: Mutex::new(Vec::new()),
        idle: AtomicBool::new(false),
        thread: OnceLock::new(),
    };
    &SWEEPER
}

impl Sweeper {
    /// Called after every registration: starts the thread the first time, wakes it when it
    /// parked with nothing to do.
    fn registered(&'static self) {
        let thread = self.thread.get_or_init(|| self.spawn());
        // SeqCst pairs with the sweeper's: either it sees the slot just inserted when it looks
        // again after setting `idle`, or this load sees `idle` set.
        if self.idle.load(Ordering::SeqCst) && self.idle.swap(false, Ordering::SeqCst) {
            if let Some(t) = thread {
                t.unpark();
            }
        }
    }

    fn spawn(&'static self) -> Option<std::thread::Thread> {
        match std::thread::Builder::new()
            .name("gk-timer".into())
            .spawn(move || self.run())
        {
            Ok(handle) => Some(handle.thread().clone()),
            Err(e) => {
                // Without it no coarse deadline ever ends: requests still end when their
                // peers do, but the header and upstream timeouts are off.
                tracing::error!(error = %e, "cannot start the timer thread; client header and upstream timeouts will not fire");
                None
            }
        }
    }

    fn run(&'static self) {
        let mut due: Vec<Waker> = Vec::new();
        loop {
            if self.fire_due(&mut due) {
                std::thread::sleep(TICK);
                continue;
            }
            self.idle.store(true, Ordering::SeqCst);
            if self.fire_due(&mut due) {
                self.idle.store(false, Ordering::SeqCst);
                continue;
            }
            // Unparked by the next registration (or spuriously, which only costs a sweep).
            std::thread::park();
            self.idle.store(false, Ordering::SeqCst);
        }
    }

    /// One look: fires and wakes the sleeps now due (every look wakes what it fired, whether or
    /// not anything still waits); true when any sleep is still waiting.
    fn fire_due(&self, due: &mut Vec<Waker>) -> bool {
        let any = self.sweep(Instant::now(), due);
        for w in due.drain(..) {
            w.wake();
        }
        any
    }

    /// Fires the sleeps whose deadline is `now` or earlier (their wakers go into `due`, woken
    /// outside every lock); true when any sleep is still waiting.
    fn sweep(&self, now: Instant, due: &mut Vec<Waker>) -> bool {
        let tables: Vec<Arc<Table>> = {
            let mut list = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|t| t.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        let mut waiting = false;
        for table in tables {
            let mut slots = table.lock();
            for (_, slot) in slots.iter_mut() {
                if slot.fired {
                    continue;
                }
                if slot.deadline <= now {
                    slot.fired = true;
                    due.extend(slot.waker.take());
                } else {
                    waiting = true;
                }
            }
        }
        waiting
    }
}

/// The error of a [`timeout_at`] whose deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// `fut`'s output, or [`Elapsed`] when `deadline` passes first (up to [`TICK`] late). `fut`
/// is polled first, so an answer that is there wins over a deadline that passed meanwhile.
pub fn timeout_at<F: Future>(deadline: Instant, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        sleep: Sleep::until(deadline),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`timeout_at`]. A struct rather than an `async fn`: an `async fn` keeps
    /// the future it is given twice (as its argument and as its pinned local), which made the
    /// upstream call's future 1 792 bytes around the pool's 856, copied whole with every
    /// future that holds it (issue 18).
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        sleep: Sleep,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match Pin::new(this.sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_a_frozen_poll_the_clock_reads_once() {
        let outside = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > outside, "outside a poll, the clock itself");
        let frozen = freeze();
        let (a, wall) = (now(), system_now());
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(now(), a);
        assert_eq!(system_now(), wall);
        {
            // A poll inside a poll (a task polled from within another) reads anew, and the
            // outer reading comes back after it.
            let _inner = freeze();
            assert!(now() > a);
        }
        assert_eq!(now(), a);
        drop(frozen);
        assert!(now() > a, "after the poll, the clock itself again");
    }

    const SLACK: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_sleep_ends_after_its_deadline_and_within_a_tick_or_so() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(150);
        Sleep::until(deadline).await;
        let now = Instant::now();
        assert!(now >= deadline, "ended {:?} early", deadline - now);
        // Late by at most a tick, plus whatever a busy machine adds (generous: never flaky).
        assert!(
            now - deadline < TICK + SLACK,
            "ended {:?} late",
            now - deadline
        );
    }

    #[tokio::test]
    async fn a_past_deadline_ends_too() {
        Sleep::until(Instant::now() - Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn timeout_at_returns_the_answer_or_elapsed() {
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(timeout_at(far, async { 7 }).await, Ok(7));
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(
            timeout_at(soon, std::future::pending::<()>()).await,
            Err(Elapsed)
        );
    }

    #[tokio::test]
    async fn a_dropped_sleep_frees_its_slot() {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut s = Sleep::until(far);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut s).poll(&mut cx).is_pending());
        let (table, key) = s.slot.clone().expect("registered");
        assert!(table.lock().contains(key));
        drop(s);
        assert!(!table.lock().contains(key));
    }

    #[tokio::test]
    async fn reset_moves_the_deadline_both_ways() {
        let mut s = Sleep::until(Instant::now() + Duration::from_secs(3600));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut s).poll(&mut cx).is_pending());
        // Earlier: it now ends soon.
        s.reset(Instant::now() + Duration::from_millis(20));
        (&mut s).await;
        // Later again: it waits again.
        s.reset(Instant::now() + Duration::from_secs(3600));
        assert!(Pin::new(&mut s).poll(&mut cx).is_pending());
    }

    #[test]
    fn a_reset_after_the_sweeper_parked_still_ends() {
        // Its own thread and runtime: no other test's sleep keeps the sweeper awake.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut s = Sleep::until(Instant::now() + Duration::from_millis(10));
                (&mut s).await;
                // Fired; wait until the sweeper has nothing left and parks.
                let parked = Instant::now() + SLACK;
                while !sweeper().idle.load(Ordering::SeqCst) && Instant::now() < parked {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                s.reset(Instant::now() + Duration::from_millis(10));
                // Bounded by tokio's own timer: a lost wake-up fails instead of hanging.
                tokio::time::timeout(SLACK, &mut s)
                    .await
                    .expect("a reset sleep ends even when the sweeper had parked");
            });
        })
        .join()
        .expect("the reset sleep ended");
    }

    #[tokio::test]
    async fn many_sleeps_on_several_threads_all_end() {
        let deadline = Instant::now() + Duration::from_millis(100);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("runtime");
                    rt.block_on(async move {
                        let sleeps: Vec<_> = (0..100).map(|_| Sleep::until(deadline)).collect();
                        for s in sleeps {
                            s.await;
                        }
                    });
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert!(Instant::now() >= deadline);
    }

    #[tokio::test]
    async fn a_deadline_moved_later_is_kept_without_the_lock_and_ends_after_it() {
        let start = Instant::now();
        let mut s = Sleep::until(start + Duration::from_millis(30));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut s).poll(&mut cx).is_pending());
        // Later, as the header timer moves it for every request: the slot keeps its first
        // deadline, fires there, and the poll after arms the later one.
        let later = start + Duration::from_millis(200);
        s.reset(later);
        assert_eq!(s.armed, start + Duration::from_millis(30));
        (&mut s).await;
        assert!(Instant::now() >= later, "ended before the moved deadline");
    }

    #[tokio::test]
    async fn a_poll_from_another_task_takes_the_slot_over() {
        let mut s = Sleep::until(Instant::now() + Duration::from_millis(50));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut s).poll(&mut cx).is_pending());
        // Awaited now with this task's waker (not the no-op one it registered with): it is
        // woken at the deadline, not left waiting.
        tokio::time::timeout(SLACK, &mut s)
            .await
            .expect("the sleep woke the task that polled it last");
    }
}
