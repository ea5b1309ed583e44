//! The binary's allocator (issue 18): mimalloc, not glibc's malloc. About 2 900 instructions
//! less per proxied request than glibc (the ~22 allocations of one request, callgrind) and a
//! faster `GET /admin/users`, at the same resident memory: its arenas are committed as they are
//! used (`.cargo/config.toml` sets that default for the C build, since mimalloc reads it before
//! `main` runs) and freed memory goes back to the system at once ([`tune`]). `main.rs` makes
//! [`MiMalloc`] the global allocator; the library itself (tests, embedders) runs on whatever
//! allocator its program has. docs/performance.md, step 6.

use std::alloc::{GlobalAlloc, Layout};

use libmimalloc_sys as mi;

/// The largest alignment every mimalloc block of at least that size has (`MI_MAX_ALIGN_SIZE`).
const MI_MAX_ALIGN_SIZE: usize = 16;

/// mimalloc as Rust's allocator. Written here rather than taken from the `mimalloc` crate,
/// whose allocator asks for every block with `mi_malloc_aligned`: in mimalloc 3 that call
/// takes its generic path (over-allocating by the alignment) for any size that is not a power
/// of two, about 1 000 instructions per request more than `mi_malloc` (callgrind). A block of
/// `size` bytes from `mi_malloc` is aligned to 16 bytes, or to 8 below 16 bytes, which is
/// enough for any layout whose alignment is at most 16 and at most its size.
pub struct MiMalloc;

impl MiMalloc {
    fn plain(layout: Layout) -> bool {
        layout.align() <= MI_MAX_ALIGN_SIZE && layout.align() <= layout.size()
    }
}

// SAFETY: every block comes from mimalloc with at least the layout's size and alignment (see
// `plain`), and goes back to it with `mi_free` or one of its reallocations.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::plain(layout) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::plain(layout) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, layout.align());
        if Self::plain(new) {
            mi::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

/// `mi_option_purge_delay` of mimalloc 3's `mi_option_e` (libmimalloc-sys names only mimalloc 2's).
const MI_OPTION_PURGE_DELAY: mi::mi_option_t = 15;

/// Makes mimalloc hand freed memory back to the system at once: after a bulk import or a
/// listing of 100 000 users, the process returns to its size before (`bench/store-mem`).
pub fn tune() {
    // SAFETY: mi_option_set only sets allocator parameters; no other thread exists yet.
    unsafe {
        // Freed memory goes back to the system at once (mimalloc 3 waits a second), so that a
        // bulk import's temporary memory does not stay resident. (The arenas' commit policy is
        // read before `main` runs: `.cargo/config.toml` sets its default.)
        mi::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout gets a block with its alignment; what a block holds survives a
    /// reallocation to another size, growing and shrinking; zeroed blocks are zero.
    #[test]
    fn blocks_have_their_layouts_alignment_and_keep_their_bytes() {
        let a = MiMalloc;
        let sizes = [
            1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 40, 100, 1000, 1025, 4096, 70_000,
        ];
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for &size in &sizes {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a non-zero size; every block is freed with the layout it has.
                unsafe {
                    for new_size in [size / 2 + 1, size * 3 + 5] {
                        let p = a.alloc(layout);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                        for i in 0..size {
                            p.add(i).write(i as u8);
                        }
                        let q = a.realloc(p, layout, new_size);
                        let at = format!("realloc {size} -> {new_size}, align {align}");
                        assert_eq!(q as usize % align, 0, "{at}");
                        for i in 0..size.min(new_size) {
                            assert_eq!(q.add(i).read(), i as u8, "{at}");
                        }
                        a.dealloc(q, Layout::from_size_align(new_size, align).expect("layout"));
                    }
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| z.add(i).read() == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
