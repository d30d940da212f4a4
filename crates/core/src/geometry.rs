//! Chunk geometry: how a byte range is cut into chunks, and the [`Chunk`] index newtype.

use std::fmt;
use std::io;
use std::ops::Range;

/// The index of a chunk (not a byte offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chunk(pub u64);

impl fmt::Display for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk {}", self.0)
    }
}

/// A resource of `size` bytes cut into chunks of `chunk_size` bytes. The last chunk is shorter
/// when `size` is not a multiple of `chunk_size`; it is a chunk like any other (pulled, pushed,
/// tracked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    chunk_size: u64,
}

impl Geometry {
    /// # Errors
    /// `InvalidInput` when `chunk_size` is zero.
    pub fn new(size: u64, chunk_size: u64) -> io::Result<Self> {
        if chunk_size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the chunk size must not be zero"));
        }
        Ok(Self { size, chunk_size })
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    #[must_use]
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks, counting a short tail chunk.
    #[must_use]
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The chunk that holds byte `off`.
    #[must_use]
    pub fn chunk_of(&self, off: u64) -> Chunk {
        Chunk(off / self.chunk_size)
    }

    /// Byte offset where `chunk` starts.
    #[must_use]
    pub fn offset_of(&self, chunk: Chunk) -> u64 {
        chunk.0 * self.chunk_size
    }

    /// Length of `chunk` in bytes (shorter for the tail chunk, 0 past the end).
    #[must_use]
    pub fn chunk_len(&self, chunk: Chunk) -> u64 {
        let start = self.offset_of(chunk);
        self.size.saturating_sub(start).min(self.chunk_size)
    }

    /// Byte range of the chunks `chunks` (clipped to the size).
    #[must_use]
    pub fn byte_range(&self, chunks: Range<u64>) -> Range<u64> {
        let start = (chunks.start * self.chunk_size).min(self.size);
        let end = (chunks.end.saturating_mul(self.chunk_size)).min(self.size);
        start..end.max(start)
    }

    /// The chunks that `off..off + len` touches (empty for `len == 0`).
    #[must_use]
    pub fn chunks_touched(&self, off: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        off / self.chunk_size..(off + len).div_ceil(self.chunk_size)
    }

    /// Whether `off..off + len` starts and ends on chunk boundaries (the end may be the size).
    #[must_use]
    pub fn is_aligned(&self, off: u64, len: u64) -> bool {
        let end = off + len;
        off.is_multiple_of(self.chunk_size) && (end.is_multiple_of(self.chunk_size) || end == self.size)
    }

    /// Splits `off..off + len` at chunk boundaries, yielding `(chunk, offset in chunk, range in buffer)`.
    pub fn split(&self, off: u64, len: u64) -> impl Iterator<Item = Piece> + use<> {
        let cs = self.chunk_size;
        let end = off + len;
        let mut pos = off;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let chunk = pos / cs;
            let within = pos - chunk * cs;
            let take = (cs - within).min(end - pos);
            let buf_start = usize::try_from(pos - off).expect("buffer offsets fit in usize");
            let buf_end = buf_start + usize::try_from(take).expect("buffer offsets fit in usize");
            pos += take;
            Some(Piece { chunk: Chunk(chunk), within, buf: buf_start..buf_end })
        })
    }
}

/// One chunk-sized-or-smaller piece of a request, from [`Geometry::split`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub chunk: Chunk,
    /// Offset of the piece inside its chunk.
    pub within: u64,
    /// Range of the piece inside the request's buffer.
    pub buf: Range<usize>,
}

/// Converts a byte count that indexes memory to `usize`.
///
/// # Panics
/// On a 32-bit target, for counts above 4 GiB (no single buffer is that large).
#[must_use]
pub fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("a buffer length fits in usize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_chunk_is_short_and_counted() {
        let g = Geometry::new(10, 4).unwrap();
        assert_eq!(g.chunks(), 3);
        assert_eq!(g.chunk_len(Chunk(2)), 2);
        assert_eq!(g.chunk_len(Chunk(3)), 0);
        assert_eq!(g.byte_range(1..3), 4..10);
        assert!(g.is_aligned(8, 2));
        assert!(!g.is_aligned(8, 1));
    }

    #[test]
    fn split_cuts_at_chunk_boundaries() {
        let g = Geometry::new(100, 10).unwrap();
        let pieces: Vec<_> = g.split(5, 20).collect();
        assert_eq!(
            pieces,
            vec![
                Piece { chunk: Chunk(0), within: 5, buf: 0..5 },
                Piece { chunk: Chunk(1), within: 0, buf: 5..15 },
                Piece { chunk: Chunk(2), within: 0, buf: 15..20 },
            ]
        );
        assert_eq!(g.chunks_touched(5, 20), 0..3);
        assert_eq!(g.chunks_touched(5, 0), 0..0);
    }

    #[test]
    fn zero_chunk_size_is_rejected() {
        assert!(Geometry::new(10, 0).is_err());
    }
}
