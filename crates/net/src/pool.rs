//! A pool of byte buffers, so that request and reply payloads do not fault in fresh memory (and
//! zero it) for every frame.

use std::sync::Mutex;

/// Reusable `Vec<u8>`s. A buffer keeps its length when returned, so taking one of at most that
/// length costs neither an allocation nor a memset (only growth is zero-filled).
#[derive(Debug)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufPool {
    /// A pool that keeps at most `keep` idle buffers.
    #[must_use]
    pub fn new(keep: usize) -> Self {
        Self { free: Mutex::new(Vec::new()), keep }
    }

    /// A buffer of exactly `len` bytes with unspecified contents.
    #[must_use]
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut v = self.free.lock().expect("buffer pool lock").pop().unwrap_or_default();
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0);
        }
        v
    }

    /// Returns a buffer for reuse.
    pub fn put(&self, v: Vec<u8>) {
        if v.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().expect("buffer pool lock");
        if free.len() < self.keep {
            free.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_at_the_requested_length() {
        let pool = BufPool::new(2);
        let mut a = pool.take(100);
        a.fill(7);
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.take(50);
        assert_eq!((b.len(), b.as_ptr()), (50, ptr));
        pool.put(b);
        let c = pool.take(80);
        assert_eq!(c.len(), 80);
        assert!(c[50..].iter().all(|&x| x == 0), "growing zero-extends");
    }
}
