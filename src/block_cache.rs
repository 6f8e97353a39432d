//! The static (musl) builds' allocator: the system allocator with a small cache of freed
//! large blocks in front of it.
//!
//! Why: musl's allocator maps every block above ~128 KiB with mmap and unmaps it on free, and
//! returns emptied groups of smaller large blocks too; the relay path frees and allocates a
//! websocket message buffer (64-130 KiB) per message, so every message paid for fresh pages
//! (page faults, zeroing, TLB shootdowns) — most of the static build's extra CPU. Keeping a few
//! freed blocks per size class makes the steady state reuse the same warm memory, as glibc's
//! allocator does on its own. Bounded: at most `SLOTS` blocks per class, 1.9 MiB in all, and
//! given back 1-2 `IDLE_TRIM` periods (2-4 s) after the last cached-size block was taken or
//! freed: an idle gateway does not keep the buffers of its last transfer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::time::Duration;

/// Smallest cached block: below it musl reuses memory well on its own.
const MIN_CLASS: usize = 32 * 1024;
/// Size classes (powers of two from `MIN_CLASS`).
const CLASSES: usize = 4;
/// Largest cached block.
const MAX_CLASS: usize = MIN_CLASS << (CLASSES - 1);
/// Freed blocks kept per class.
const SLOTS: usize = 4;
/// Every block's alignment: a cache line, more than any message buffer asks for.
const BLOCK_ALIGN: usize = 64;
/// How often the cache looks for idleness: blocks go back 1-2 periods after the last use.
pub const IDLE_TRIM: Duration = Duration::from_secs(2);

/// Rule (block classes): the class and its block size for a request, when it is cached:
/// sizes from above half of `MIN_CLASS` up to `MAX_CLASS`, rounded up to a power of two,
/// with an alignment up to `BLOCK_ALIGN`.
pub fn size_class(layout: Layout) -> Option<(usize, usize)> {
    let size = layout.size();
    if size <= MIN_CLASS / 2 || size > MAX_CLASS || layout.align() > BLOCK_ALIGN {
        return None;
    }
    let block = size.next_power_of_two().max(MIN_CLASS);
    let class = (block / MIN_CLASS).trailing_zeros() as usize;
    Some((class, block))
}

/// The allocator: `System` plus `SLOTS` freed blocks per class.
pub struct BlockCache {
    /// Taken by whoever touches the slots; contention falls through to `System` (never spins).
    busy: AtomicBool,
    slots: [[AtomicPtr<u8>; SLOTS]; CLASSES],
    /// Cached-size blocks taken or freed so far (wrapping), and that count at the last trim check.
    uses: AtomicUsize,
    uses_seen: AtomicUsize,
}

impl BlockCache {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const EMPTY: AtomicPtr<u8> = AtomicPtr::new(null_mut());
        #[allow(clippy::declare_interior_mutable_const)]
        const ROW: [AtomicPtr<u8>; SLOTS] = [EMPTY; SLOTS];
        BlockCache {
            busy: AtomicBool::new(false),
            slots: [ROW; CLASSES],
            uses: AtomicUsize::new(0),
            uses_seen: AtomicUsize::new(0),
        }
    }

    /// Runs `f` with `busy` held (blocks freed on other threads are then visible); `None`
    /// when another thread holds it.
    fn locked<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        if self.busy.swap(true, Ordering::Acquire) {
            return None;
        }
        let r = f();
        self.busy.store(false, Ordering::Release);
        Some(r)
    }

    fn with_slots<T>(
        &self,
        f: impl FnOnce(&[AtomicPtr<u8>; SLOTS]) -> T,
        class: usize,
    ) -> Option<T> {
        self.locked(|| {
            self.uses.fetch_add(1, Ordering::Relaxed);
            f(&self.slots[class])
        })
    }

    fn take(&self, class: usize) -> *mut u8 {
        self.with_slots(
            |row| {
                row.iter()
                    .map(|s| s.swap(null_mut(), Ordering::Relaxed))
                    .find(|p| !p.is_null())
                    .unwrap_or(null_mut())
            },
            class,
        )
        .unwrap_or(null_mut())
    }

    /// Keeps `ptr` if a slot is free; false when the caller must free it.
    fn keep(&self, class: usize, ptr: *mut u8) -> bool {
        self.with_slots(
            |row| {
                row.iter().any(|s| {
                    s.compare_exchange(null_mut(), ptr, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                })
            },
            class,
        )
        .unwrap_or(false)
    }

    /// Rule (idle trim): every cached block goes back to the system allocator when no
    /// cached-size block was taken or freed since the previous call; returns the bytes given
    /// back. Called every `IDLE_TRIM`.
    pub fn trim_if_idle(&self) -> usize {
        let uses = self.uses.load(Ordering::Relaxed);
        if self.uses_seen.swap(uses, Ordering::Relaxed) != uses {
            return 0;
        }
        // Taken out under `busy`, as `take` does; when busy, the cache is in use anyway.
        let taken = self.locked(|| {
            self.slots.each_ref().map(|row| {
                row.each_ref()
                    .map(|s| s.swap(null_mut(), Ordering::Relaxed))
            })
        });
        let mut freed = 0;
        for (class, row) in taken.into_iter().flatten().enumerate() {
            let block = MIN_CLASS << class;
            for p in row.into_iter().filter(|p| !p.is_null()) {
                // SAFETY: a cached block, allocated through `System` with this layout, now
                // out of its slot and so owned here alone.
                unsafe { release(p, block) };
                freed += block;
            }
        }
        freed
    }

    /// Trims the cache every `IDLE_TRIM` (`trim_if_idle`), for the life of the runtime.
    pub async fn trim_when_idle(&'static self) {
        let mut every = tokio::time::interval(IDLE_TRIM);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.trim_if_idle();
        }
    }
}

/// Gives a block back to `System`, zeroed first. Rule (no secret outlives the cache): the
/// blocks the cache owns carry message buffers, among them the MQTT client's (a notify and
/// its token) and the websocket's (the handshake): whatever they held is wiped before the
/// system allocator, which does not wipe, may keep the memory in its free lists.
///
/// # Safety
/// `p` is a block of size `block` from `System` with `block_layout(block)`, owned by the
/// caller alone.
unsafe fn release(p: *mut u8, block: usize) {
    // SAFETY: as the caller guarantees.
    unsafe {
        wipe(p, block);
        System.dealloc(p, block_layout(block));
    }
}

/// Zeroes `len` bytes at `p` (a multiple of 8, 8-aligned), in a way the compiler keeps even
/// right before a free.
///
/// # Safety
/// `p` points to `len` writable bytes.
unsafe fn wipe(p: *mut u8, len: usize) {
    for i in 0..len / 8 {
        // SAFETY: within the `len` bytes the caller gave, 8-aligned.
        unsafe { std::ptr::write_volatile(p.cast::<u64>().add(i), 0) };
    }
}

/// Every cached block is allocated and freed with this layout: any cached request (align
/// <= `BLOCK_ALIGN`) may get any block of its class.
fn block_layout(block: usize) -> Layout {
    // SAFETY: `block` is a non-zero power of two far below isize::MAX; so is `BLOCK_ALIGN`.
    unsafe { Layout::from_size_align_unchecked(block, BLOCK_ALIGN) }
}

// SAFETY: every block of a cached class is allocated and freed through `System` with the
// same (block size, alignment) layout; a cached pointer is handed out to one caller only
// (slots are swapped out under `busy`).
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match size_class(layout) {
            Some((class, block)) => {
                let p = self.take(class);
                if p.is_null() {
                    // SAFETY: a valid, non-zero layout.
                    unsafe { System.alloc(block_layout(block)) }
                } else {
                    p
                }
            }
            // SAFETY: the caller's layout, as given.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match size_class(layout) {
            Some((class, block)) => {
                if !self.keep(class, ptr) {
                    // SAFETY: allocated by `alloc` with this block layout.
                    unsafe { release(ptr, block) }
                }
            }
            // SAFETY: allocated by `System` with this layout.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if size_class(layout).is_none() {
            // SAFETY: the caller's layout, as given.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // A block of the class, cached or fresh, zeroed up to the size asked for (`System`
        // would zero a whole fresh block: `calloc` takes no alignment).
        // SAFETY: a valid, non-zero layout; the block holds at least `size` bytes.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                p.write_bytes(0, layout.size());
            }
            p
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (size_class(layout), size_class(new_layout)) {
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            // Still within its block: nothing moves.
            (Some((_, old)), Some((_, new))) if old == new => ptr,
            _ => {
                // SAFETY: a fresh block for the new layout, the old contents copied, the old
                // block released through the path that allocated it.
                let p = unsafe { self.alloc(new_layout) };
                if !p.is_null() {
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(size: usize) -> Option<(usize, usize)> {
        size_class(Layout::from_size_align(size, 8).unwrap())
    }

    #[test]
    fn block_classes_cover_websocket_message_sizes_only() {
        assert_eq!(class(100), None);
        assert_eq!(class(16 * 1024), None);
        assert_eq!(class(16 * 1024 + 1), Some((0, 32 * 1024)));
        assert_eq!(class(64 * 1024 + 516), Some((2, 128 * 1024)));
        assert_eq!(class(131_076), Some((3, 256 * 1024)));
        assert_eq!(class(256 * 1024), Some((3, 256 * 1024)));
        assert_eq!(class(256 * 1024 + 1), None);
        // Line-aligned requests are cached; more is not.
        assert_eq!(
            size_class(Layout::from_size_align(64 * 1024 + 516, 64).unwrap()),
            Some((2, 128 * 1024))
        );
        assert_eq!(
            size_class(Layout::from_size_align(64 * 1024, 128).unwrap()),
            None
        );
        assert_eq!(
            size_class(Layout::from_size_align(64 * 1024, 4096).unwrap()),
            None
        );
    }

    #[test]
    fn a_block_is_wiped_before_it_goes_back_to_the_system() {
        let mut block = vec![0xa5u64; MIN_CLASS / 8];
        // SAFETY: the vector's own bytes.
        unsafe { wipe(block.as_mut_ptr().cast(), MIN_CLASS) };
        assert!(block.iter().all(|w| *w == 0));
    }

    #[test]
    fn freed_blocks_are_reused_and_the_cache_is_bounded() {
        let cache = BlockCache::new();
        let layout = Layout::from_size_align(70_000, 8).unwrap();
        unsafe {
            let a = cache.alloc(layout);
            a.write_bytes(7, layout.size());
            cache.dealloc(a, layout);
            // The same block comes back, contents as left (not zeroed: no page work).
            let b = cache.alloc(layout);
            assert_eq!(a, b);
            // Growing within the block keeps it; beyond it moves.
            let c = cache.realloc(b, layout, 100_000);
            assert_eq!(c, b);
            // Beyond it, into the next class: moved, contents kept.
            let d = cache.realloc(c, Layout::from_size_align(100_000, 8).unwrap(), 200_000);
            assert_ne!(d, c);
            assert_eq!(*d.add(69_999), 7);
            // Out of the cached range and back.
            let huge = cache.realloc(d, Layout::from_size_align(200_000, 8).unwrap(), 1 << 20);
            assert_eq!(*huge.add(69_999), 7);
            let e = cache.realloc(huge, Layout::from_size_align(1 << 20, 8).unwrap(), 50_000);
            assert_eq!(*e.add(49_999), 7);
            cache.dealloc(e, Layout::from_size_align(50_000, 8).unwrap());
            // Zeroed even when the block comes from the cache; any alignment up to a line.
            let z = cache.alloc_zeroed(Layout::from_size_align(50_000, 64).unwrap());
            assert_eq!(z as usize % 64, 0);
            assert!((0..50_000).all(|i| *z.add(i) == 0));
            cache.dealloc(z, Layout::from_size_align(50_000, 64).unwrap());
            let big = Layout::from_size_align(100_000, 8).unwrap();
            let blocks: Vec<*mut u8> = (0..SLOTS + 2).map(|_| cache.alloc(big)).collect();
            for p in &blocks {
                cache.dealloc(*p, big);
            }
            let kept = cache.slots[2]
                .iter()
                .filter(|s| !s.load(Ordering::Relaxed).is_null())
                .count();
            assert_eq!(kept, SLOTS);
            // Give every cached block back.
            cache.trim_if_idle();
            cache.trim_if_idle();
        }
    }

    #[test]
    fn a_freed_block_is_reused_for_the_next_request_of_its_class() {
        let a = BlockCache::new();
        let layout = Layout::from_size_align(70_000, 1).unwrap();
        unsafe {
            let p = a.alloc(layout);
            assert_eq!(p as usize % BLOCK_ALIGN, 0);
            a.dealloc(p, layout);
            assert_eq!(a.alloc(Layout::from_size_align(90_000, 8).unwrap()), p);
            a.dealloc(p, layout);
            a.trim_if_idle();
            a.trim_if_idle();
        }
    }

    fn cached_bytes(cache: &BlockCache) -> usize {
        (0..CLASSES)
            .map(|class| {
                let n = cache.slots[class]
                    .iter()
                    .filter(|s| !s.load(Ordering::Relaxed).is_null())
                    .count();
                n * (MIN_CLASS << class)
            })
            .sum()
    }

    #[test]
    fn idle_trim_gives_cached_blocks_back_only_after_a_period_without_use() {
        let cache = BlockCache::new();
        let layout = Layout::from_size_align(100_000, 8).unwrap();
        let small = Layout::from_size_align(1000, 8).unwrap();
        unsafe {
            let a = cache.alloc(layout);
            let b = cache.alloc(layout);
            cache.dealloc(a, layout);
            cache.dealloc(b, layout);
            assert_eq!(cached_bytes(&cache), 2 * 128 * 1024);
            // Used since the last check (there was none): kept.
            assert_eq!(cache.trim_if_idle(), 0);
            // Used again during the next period: kept.
            let c = cache.alloc(layout);
            cache.dealloc(c, layout);
            assert_eq!(cache.trim_if_idle(), 0);
            assert_eq!(cached_bytes(&cache), 2 * 128 * 1024);
            // Small blocks are not the cache's traffic: a period with only those is idle.
            let s = cache.alloc(small);
            cache.dealloc(s, small);
            assert_eq!(cache.trim_if_idle(), 2 * 128 * 1024);
            assert_eq!(cached_bytes(&cache), 0);
            // Nothing left to give back; the cache fills again on use.
            assert_eq!(cache.trim_if_idle(), 0);
            let d = cache.alloc(layout);
            cache.dealloc(d, layout);
            assert_eq!(cached_bytes(&cache), 128 * 1024);
            assert_eq!(cache.trim_if_idle(), 0);
            assert_eq!(cache.trim_if_idle(), 128 * 1024);
        }
    }
}
