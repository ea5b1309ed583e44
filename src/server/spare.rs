//! A future kept in a block of memory that goes back to its thread's spares when the future
//! is done, for the next request's future of the same size (issue 18).
//!
//! The straight line's future is several KB, and its size class puts only a few blocks on an
//! allocator page: the page emptied between requests, the allocator handed it back to the
//! system at once (its purge delay is 0, for the memory target: `allocator::tune`), and the
//! next request's future faulted it in again. That was 0.5 to 0.8 page faults per request,
//! about 2 µs of system time (`perf record -e page-faults`, docs/performance.md step 13).
//! A block kept here never leaves the allocator's page, so the page stays.

use std::alloc::Layout;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// How many blocks a thread keeps (a thread serves at most this many such requests at once
/// without allocating).
const SPARE_BLOCKS_MAX: usize = 64;

/// A thread's spare blocks, given back to the allocator when the thread ends.
struct Spares(Vec<(Layout, NonNull<u8>)>);

impl Drop for Spares {
    fn drop(&mut self) {
        for (layout, block) in self.0.drain(..) {
            // SAFETY: each block was allocated with its layout and is no longer used.
            unsafe { std::alloc::dealloc(block.as_ptr(), layout) };
        }
    }
}

thread_local! {
    static SPARES: RefCell<Spares> = const { RefCell::new(Spares(Vec::new())) };
}

/// A future in a block of its own (as in a `Box`), whose block is kept for the next one.
pub struct Recycled<F> {
    ptr: NonNull<F>,
}

// SAFETY: `Recycled` owns its `F` as a `Box<F>` does; sending it sends the `F`.
unsafe impl<F: Send> Send for Recycled<F> {}

impl<F> Recycled<F> {
    /// `fut` moved into a spare block of its size, or a new one (tests; the server builds in
    /// place with `build`).
    #[cfg(test)]
    pub fn new(fut: F) -> Recycled<F> {
        Recycled::build(|| fut)
    }

    /// The future `make` returns, written into a spare block of its size (or a new one). The
    /// block is taken before `make` runs, so the compiler can build a large future directly
    /// in it rather than on the stack and then copy it (an optimisation seen with rustc 1.95,
    /// not a language guarantee: `bench/instructions` shows the copy as `memcpy` when it is
    /// lost; for the straight line's future it is about 550 instructions a request).
    #[inline(always)]
    pub fn build(make: impl FnOnce() -> F) -> Recycled<F> {
        let layout = Layout::new::<F>();
        if layout.size() == 0 {
            // Nothing to keep: a dangling, aligned pointer is a valid place for a ZST.
            let ptr = NonNull::<F>::dangling();
            // SAFETY: writing a zero-sized value through an aligned pointer.
            unsafe { ptr.as_ptr().write(make()) };
            return Recycled { ptr };
        }
        let spare = SPARES
            .try_with(|s| {
                let mut s = s.try_borrow_mut().ok()?;
                let i = s.0.iter().rposition(|(l, _)| *l == layout)?;
                Some(s.0.swap_remove(i).1)
            })
            .ok()
            .flatten();
        let block = spare.unwrap_or_else(|| {
            // SAFETY: the layout's size is not zero.
            let raw = unsafe { std::alloc::alloc(layout) };
            NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        });
        let ptr = block.cast::<F>();
        // If `make` panics the block is lost (not unsafe: it is only leaked).
        // SAFETY: the block has `F`'s layout and holds nothing.
        unsafe { ptr.as_ptr().write(make()) };
        Recycled { ptr }
    }
}

impl<F: Future> Future for Recycled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the `F` never moves: it stays in its block until it is dropped in place.
        unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()) }.poll(cx)
    }
}

impl<F> Drop for Recycled<F> {
    fn drop(&mut self) {
        let layout = Layout::new::<F>();
        // SAFETY: the block holds a live `F`, dropped once, here.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        if layout.size() == 0 {
            return;
        }
        let block = self.ptr.cast::<u8>();
        let kept = SPARES
            .try_with(|s| match s.try_borrow_mut() {
                Ok(mut s) if s.0.len() < SPARE_BLOCKS_MAX => {
                    s.0.push((layout, block));
                    true
                }
                _ => false,
            })
            .unwrap_or(false);
        if !kept {
            // SAFETY: allocated with this layout, and no longer used.
            unsafe { std::alloc::dealloc(block.as_ptr(), layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counted(Arc<AtomicUsize>, [u8; 4096]);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A future's result comes out, it is dropped once, and its block is used again by the
    /// next future of its size.
    #[tokio::test]
    async fn futures_run_drop_once_and_their_blocks_are_used_again() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut seen = None;
        for i in 0..3u8 {
            let held = Counted(drops.clone(), [i; 4096]);
            let fut = Recycled::new(async move {
                tokio::task::yield_now().await;
                held.1[4095]
            });
            let at = fut.ptr.as_ptr() as usize;
            assert_eq!(fut.await, i);
            if let Some(prev) = seen {
                assert_eq!(prev, at, "the block is used again");
            }
            seen = Some(at);
        }
        assert_eq!(drops.load(Ordering::SeqCst), 3);
        // A future dropped before it finishes drops what it holds.
        let held = Counted(drops.clone(), [0; 4096]);
        let fut = Recycled::new(async move {
            std::future::pending::<()>().await;
            drop(held);
        });
        drop(fut);
        assert_eq!(drops.load(Ordering::SeqCst), 4);
        // Zero-sized futures need no block.
        struct Zero;
        impl Future for Zero {
            type Output = u8;
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<u8> {
                Poll::Ready(7)
            }
        }
        assert_eq!(Recycled::new(Zero).await, 7);
    }
}
