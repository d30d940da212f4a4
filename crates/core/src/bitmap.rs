//! A fixed-size bitmap of atomic words, marked concurrently by readers, writers and workers.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per chunk, set and cleared without locks.
///
/// Setting uses `Release` and testing `Acquire`, so a thread that sees a bit set also sees what
/// the setter wrote before setting it (the chunk's data in the local backend).
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

fn split(bit: u64) -> (usize, u64) {
    (usize::try_from(bit / 64).expect("bitmap index fits in usize"), 1u64 << (bit % 64))
}

impl AtomicBitmap {
    /// A bitmap of `len` bits, all clear.
    #[must_use]
    pub fn new(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(64)).expect("bitmap fits in memory");
        Self { words: (0..words).map(|_| AtomicU64::new(0)).collect(), len }
    }

    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the bits take.
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.words)
    }

    #[must_use]
    pub fn get(&self, bit: u64) -> bool {
        let (w, m) = split(bit);
        self.words[w].load(Ordering::Acquire) & m != 0
    }

    /// Sets `bit`; returns whether it was already set.
    pub fn set(&self, bit: u64) -> bool {
        let (w, m) = split(bit);
        self.words[w].fetch_or(m, Ordering::AcqRel) & m != 0
    }

    /// Clears `bit`; returns whether it was set.
    pub fn clear(&self, bit: u64) -> bool {
        let (w, m) = split(bit);
        self.words[w].fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        for bit in (0..self.len).step_by(64) {
            let (w, _) = split(bit);
            let n = (self.len - bit).min(64);
            let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            self.words[w].fetch_or(mask, Ordering::AcqRel);
        }
    }

    /// Number of set bits.
    #[must_use]
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// The first set bit at or after `from`, if any before `end`.
    #[must_use]
    pub fn next_set(&self, from: u64, end: u64) -> Option<u64> {
        self.next_matching(from, end, false)
    }

    /// The first clear bit at or after `from`, if any before `end`.
    #[must_use]
    pub fn next_clear(&self, from: u64, end: u64) -> Option<u64> {
        self.next_matching(from, end, true)
    }

    fn next_matching(&self, from: u64, end: u64, clear: bool) -> Option<u64> {
        let end = end.min(self.len);
        let mut bit = from;
        while bit < end {
            let (w, _) = split(bit);
            let mut word = self.words[w].load(Ordering::Acquire);
            if clear {
                word = !word;
            }
            word &= u64::MAX << (bit % 64);
            if word != 0 {
                let found = (bit & !63) + u64::from(word.trailing_zeros());
                return (found < end).then_some(found);
            }
            bit = (bit & !63) + 64;
        }
        None
    }

    /// Runs of consecutive set bits within `range`, each at most `max_run` long.
    pub fn set_runs(&self, range: Range<u64>, max_run: u64) -> impl Iterator<Item = Range<u64>> + '_ {
        let max_run = max_run.max(1);
        let mut pos = range.start;
        let end = range.end.min(self.len);
        std::iter::from_fn(move || {
            let start = self.next_set(pos, end)?;
            let stop = self.next_clear(start, end).unwrap_or(end).min(start + max_run);
            pos = stop;
            Some(start..stop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_get() {
        let b = AtomicBitmap::new(130);
        assert!(!b.set(129));
        assert!(b.set(129));
        assert!(b.get(129));
        assert!(b.clear(129));
        assert!(!b.get(129));
        assert_eq!(b.count_ones(), 0);
    }

    #[test]
    fn set_all_stops_at_len() {
        let b = AtomicBitmap::new(70);
        b.set_all();
        assert_eq!(b.count_ones(), 70);
        assert_eq!(b.next_clear(0, 70), None);
    }

    #[test]
    fn runs_are_split_at_gaps_and_max_len() {
        let b = AtomicBitmap::new(200);
        for i in (3..10).chain(63..70).chain(150..200) {
            b.set(i);
        }
        let runs: Vec<_> = b.set_runs(0..200, 20).collect();
        assert_eq!(runs, vec![3..10, 63..70, 150..170, 170..190, 190..200]);
        let runs: Vec<_> = b.set_runs(5..160, 100).collect();
        assert_eq!(runs, vec![5..10, 63..70, 150..160]);
    }

    #[test]
    fn next_set_and_clear_cross_words() {
        let b = AtomicBitmap::new(300);
        b.set(250);
        assert_eq!(b.next_set(0, 300), Some(250));
        assert_eq!(b.next_set(251, 300), None);
        assert_eq!(b.next_set(0, 250), None);
        assert_eq!(b.next_clear(250, 300), Some(251));
    }
}
