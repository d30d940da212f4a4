//! Byte-granular I/O over a backend that only accepts chunk-aligned I/O.
//!
//! [`Aligned`] lets callers read and write any offset and length over an inner backend that
//! accepts only runs of whole chunks (typically [`Chunked`](super::Chunked) in front of a store of
//! one object per chunk). A request is cut into at most three parts:
//! - the aligned middle, made of whole chunks (the short tail chunk at the end of the backend
//!   counts as whole), goes to the inner backend in **one** call directly on the caller's buffer,
//!   without a copy;
//! - a partial chunk at either edge goes through a scratch buffer of one chunk: a read reads the
//!   whole chunk and copies the wanted bytes out; a write reads the whole chunk, patches the bytes
//!   in and writes the whole chunk back (read-modify-write).
//!
//! `trim` and `write_zeroes` pass their whole-chunk middle to the inner backend's verb and zero
//! partial edges by read-modify-write, so they are offered exactly when the inner backend offers
//! them. `extents` asks the inner backend about the range widened to chunk boundaries and clips
//! the answer to the range asked.
//!
//! # Concurrency
//! Partial writes to different bytes of the same chunk must not lose each other's updates, and a
//! read-modify-write must not write stale bytes back over a concurrent whole-chunk write. So the
//! layer keeps 256 striped locks, indexed by chunk index: a read-modify-write holds its chunk's
//! stripe exclusively; a whole-chunk write, trim or zeroing holds the stripes of the chunks it
//! covers shared (taken in ascending stripe order, so they cannot deadlock), which lets
//! whole-chunk writes run in parallel with each other. Reads take no lock.
//!
//! # What it does not do
//! It does not split the aligned middle into several calls (a per-call limit of the inner backend,
//! such as [`Chunked::with_max_chunks`](super::Chunked::with_max_chunks), applies to it whole), it
//! does not cache chunks, and it does not retry. A request that fails part-way may have changed
//! some of its range, as on a block device.

use std::io;
use std::ops::Range;
use std::sync::{RwLock, RwLockReadGuard};

use crate::backend::{Backend, Extent, check_range, len64};
use crate::geometry::{Chunk, Geometry, to_usize};

/// Number of striped locks guarding read-modify-writes.
const STRIPES: u64 = 256;

/// Any offset and length over an inner backend that accepts only whole-chunk I/O.
///
/// See the [module documentation](self) for how requests are split and locked.
pub struct Aligned<B> {
    inner: B,
    geometry: Geometry,
    stripes: Box<[RwLock<()>]>,
}

/// A request cut at chunk boundaries: `head` and `tail` are partial chunks (possibly empty),
/// `mid` is a run of whole chunks (possibly empty). They are contiguous and in this order.
struct Parts {
    head: Range<u64>,
    mid: Range<u64>,
    tail: Range<u64>,
}

impl<B: Backend> Aligned<B> {
    /// Wraps `inner`, whose chunks are `chunk_size` bytes; the geometry comes from `inner.size()`.
    ///
    /// # Errors
    /// `InvalidInput` when `chunk_size` is zero.
    pub fn new(inner: B, chunk_size: u64) -> io::Result<Self> {
        let geometry = Geometry::new(inner.size(), chunk_size)?;
        Ok(Self { inner, geometry, stripes: (0..STRIPES).map(|_| RwLock::new(())).collect() })
    }

    /// Cuts `off..off + len` (in range, `len > 0`) into partial edges and a whole-chunk middle.
    fn parts(&self, off: u64, len: u64) -> Parts {
        let cs = self.geometry.chunk_size();
        let end = off + len;
        let mid_start = off.checked_next_multiple_of(cs).unwrap_or(end).min(end);
        let mid_end = if end == self.geometry.size() { end } else { (end / cs * cs).max(mid_start) };
        Parts { head: off..mid_start, mid: mid_start..mid_end, tail: mid_end..end }
    }

    fn stripe(&self, chunk: Chunk) -> &RwLock<()> {
        &self.stripes[to_usize(chunk.0 % STRIPES)]
    }

    /// Shared guards on the stripes of every chunk in `range`, taken in ascending stripe order.
    fn shared(&self, range: &Range<u64>) -> Vec<RwLockReadGuard<'_, ()>> {
        let chunks = self.geometry.chunks_touched(range.start, range.end - range.start);
        let n = chunks.end - chunks.start;
        // Stripes are chunk indices modulo STRIPES: a run of chunks is a run of stripes that may
        // wrap around, taken as its low part then its high part.
        let (low, high) = if n >= STRIPES {
            (0..0, 0..STRIPES)
        } else {
            let first = chunks.start % STRIPES;
            if first + n <= STRIPES {
                (0..0, first..first + n)
            } else {
                (0..first + n - STRIPES, first..STRIPES)
            }
        };
        low.chain(high).map(|s| self.stripes[to_usize(s)].read().expect("aligned stripe lock")).collect()
    }

    /// Reads the whole of `chunk` into `scratch` and returns it.
    fn load<'s>(&self, chunk: Chunk, scratch: &'s mut Vec<u8>) -> io::Result<&'s mut [u8]> {
        let len = to_usize(self.geometry.chunk_len(chunk));
        scratch.resize(len, 0);
        let data = &mut scratch[..len];
        self.inner.read_at(data, self.geometry.offset_of(chunk))?;
        Ok(data)
    }

    /// Reads the partial chunk at `off` into `dst` through `scratch`.
    fn read_partial(&self, dst: &mut [u8], off: u64, scratch: &mut Vec<u8>) -> io::Result<()> {
        let chunk = self.geometry.chunk_of(off);
        let within = to_usize(off - self.geometry.offset_of(chunk));
        let data = self.load(chunk, scratch)?;
        dst.copy_from_slice(&data[within..within + dst.len()]);
        Ok(())
    }

    /// Read-modify-write of the partial chunk range `range`: copies `src` in, or zeroes the range
    /// when `src` is `None`.
    fn patch(&self, range: &Range<u64>, src: Option<&[u8]>, scratch: &mut Vec<u8>) -> io::Result<()> {
        let chunk = self.geometry.chunk_of(range.start);
        let start = self.geometry.offset_of(chunk);
        let within = to_usize(range.start - start);
        let len = to_usize(range.end - range.start);
        let _guard = self.stripe(chunk).write().expect("aligned stripe lock");
        let data = self.load(chunk, scratch)?;
        let dst = &mut data[within..within + len];
        match src {
            Some(src) => dst.copy_from_slice(src),
            None => dst.fill(0),
        }
        self.inner.write_at(data, start)
    }

    /// Zeroes `off..off + len`: the whole-chunk middle with `whole` (the inner backend's trim or
    /// write_zeroes), partial edges by read-modify-write.
    fn zero(&self, off: u64, len: u64, whole: fn(&B, u64, u64) -> io::Result<()>) -> io::Result<()> {
        check_range(off, len, self.geometry.size())?;
        if len == 0 {
            return Ok(());
        }
        let p = self.parts(off, len);
        let mut scratch = Vec::new();
        if !p.head.is_empty() {
            self.patch(&p.head, None, &mut scratch)?;
        }
        if !p.mid.is_empty() {
            let _guards = self.shared(&p.mid);
            whole(&self.inner, p.mid.start, p.mid.end - p.mid.start)?;
        }
        if !p.tail.is_empty() {
            self.patch(&p.tail, None, &mut scratch)?;
        }
        Ok(())
    }
}

impl<B> Aligned<B> {
    /// The chunk geometry the layer cuts requests with.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
}

crate::impl_layer!(Aligned { geometry });

fn unsupported(verb: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("the backend under the aligned layer does not support {verb}"),
    )
}

impl<B: Backend> Backend for Aligned<B> {
    crate::forward_backend!(inner, except read_at, write_at, trim, write_zeroes, extents);

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.geometry.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let p = self.parts(off, len64(buf));
        let (head, rest) = buf.split_at_mut(to_usize(p.head.end - p.head.start));
        let (mid, tail) = rest.split_at_mut(to_usize(p.mid.end - p.mid.start));
        let mut scratch = Vec::new();
        if !head.is_empty() {
            self.read_partial(head, p.head.start, &mut scratch)?;
        }
        if !mid.is_empty() {
            self.inner.read_at(mid, p.mid.start)?;
        }
        if !tail.is_empty() {
            self.read_partial(tail, p.tail.start, &mut scratch)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.geometry.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let p = self.parts(off, len64(buf));
        let (head, rest) = buf.split_at(to_usize(p.head.end - p.head.start));
        let (mid, tail) = rest.split_at(to_usize(p.mid.end - p.mid.start));
        let mut scratch = Vec::new();
        if !head.is_empty() {
            self.patch(&p.head, Some(head), &mut scratch)?;
        }
        if !mid.is_empty() {
            let _guards = self.shared(&p.mid);
            self.inner.write_at(mid, p.mid.start)?;
        }
        if !tail.is_empty() {
            self.patch(&p.tail, Some(tail), &mut scratch)?;
        }
        Ok(())
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.inner.capabilities().trim {
            return Err(unsupported("trim"));
        }
        self.zero(off, len, B::trim)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.inner.capabilities().write_zeroes {
            return Err(unsupported("write_zeroes"));
        }
        self.zero(off, len, B::write_zeroes)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        if !self.inner.capabilities().extents {
            return Err(unsupported("extents"));
        }
        let size = self.geometry.size();
        check_range(off, len, size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let cs = self.geometry.chunk_size();
        let end = off + len;
        let wide_start = off / cs * cs;
        let wide_end = end.checked_next_multiple_of(cs).unwrap_or(size).min(size);
        let wide = self.inner.extents(wide_start, wide_end - wide_start)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = wide_start;
        for e in wide {
            let start = pos.max(off);
            let stop = pos.saturating_add(e.len).min(end);
            pos = pos.saturating_add(e.len);
            if stop <= start {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.hole == e.hole => last.len += stop - start,
                _ => out.push(Extent { len: stop - start, hole: e.hole }),
            }
        }
        let covered: u64 = out.iter().map(|e| e.len).sum();
        if covered != len {
            return Err(io::Error::other(format!(
                "the backend under the aligned layer described {covered} of the {len} bytes at offset {off}"
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::backend::{Capabilities, SharedBackend};
    use crate::backends::Memory;
    use crate::conformance;
    use crate::layers::Chunked;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Op {
        Read,
        Write,
        Trim,
        Zeroes,
    }

    /// Records every call that reaches it.
    #[derive(Debug)]
    struct Counting {
        inner: Memory,
        log: Mutex<Vec<(Op, u64, u64)>>,
    }

    impl Counting {
        fn new(size: u64) -> Self {
            Self { inner: Memory::with_page_size(size, 4096).unwrap(), log: Mutex::new(Vec::new()) }
        }
        fn take(&self) -> Vec<(Op, u64, u64)> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
        fn record(&self, op: Op, off: u64, len: u64) {
            self.log.lock().unwrap().push((op, off, len));
        }
    }

    impl Backend for Counting {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.record(Op::Read, off, len64(buf));
            self.inner.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.record(Op::Write, off, len64(buf));
            self.inner.write_at(buf, off)
        }
        fn flush(&self) -> io::Result<()> {
            self.inner.flush()
        }
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        fn trim(&self, off: u64, len: u64) -> io::Result<()> {
            self.record(Op::Trim, off, len);
            self.inner.trim(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
            self.record(Op::Zeroes, off, len);
            self.inner.write_zeroes(off, len)
        }
        fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
            self.inner.extents(off, len)
        }
    }

    /// Aligned over a strict Chunked over a call recorder, chunks of 4096, 10 chunks + 100 bytes.
    fn counted() -> Aligned<Chunked<Counting>> {
        let size = 10 * 4096 + 100;
        Aligned::new(Chunked::new(Counting::new(size), 4096).unwrap(), 4096).unwrap()
    }

    fn log(a: &Aligned<Chunked<Counting>>) -> Vec<(Op, u64, u64)> {
        a.inner().inner().take()
    }

    #[test]
    fn conformance_over_memory() {
        conformance::run(&|size| -> SharedBackend {
            Arc::new(Aligned::new(Memory::new(size), 4096).unwrap())
        });
        // An odd chunk size that divides neither the pages nor the size.
        conformance::run(&|size| -> SharedBackend {
            Arc::new(Aligned::new(Memory::new(size), 10_007).unwrap())
        });
    }

    #[test]
    fn whole_chunks_pass_through_in_one_call() {
        let a = counted();
        let data = vec![7u8; 3 * 4096];
        a.write_at(&data, 4096).unwrap();
        assert_eq!(log(&a), vec![(Op::Write, 4096, 3 * 4096)]);
        let mut back = vec![0u8; 3 * 4096];
        a.read_at(&mut back, 4096).unwrap();
        assert_eq!(log(&a), vec![(Op::Read, 4096, 3 * 4096)]);
        assert_eq!(back, data);

        // The short tail chunk counts as whole.
        let tail = vec![3u8; 4096 + 100];
        a.write_at(&tail, 9 * 4096).unwrap();
        assert_eq!(log(&a), vec![(Op::Write, 9 * 4096, 4196)]);
        let mut back = vec![0u8; 4196];
        a.read_at(&mut back, 9 * 4096).unwrap();
        assert_eq!(log(&a), vec![(Op::Read, 9 * 4096, 4196)]);
        assert_eq!(back, tail);
    }

    #[test]
    fn partial_chunks_read_modify_write() {
        let a = counted();
        a.write_at(&[1u8; 50], 100).unwrap();
        assert_eq!(log(&a), vec![(Op::Read, 0, 4096), (Op::Write, 0, 4096)]);

        // Head, middle and tail.
        a.write_at(&vec![2u8; 9000 - 100], 100).unwrap();
        assert_eq!(
            log(&a),
            vec![
                (Op::Read, 0, 4096),
                (Op::Write, 0, 4096),
                (Op::Write, 4096, 4096),
                (Op::Read, 8192, 4096),
                (Op::Write, 8192, 4096),
            ]
        );
        let mut back = vec![9u8; 9100];
        a.read_at(&mut back, 0).unwrap();
        assert_eq!(
            log(&a),
            vec![(Op::Read, 0, 8192), (Op::Read, 8192, 4096)],
            "an aligned start needs no scratch"
        );
        assert!(back[..100].iter().all(|&b| b == 0));
        assert!(back[100..9000].iter().all(|&b| b == 2));
        assert!(back[9000..].iter().all(|&b| b == 0));

        // A partial read inside the short tail chunk reads the tail chunk whole.
        let mut small = [0u8; 10];
        a.read_at(&mut small, 10 * 4096 + 5).unwrap();
        assert_eq!(log(&a), vec![(Op::Read, 10 * 4096, 100)]);
    }

    #[test]
    fn trim_and_zeroes_pass_whole_chunks_and_patch_edges() {
        let a = counted();
        a.write_at(&vec![5u8; 4 * 4096], 0).unwrap();
        log(&a);
        a.trim(10, 3 * 4096).unwrap();
        assert_eq!(
            log(&a),
            vec![
                (Op::Read, 0, 4096),
                (Op::Write, 0, 4096),
                (Op::Trim, 4096, 2 * 4096),
                (Op::Read, 3 * 4096, 4096),
                (Op::Write, 3 * 4096, 4096),
            ]
        );
        a.write_zeroes(4096, 4096).unwrap();
        assert_eq!(log(&a), vec![(Op::Zeroes, 4096, 4096)]);
        let mut back = vec![0u8; 4 * 4096];
        a.read_at(&mut back, 0).unwrap();
        assert!(back[..10].iter().all(|&b| b == 5));
        assert!(back[10..3 * 4096 + 10].iter().all(|&b| b == 0));
        assert!(back[3 * 4096 + 10..].iter().all(|&b| b == 5));
    }

    #[test]
    fn extents_are_clipped_to_the_range() {
        let a = Aligned::new(Memory::with_page_size(10 * 4096, 4096).unwrap(), 4096).unwrap();
        a.write_at(&[1u8; 4096], 4096).unwrap();
        assert_eq!(
            a.extents(100, 10_000).unwrap(),
            vec![
                Extent { len: 3996, hole: true },
                Extent { len: 4096, hole: false },
                Extent { len: 10_100 - 8192, hole: true },
            ]
        );
        assert_eq!(a.extents(5000, 10).unwrap(), vec![Extent { len: 10, hole: false }]);
        assert_eq!(a.extents(5000, 0).unwrap(), vec![]);
    }

    #[test]
    fn missing_verbs_are_unsupported() {
        /// A backend with only the required verbs.
        struct Plain(Memory);
        impl Backend for Plain {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
                self.0.read_at(buf, off)
            }
            fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
                self.0.write_at(buf, off)
            }
            fn flush(&self) -> io::Result<()> {
                Ok(())
            }
        }
        let a = Aligned::new(Plain(Memory::new(8192)), 4096).unwrap();
        a.write_at(&[1u8; 20], 10).unwrap();
        assert_eq!(a.capabilities(), Capabilities::default());
        for err in
            [a.trim(0, 100).unwrap_err(), a.write_zeroes(0, 100).unwrap_err(), a.extents(0, 100).unwrap_err()]
        {
            assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
        }
        let mut back = [0u8; 20];
        a.read_at(&mut back, 10).unwrap();
        assert_eq!(back, [1u8; 20], "nothing was zeroed");
        assert!(format!("{a:?}").contains("Aligned"));
    }

    #[test]
    fn concurrent_partial_writes_to_one_chunk_lose_nothing() {
        const THREADS: u64 = 40;
        const ROUNDS: u64 = 200;
        let a = Arc::new(shared_stack());
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let a = Arc::clone(&a);
                s.spawn(move || {
                    for round in 0..ROUNDS {
                        let value = u8::try_from((t * 7 + round) % 251).unwrap() + 1;
                        a.write_at(&[value; 100], 4096 + t * 100).unwrap();
                    }
                });
            }
            // Whole-chunk writes of other chunks meanwhile, and a whole-chunk write of the same
            // chunk's neighbours, must not disturb anything either.
            let a = Arc::clone(&a);
            s.spawn(move || {
                for _ in 0..ROUNDS {
                    a.write_at(&[0xEE; 4096], 0).unwrap();
                    a.write_at(&[0xEE; 4096], 8192).unwrap();
                }
            });
        });
        let mut chunk = vec![0u8; 4096];
        a.read_at(&mut chunk, 4096).unwrap();
        for t in 0..THREADS {
            let last = u8::try_from((t * 7 + ROUNDS - 1) % 251).unwrap() + 1;
            let slot = &chunk[to_usize(t * 100)..to_usize(t * 100 + 100)];
            assert!(slot.iter().all(|&b| b == last), "slot {t} lost its last update: {slot:?}");
        }
        assert!(chunk[to_usize(THREADS * 100)..].iter().all(|&b| b == 0));
    }

    #[test]
    fn partial_writes_do_not_write_back_over_whole_chunk_writes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let a = shared_stack();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    a.write_at(&[0xFF; 100], 4096).unwrap();
                }
            });
            let mut chunk = vec![0u8; 4096];
            for round in 0..5000u32 {
                let v = u8::try_from(round % 250).unwrap() + 1;
                a.write_at(&[v; 4096], 4096).unwrap();
                a.read_at(&mut chunk, 4096).unwrap();
                // Only this thread writes bytes 100.., so they hold `v` until its next write,
                // unless a read-modify-write of the slot wrote stale bytes back.
                if let Some(i) = chunk[100..].iter().position(|&b| b != v) {
                    done.store(true, Ordering::SeqCst);
                    panic!("round {round}: byte {} reads {} after writing {v}", i + 100, chunk[i + 100]);
                }
            }
            done.store(true, Ordering::SeqCst);
        });
    }

    fn shared_stack() -> Aligned<SharedBackend> {
        let inner: SharedBackend = Arc::new(Memory::with_page_size(4 * 4096, 4096).unwrap());
        Aligned::new(inner, 4096).unwrap()
    }

    #[test]
    fn shared_backend_stack_is_debug() {
        let a = shared_stack();
        let text = format!("{a:?}");
        assert!(text.contains("chunk_size: 4096"), "{text}");
    }
}
