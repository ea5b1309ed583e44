//! The fair queue costs nothing when keys are free (issue 16): a request under its caller's
//! limit, whose family has nobody waiting and a free key, passes the queue's gate and gives its
//! slot back without a single heap allocation (counted by this test binary's allocator), and
//! leaves no state behind. Speed is not asserted; allocations are.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;
use std::sync::Arc;

use llm_gatekeeper::auth::Principal;
use llm_gatekeeper::config::Secret;
use llm_gatekeeper::proxy::keys::KeyPool;
use llm_gatekeeper::proxy::queue::{Enter, FairQueue, QueueSettings};
use llm_gatekeeper::users::UserType;

/// Counts the allocations of the current thread while `COUNTING` is set.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations_of(f: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn a_request_on_free_capacity_allocates_nothing_for_the_queue() {
    let pool = KeyPool::new("OPENAI_KEY", &[Secret::new("sk-1")], true).expect("pool");
    let queue = Arc::new(FairQueue::new(QueueSettings::default()));
    let users: Vec<Principal> = (0..4)
        .map(|i| Principal::User {
            token: format!("user-{i}").into(),
            kind: UserType::Normal,
            key: None,
        })
        .chain([Principal::Anonymous, Principal::ProxyKey])
        .collect();
    let ip: IpAddr = [10, 0, 0, 1].into();
    let pass = |p: &Principal| match queue.enter(p, ip, &pool, Some("turbo"), None) {
        Enter::Go(turn) => drop(turn),
        Enter::Wait(_) => panic!("free capacity must not wait"),
    };
    // The counter sees allocations of this thread.
    assert_eq!(allocations_of(|| drop(Vec::<u8>::with_capacity(8))), 1);
    // Warm-up: the callers' map sizes its shards once.
    for p in &users {
        pass(p);
    }
    let n = allocations_of(|| {
        for _ in 0..1000 {
            for p in &users {
                pass(p);
            }
        }
    });
    assert_eq!(n, 0, "allocations on the queue's fast path");
    assert_eq!(queue.queued("turbo"), 0);
}
