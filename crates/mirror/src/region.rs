//! Region arithmetic and an in-memory bit set for dirty bitmaps. Pure.
//!
//! A volume is divided into fixed-size regions (a power of two, at least
//! 4 KiB); one bit per region records "this region may differ from the
//! partner". The last region may be shorter than the others.

use std::ops::Range;

/// Smallest allowed region size.
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest allowed region size.
pub const MAX_REGION_SIZE: u64 = 1 << 30;

/// Errors in region geometry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    /// The region size is not a power of two in the allowed range.
    #[error("region size {0} must be a power of two between 4096 and 1073741824 bytes")]
    BadRegionSize(u64),
}

/// Checks a region size.
pub fn check_region_size(region_size: u64) -> Result<(), RegionError> {
    if region_size.is_power_of_two() && (MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size) {
        Ok(())
    } else {
        Err(RegionError::BadRegionSize(region_size))
    }
}

/// Number of regions covering a volume.
pub fn region_count(volume_size: u64, region_size: u64) -> u64 {
    volume_size.div_ceil(region_size)
}

/// Indices of the regions touched by the byte range `[offset, offset+len)`.
/// Empty for `len == 0`. The caller has checked the range lies inside the
/// volume.
pub fn regions_for(offset: u64, len: u64, region_size: u64) -> Range<u64> {
    if len == 0 {
        return 0..0;
    }
    let first = offset / region_size;
    let last = (offset + len - 1) / region_size;
    first..last + 1
}

/// Byte span `(offset, len)` of region `idx`, clipped to the volume.
pub fn region_span(idx: u64, region_size: u64, volume_size: u64) -> (u64, u64) {
    let start = idx.saturating_mul(region_size).min(volume_size);
    let end = start.saturating_add(region_size).min(volume_size);
    (start, end - start)
}

/// `[offset, offset+len)` cut into consecutive `(offset, len)` pieces of at
/// most `max` bytes (`max` > 0), for ranges larger than one message may
/// carry.
pub fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let max = max.max(1);
    (offset..end)
        .step_by(usize::try_from(max).unwrap_or(usize::MAX))
        .map(move |at| (at, (end - at).min(max)))
}

/// True when `[offset, offset+len)` lies inside a volume of `size` bytes.
pub fn in_bounds(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// A fixed-size bit set, serialised least significant bit first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bits {
    len: u64,
    words: Vec<u64>,
}

impl Bits {
    /// An all-clear set of `len` bits.
    pub fn new(len: u64) -> Self {
        Bits {
            len,
            words: vec![0; len.div_ceil(64) as usize],
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the set has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Value of bit `i` (false when out of range).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns true if it was clear before.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        !was
    }

    /// Clears bit `i`; returns true if it was set before.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w &= !(1 << (i % 64));
        was
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        for i in 0..self.len {
            self.set(i);
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Adds every bit set in `other` (bits beyond `self.len()` are ignored).
    pub fn union_with(&mut self, other: &Bits) {
        for i in other.iter_set() {
            self.set(i);
        }
    }

    /// Indices of set bits, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let wi = (i / 64) as usize;
            let w = self.words[wi] >> (i % 64);
            if w != 0 {
                let found = i + w.trailing_zeros() as u64;
                return (found < self.len).then_some(found);
            }
            i = (wi as u64 + 1) * 64;
        }
        None
    }

    /// Byte `i` of the serialised form.
    pub fn byte(&self, i: u64) -> u8 {
        let w = self.words[(i / 8) as usize];
        (w >> ((i % 8) * 8)) as u8
    }

    /// Serialised length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.len.div_ceil(8)
    }

    /// Serialises to bytes (bit i is bit i%8 of byte i/8).
    pub fn to_bytes(&self) -> Vec<u8> {
        (0..self.byte_len()).map(|i| self.byte(i)).collect()
    }

    /// Deserialises `len` bits; missing bytes read as clear, bits beyond
    /// `len` are ignored.
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Self {
        let mut b = Bits::new(len);
        for (i, byte) in bytes.iter().enumerate().take(b.byte_len() as usize) {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    b.set(i as u64 * 8 + bit);
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_in_order() {
        type Case = (u64, u64, u64, &'static [(u64, u64)]);
        let cases: &[Case] = &[
            (0, 10, 4, &[(0, 4), (4, 4), (8, 2)]),
            (100, 8, 4, &[(100, 4), (104, 4)]),
            (5, 3, 8, &[(5, 3)]),
            (7, 0, 4, &[]),
        ];
        for &(off, len, max, want) in cases {
            assert_eq!(
                pieces(off, len, max).collect::<Vec<_>>(),
                want,
                "{off}+{len} by {max}"
            );
        }
    }

    #[test]
    fn regions_for_table() {
        const R: u64 = 65536;
        let table = [
            (0, 0, 0..0),
            (0, 1, 0..1),
            (0, R, 0..1),
            (0, R + 1, 0..2),
            (R - 1, 2, 0..2),
            (R, R, 1..2),
            (3 * R + 5, 10 * R, 3..14),
        ];
        for (off, len, expected) in table {
            assert_eq!(regions_for(off, len, R), expected, "{off}+{len}");
        }
    }

    #[test]
    fn spans_and_counts() {
        assert_eq!(region_count(0, 4096), 0);
        assert_eq!(region_count(1, 4096), 1);
        assert_eq!(region_count(8192, 4096), 2);
        assert_eq!(region_count(8193, 4096), 3);
        assert_eq!(region_span(2, 4096, 8193), (8192, 1));
        assert_eq!(region_span(0, 4096, 8193), (0, 4096));
        assert_eq!(region_span(9, 4096, 8193), (8193, 0));
    }

    #[test]
    fn bounds_table() {
        let table = [
            (0, 0, 100, true),
            (0, 100, 100, true),
            (1, 100, 100, false),
            (100, 0, 100, true),
            (101, 0, 100, false),
            (u64::MAX, 2, 100, false),
            (u64::MAX - 1, 1, u64::MAX, true),
        ];
        for (off, len, size, expected) in table {
            assert_eq!(in_bounds(off, len, size), expected, "{off}+{len} in {size}");
        }
    }

    #[test]
    fn region_size_checks() {
        for ok in [4096, 65536, 1 << 20, 1 << 30] {
            assert!(check_region_size(ok).is_ok(), "{ok}");
        }
        for bad in [0, 512, 4097, 3 << 20, 1 << 31] {
            assert!(check_region_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bits_roundtrip_and_iter() {
        let mut b = Bits::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        b.set(63);
        b.set(64);
        b.set(129);
        assert!(!b.set(130), "out of range is ignored");
        assert_eq!(b.count(), 4);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert_eq!(b.next_set(1), Some(63));
        assert_eq!(b.next_set(65), Some(129));
        assert_eq!(b.next_set(130), None);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 17);
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[7], 0x80);
        assert_eq!(bytes[8], 1);
        assert_eq!(Bits::from_bytes(130, &bytes), b);
        assert!(b.clear(63));
        assert!(!b.clear(63));
        let mut u = Bits::new(130);
        u.set(5);
        u.union_with(&b);
        assert_eq!(u.iter_set().collect::<Vec<_>>(), vec![0, 5, 64, 129]);
    }
}
