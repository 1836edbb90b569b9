//! Reusable payload buffers.
//!
//! Write payloads (NBD requests, replication frames, streamed chunks) are
//! large and short-lived. Allocating each one costs more than it seems:
//! the allocator zeroes it, or — once its size is above the allocator's
//! mmap threshold, which moves with the sizes seen so far — maps fresh
//! pages that fault in one by one and unmaps them again. The pool keeps
//! freed buffers of power-of-two sizes from 64 KiB to 32 MiB, up to a byte
//! budget for the process, and hands them out again without touching
//! their contents.

use std::sync::Mutex;

/// Smallest pooled size: 64 KiB (smaller buffers come from the allocator).
const MIN_SHIFT: u32 = 16;
/// Largest pooled size: 32 MiB (the largest NBD payload).
const MAX_SHIFT: u32 = 25;
/// Most bytes kept in the pool.
const BUDGET: usize = 64 << 20;

struct Pool {
    /// Free buffers by size class (`MIN_SHIFT..=MAX_SHIFT`); each has
    /// `len() == capacity() == 1 << shift`.
    classes: [Vec<Vec<u8>>; (MAX_SHIFT - MIN_SHIFT + 1) as usize],
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    classes: [const { Vec::new() }; (MAX_SHIFT - MIN_SHIFT + 1) as usize],
    bytes: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The size class of a buffer for `len` bytes, if pooled.
fn class_of(len: usize) -> Option<u32> {
    let shift = len.max(1 << MIN_SHIFT).next_power_of_two().trailing_zeros();
    (shift <= MAX_SHIFT).then_some(shift)
}

/// A buffer of `len` bytes. Its contents are unspecified (zeroes or old
/// data): the caller overwrites all of it.
pub fn get(len: usize) -> Vec<u8> {
    let Some(shift) = class_of(len).filter(|_| len >= 1 << MIN_SHIFT) else {
        return vec![0u8; len];
    };
    let reused = {
        let mut p = pool();
        let b = p.classes[(shift - MIN_SHIFT) as usize].pop();
        if let Some(b) = &b {
            p.bytes -= b.capacity();
        }
        b
    };
    let mut b = reused.unwrap_or_else(|| vec![0u8; 1 << shift]);
    b.truncate(len);
    b
}

/// Gives a buffer back for reuse (one not from [`get`] is simply dropped
/// unless its capacity is a pooled size).
pub fn put(mut b: Vec<u8>) {
    let cap = b.capacity();
    if !cap.is_power_of_two() || class_of(cap) != Some(cap.trailing_zeros()) {
        return;
    }
    if pool().bytes + cap > BUDGET {
        return;
    }
    // Restore the invariant `len == capacity` (zeroes only the tail).
    b.resize(cap, 0);
    let mut p = pool();
    if p.bytes + cap <= BUDGET {
        p.bytes += cap;
        p.classes[(cap.trailing_zeros() - MIN_SHIFT) as usize].push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_size_class() {
        let mut a = get(300_000);
        assert_eq!(a.len(), 300_000);
        assert_eq!(a.capacity(), 512 << 10);
        a[299_999] = 7;
        let ptr = a.as_ptr();
        put(a);
        let b = get(400_000);
        assert_eq!(b.len(), 400_000);
        // Another test may have taken it meanwhile; if not, it is the same.
        if b.as_ptr() == ptr {
            assert_eq!(b[299_999], 7, "contents are not cleared");
        }
        put(b);
        // Small and oversized buffers are not pooled.
        assert_eq!(get(100).len(), 100);
        put(vec![0u8; 100]);
        put(Vec::with_capacity(64 << 20));
        assert!(pool().bytes <= BUDGET);
    }
}
