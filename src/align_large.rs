//! Every build's global allocator wrapper: on x86_64, blocks of `LARGE` bytes or more start
//! on a cache line.
//!
//! Why: each TLS record's plaintext is copied once by rustls (from its receive buffer, 5 bytes
//! past the record's start, into a fresh `Vec`). With both blocks at whatever 16-byte offset
//! the allocator picked, the destination can sit 1-31 bytes past the source modulo a page,
//! and on AMD Zen CPUs `memcpy` of such a pair is slow: 16x for glibc 2.36's `rep movsb`, 2x
//! for musl's `rep movsq` (BENCHMARKS.md, "memcpy distances"). Which pair a process got
//! depended on its heap layout, so a run either paid ~30% of its CPU in that one copy or
//! nothing. With both blocks on a cache line the distance is 64k - 5 bytes modulo a page:
//! never in that range. Only x86_64: the slow case is its microcoded string copy; ARM's
//! `memcpy` is plain load/store pairs, and the gateways' builds need not pay the costs below.
//!
//! Costs, for blocks of `LARGE` or more only: up to `LINE` bytes and an aligned-allocation
//! call each; std's `System` grows them by allocate + copy + free instead of `realloc` in
//! place, and zeroes them with `memset` instead of `calloc`'s fresh pages (the relay
//! allocates neither in steady state).

use std::alloc::{GlobalAlloc, Layout};

/// Blocks of this size and above are aligned to `LINE` (buffers, not small objects).
pub const LARGE: usize = 4096;
/// A cache line.
pub const LINE: usize = 64;
/// Whether this build aligns large blocks (see the module's doc).
pub const ENABLED: bool = cfg!(target_arch = "x86_64");

/// Rule (large blocks on a cache line): the layout `A` is asked for: on x86_64, `LARGE`
/// bytes or more aligned to at least `LINE`; anything else as requested (also a size so
/// close to `isize::MAX` that `LINE` alignment cannot describe it: the allocator refuses it).
pub fn aligned(layout: Layout) -> Layout {
    if ENABLED && layout.size() >= LARGE {
        layout.align_to(LINE).unwrap_or(layout)
    } else {
        layout
    }
}

/// `A`, asked for `aligned(layout)` instead of `layout`.
pub struct AlignLarge<A>(pub A);

// SAFETY: every block is allocated, grown and freed through `A` with `aligned` of its
// current layout, so `A` always sees the layout it allocated the block with.
unsafe impl<A: GlobalAlloc> GlobalAlloc for AlignLarge<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's non-zero layout, with a larger alignment.
        unsafe { self.0.alloc(aligned(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: allocated by `alloc`, `alloc_zeroed` or `realloc` with `aligned(layout)`.
        unsafe { self.0.dealloc(ptr, aligned(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { self.0.alloc_zeroed(aligned(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = aligned(layout);
        // SAFETY: the caller guarantees `new_size` is valid with `layout`'s alignment.
        let new = aligned(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
        if old.align() == new.align() {
            // SAFETY: allocated with `old`; `A` keeps `old`'s alignment, which is `new`'s.
            return unsafe { self.0.realloc(ptr, old, new_size) };
        }
        // Crossing `LARGE`: a block with the new alignment, the contents moved over.
        // SAFETY: a valid non-zero layout; the old block is live for `layout.size()` bytes
        // and freed with the layout it was allocated with.
        unsafe {
            let p = self.0.alloc(new);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.0.dealloc(ptr, old);
            }
            p
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::alloc::System;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// `System`, checking that every block is freed and grown with the layout it was
    /// allocated with (`System` itself ignores the layout on free).
    #[derive(Default)]
    struct Checked(Mutex<HashMap<usize, Layout>>);

    impl Checked {
        fn took(&self, p: *mut u8, layout: Layout) -> *mut u8 {
            self.0.lock().unwrap().insert(p as usize, layout);
            p
        }
        fn gave_back(&self, p: *mut u8, layout: Layout) {
            let had = self.0.lock().unwrap().remove(&(p as usize));
            assert_eq!(
                had,
                Some(layout),
                "block {p:?} handed back with another layout"
            );
        }
        fn live(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    unsafe impl GlobalAlloc for Checked {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            self.took(unsafe { System.alloc(layout) }, layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            self.gave_back(ptr, layout);
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            self.took(unsafe { System.alloc_zeroed(layout) }, layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            self.gave_back(ptr, layout);
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            let new = Layout::from_size_align(new_size, layout.align()).unwrap();
            self.took(p, new)
        }
    }

    #[test]
    fn large_blocks_start_on_a_cache_line() {
        let a = AlignLarge(Checked::default());
        let layout = |n| Layout::from_size_align(n, 1).unwrap();
        assert_eq!(aligned(layout(LARGE - 1)).align(), 1);
        assert_eq!(aligned(layout(LARGE)).align(), LINE);
        // A larger alignment asked for is kept.
        assert_eq!(
            aligned(Layout::from_size_align(LARGE, 4096).unwrap()).align(),
            4096
        );
        // A size that no line-aligned layout can describe is passed on as it is (the
        // allocator then refuses it), not turned into an invalid layout.
        let huge = layout(isize::MAX as usize - 10);
        assert_eq!(aligned(huge), huge);
        unsafe {
            // Many, so that a 16-byte-aligned allocator would miss a line at least once.
            let blocks: Vec<*mut u8> = (0..64).map(|i| a.alloc(layout(LARGE + i * 8))).collect();
            for (i, p) in blocks.iter().enumerate() {
                assert_eq!(*p as usize % LINE, 0, "block {i} is not on a cache line");
                a.dealloc(*p, layout(LARGE + i * 8));
            }
            let z = a.alloc_zeroed(layout(16_384));
            assert_eq!(z as usize % LINE, 0);
            assert!((0..16_384).all(|i| *z.add(i) == 0));
            a.dealloc(z, layout(16_384));
            let page = Layout::from_size_align(LARGE, 4096).unwrap();
            let p = a.alloc(page);
            assert_eq!(p as usize % 4096, 0);
            a.dealloc(p, page);
        }
        assert_eq!(a.0.live(), 0);
    }

    #[test]
    fn growing_across_the_large_size_keeps_contents_and_alignment() {
        let a = AlignLarge(Checked::default());
        let layout = |n| Layout::from_size_align(n, 1).unwrap();
        unsafe {
            let p = a.alloc(layout(100));
            (0..100).for_each(|i| *p.add(i) = i as u8);
            // Small -> large: moved onto a line.
            let q = a.realloc(p, layout(100), 20_000);
            assert_eq!(q as usize % LINE, 0);
            assert!((0..100).all(|i| *q.add(i) == i as u8));
            // Large -> larger: stays on a line.
            let r = a.realloc(q, layout(20_000), 70_000);
            assert_eq!(r as usize % LINE, 0);
            assert!((0..100).all(|i| *r.add(i) == i as u8));
            // Large -> small, then freed with the small layout.
            let s = a.realloc(r, layout(70_000), 50);
            assert!((0..50).all(|i| *s.add(i) == i as u8));
            a.dealloc(s, layout(50));
        }
        assert_eq!(a.0.live(), 0);
    }
}
