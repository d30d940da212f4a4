//! An edge that lets only chunk-aligned, chunk-sized, in-bounds requests through.
//!
//! [`Chunked`] sits in front of a store of one object per chunk (or a remote that should only
//! ever see whole chunks) and rejects everything else with `InvalidInput` and a message saying
//! exactly what was wrong. A request passes when:
//! - its range lies within the backend;
//! - its offset is a multiple of the chunk size (or is the end of the backend, for an empty
//!   request there);
//! - it ends on a chunk boundary or at the end of the backend, so its length is a whole number of
//!   chunks, the short tail chunk counting as whole ([`Geometry::is_aligned`]);
//! - with [`Chunked::with_max_chunks`], it touches at most that many chunks.
//!
//! `read_at`, `write_at`, `trim` and `write_zeroes` are checked in full. `extents` is only checked
//! for bounds: it moves no data, a caller describing a device (NBD block status) asks about
//! arbitrary ranges, and the answer is as long as the number of runs, not the range.
//!
//! It does not make unaligned requests work: put [`Aligned`](super::Aligned) in front for that.
//! Capabilities are the inner backend's; `trim`, `write_zeroes` and `extents` answer
//! `Unsupported` before any check when the inner backend does not offer them.

use std::io;

use crate::backend::{Backend, Extent, check_range, len64};
use crate::geometry::Geometry;

/// Rejects requests that are not whole, in-bounds chunks; see the [module documentation](self).
pub struct Chunked<B> {
    inner: B,
    geometry: Geometry,
    max_chunks: Option<u64>,
}

impl<B: Backend> Chunked<B> {
    /// Wraps `inner`, whose chunks are `chunk_size` bytes; the geometry comes from `inner.size()`.
    ///
    /// # Errors
    /// `InvalidInput` when `chunk_size` is zero.
    pub fn new(inner: B, chunk_size: u64) -> io::Result<Self> {
        Ok(Self { geometry: Geometry::new(inner.size(), chunk_size)?, inner, max_chunks: None })
    }

    /// Also rejects requests (reads, writes, trims, zeroings) that touch more than `max_chunks`
    /// chunks. A limit of zero is taken as one.
    #[must_use]
    pub fn with_max_chunks(mut self, max_chunks: u64) -> Self {
        self.max_chunks = Some(max_chunks.max(1));
        self
    }

    /// Checks that `off..off + len` is a request this layer lets through.
    ///
    /// # Errors
    /// `InvalidInput` with a message naming the first rule the range breaks.
    pub fn check(&self, off: u64, len: u64) -> io::Result<()> {
        let size = self.geometry.size();
        let cs = self.geometry.chunk_size();
        check_range(off, len, size)?;
        if !off.is_multiple_of(cs) && off != size {
            return Err(invalid(format!("offset {off} is not a multiple of the chunk size {cs}")));
        }
        let end = off + len;
        if !end.is_multiple_of(cs) && end != size {
            return Err(invalid(format!(
                "length {len} at offset {off} is not a whole number of {cs}-byte chunks \
                 (a range must end on a chunk boundary or at the end of the backend, {size} bytes)"
            )));
        }
        if let Some(max) = self.max_chunks {
            let touched = self.geometry.chunks_touched(off, len);
            let n = touched.end - touched.start;
            if n > max {
                return Err(invalid(format!(
                    "length {len} at offset {off} spans {n} chunks, more than the limit of {max} per request"
                )));
            }
        }
        Ok(())
    }
}

impl<B> Chunked<B> {
    /// The chunk geometry requests are checked against.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The per-request chunk limit, if any.
    #[must_use]
    pub fn max_chunks(&self) -> Option<u64> {
        self.max_chunks
    }
}

crate::impl_layer!(Chunked { geometry, max_chunks });

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn unsupported(verb: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("the backend under the chunked layer does not support {verb}"),
    )
}

impl<B: Backend> Backend for Chunked<B> {
    crate::forward_backend!(inner, except read_at, write_at, trim, write_zeroes, extents);

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check(off, len64(buf))?;
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check(off, len64(buf))?;
        self.inner.write_at(buf, off)
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.inner.capabilities().trim {
            return Err(unsupported("trim"));
        }
        self.check(off, len)?;
        self.inner.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.inner.capabilities().write_zeroes {
            return Err(unsupported("write_zeroes"));
        }
        self.check(off, len)?;
        self.inner.write_zeroes(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        if !self.inner.capabilities().extents {
            return Err(unsupported("extents"));
        }
        check_range(off, len, self.geometry.size())?;
        self.inner.extents(off, len)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::SharedBackend;
    use crate::backends::Memory;
    use crate::conformance;
    use crate::layers::Aligned;

    /// 10 chunks of 4096 and a tail chunk of 100 bytes.
    fn chunked() -> Chunked<Memory> {
        Chunked::new(Memory::new(10 * 4096 + 100), 4096).unwrap()
    }

    fn message(r: io::Result<()>) -> String {
        let err = r.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        err.to_string()
    }

    #[test]
    fn conformance_aligned_over_chunked() {
        conformance::run(&|size| -> SharedBackend {
            Arc::new(Aligned::new(Chunked::new(Memory::new(size), 4096).unwrap(), 4096).unwrap())
        });
        conformance::run(&|size| -> SharedBackend {
            let inner: SharedBackend = Arc::new(Memory::new(size));
            let chunked: SharedBackend = Arc::new(Chunked::new(inner, 65_536).unwrap());
            Arc::new(Aligned::new(chunked, 65_536).unwrap())
        });
    }

    #[test]
    fn aligned_whole_chunks_pass() {
        let c = chunked();
        let data = vec![4u8; 2 * 4096];
        c.write_at(&data, 4096).unwrap();
        let mut back = vec![0u8; 2 * 4096];
        c.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        // The tail chunk, alone or with whole chunks before it, counts as whole.
        c.write_at(&[1u8; 100], 10 * 4096).unwrap();
        c.write_at(&vec![1u8; 4196], 9 * 4096).unwrap();
        c.read_at(&mut [0u8; 4196], 9 * 4096).unwrap();
        // Empty requests on a boundary, including the end.
        c.read_at(&mut [], 0).unwrap();
        c.write_at(&[], 4096).unwrap();
        c.write_at(&[], 10 * 4096 + 100).unwrap();
        c.trim(0, 4096).unwrap();
        c.write_zeroes(9 * 4096, 4196).unwrap();
    }

    #[test]
    fn misaligned_offset_is_named() {
        let c = chunked();
        let msg = message(c.write_at(&[0u8; 4096], 4097));
        assert_eq!(msg, "offset 4097 is not a multiple of the chunk size 4096");
        let msg = message(c.read_at(&mut [0u8; 10], 1));
        assert_eq!(msg, "offset 1 is not a multiple of the chunk size 4096");
        let msg = message(c.trim(100, 4096));
        assert_eq!(msg, "offset 100 is not a multiple of the chunk size 4096");
    }

    #[test]
    fn partial_length_is_named() {
        let c = chunked();
        let msg = message(c.write_at(&[0u8; 100], 0));
        assert!(msg.starts_with("length 100 at offset 0 is not a whole number of 4096-byte chunks"), "{msg}");
        assert!(msg.contains("41060 bytes"), "{msg}");
        let msg = message(c.read_at(&mut [0u8; 99], 10 * 4096));
        assert!(msg.starts_with("length 99 at offset 40960 is not"), "{msg}");
        let msg = message(c.write_zeroes(4096, 5000));
        assert!(msg.starts_with("length 5000 at offset 4096 is not"), "{msg}");
    }

    #[test]
    fn out_of_bounds_is_named() {
        let c = chunked();
        let msg = message(c.write_at(&[0u8; 4096], 11 * 4096));
        assert!(msg.contains("beyond the end"), "{msg}");
        let msg = message(c.read_at(&mut [0u8; 8192], 10 * 4096));
        assert!(msg.contains("beyond the end"), "{msg}");
        let msg = message(c.trim(u64::MAX - 4095, 4096));
        assert!(msg.contains("beyond the end"), "{msg}");
        let err = c.extents(0, 11 * 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn max_chunks_limits_each_request() {
        let c = chunked().with_max_chunks(2);
        assert_eq!(c.max_chunks(), Some(2));
        c.write_at(&vec![1u8; 2 * 4096], 0).unwrap();
        let msg = message(c.write_at(&vec![1u8; 3 * 4096], 0));
        assert_eq!(msg, "length 12288 at offset 0 spans 3 chunks, more than the limit of 2 per request");
        let msg = message(c.trim(0, 10 * 4096 + 100));
        assert!(msg.contains("spans 11 chunks"), "{msg}");
    }

    #[test]
    fn extents_accept_any_range_in_bounds() {
        let c = chunked();
        c.write_at(&[1u8; 4096], 0).unwrap();
        let e = c.extents(5, 100).unwrap();
        assert_eq!(e, vec![Extent { len: 100, hole: false }]);
    }

    #[test]
    fn accessors_and_debug() {
        let c = chunked();
        assert_eq!(c.geometry().chunk_size(), 4096);
        assert_eq!(c.inner().size(), 10 * 4096 + 100);
        let text = format!("{c:?}");
        assert!(text.contains("Chunked"), "{text}");
        assert_eq!(c.into_inner().size(), 10 * 4096 + 100);
    }
}
