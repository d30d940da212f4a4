//! A sparse in-memory backend: pages are allocated on first non-zero write and read as zeroes
//! until then.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::RwLock;

use crate::backend::{Backend, Capabilities, Extent, check_range, len64};
use crate::geometry::{Geometry, to_usize};

/// Default allocation unit of [`Memory`]: one transparent huge page. Filling fresh memory in huge
/// pages is several times faster than in 4 KiB pages (see docs/benchmarks.md); use
/// [`Memory::with_page_size`] for finer sparseness.
pub const DEFAULT_PAGE_SIZE: u64 = 2 * 1024 * 1024;
const SHARDS: usize = 64;

/// Pages of this size (or a multiple) are mapped with transparent huge pages.
pub const HUGE_PAGE: u64 = 2 * 1024 * 1024;

type Shard = RwLock<HashMap<u64, Page>>;

/// One allocated page: from the heap, or for huge-page multiples an anonymous mapping advised to
/// use transparent huge pages (one fault per 2 MiB instead of 512).
enum Page {
    Heap(Box<[u8]>),
    Mapped(memmap2::MmapMut),
}

impl Page {
    /// A page of `len` bytes holding `src` at `start` and zeroes elsewhere.
    fn new(len: usize, start: usize, src: &[u8]) -> io::Result<Self> {
        if len as u64 >= HUGE_PAGE && (len as u64).is_multiple_of(HUGE_PAGE) {
            let mut map = memmap2::MmapOptions::new().len(len).map_anon()?;
            // Huge pages are an optimisation: without them the mapping still works.
            let _ = map.advise(memmap2::Advice::HugePage);
            map[start..start + src.len()].copy_from_slice(src);
            return Ok(Self::Mapped(map));
        }
        if src.len() == len {
            return Ok(Self::Heap(src.into()));
        }
        let mut p = vec![0u8; len];
        p[start..start + src.len()].copy_from_slice(src);
        Ok(Self::Heap(p.into_boxed_slice()))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Heap(b) => b,
            Self::Mapped(m) => m,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Heap(b) => b,
            Self::Mapped(m) => m,
        }
    }
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if matches!(self, Self::Heap(_)) { "heap" } else { "mapped" };
        write!(f, "Page({kind}, {} bytes)", self.bytes().len())
    }
}

/// Sparse memory of a fixed size.
///
/// Memory is allocated in pages of `page_size` bytes, only for pages that hold a non-zero byte
/// (writes of zeroes to an absent page allocate nothing; `trim` frees whole pages). Pages live in
/// a sharded map, so threads working on different pages rarely meet on a lock, and no lock is held
/// for longer than one page copy.
#[derive(Debug)]
pub struct Memory {
    geometry: Geometry,
    shards: Box<[Shard]>,
}

impl Memory {
    /// Empty (all-zero) memory of `size` bytes with the default page size.
    #[must_use]
    pub fn new(size: u64) -> Self {
        Self::with_page_size(size, DEFAULT_PAGE_SIZE).expect("the default page size is valid")
    }

    /// # Errors
    /// `InvalidInput` when `page_size` is zero.
    pub fn with_page_size(size: u64, page_size: u64) -> io::Result<Self> {
        Ok(Self {
            geometry: Geometry::new(size, page_size)?,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        })
    }

    /// Memory initialised with `data`.
    #[must_use]
    pub fn from_bytes(data: &[u8]) -> Self {
        let m = Self::new(len64(data));
        m.write_at(data, 0).expect("the data fits by construction");
        m
    }

    /// Bytes of page memory currently allocated.
    #[must_use]
    pub fn allocated_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().expect("memory shard lock").values().map(|p| len64(p.bytes())).sum::<u64>())
            .sum()
    }

    fn shard(&self, page: u64) -> &Shard {
        // Fibonacci hashing spreads consecutive pages over the shards.
        let h = page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.shards[to_usize(h) % SHARDS]
    }

    fn zero_range(&self, off: u64, len: u64) {
        for piece in self.geometry.split(off, len) {
            let page = piece.chunk.0;
            let page_len = self.geometry.chunk_len(piece.chunk);
            let mut shard = self.shard(page).write().expect("memory shard lock");
            if piece.within == 0 && piece.buf.len() as u64 == page_len {
                shard.remove(&page);
            } else if let Some(p) = shard.get_mut(&page) {
                let start = to_usize(piece.within);
                p.bytes_mut()[start..start + piece.buf.len()].fill(0);
            }
        }
    }
}

impl Backend for Memory {
    fn size(&self) -> u64 {
        self.geometry.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size())?;
        for piece in self.geometry.split(off, len64(buf)) {
            let dst = &mut buf[piece.buf.clone()];
            let shard = self.shard(piece.chunk.0).read().expect("memory shard lock");
            match shard.get(&piece.chunk.0) {
                Some(p) => {
                    let start = to_usize(piece.within);
                    dst.copy_from_slice(&p.bytes()[start..start + dst.len()]);
                }
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size())?;
        for piece in self.geometry.split(off, len64(buf)) {
            let src = &buf[piece.buf.clone()];
            let page = piece.chunk.0;
            let start = to_usize(piece.within);
            {
                let mut shard = self.shard(page).write().expect("memory shard lock");
                if let Some(p) = shard.get_mut(&page) {
                    p.bytes_mut()[start..start + src.len()].copy_from_slice(src);
                    continue;
                }
            }
            if src.iter().all(|&b| b == 0) {
                continue;
            }
            // Build the new page outside the lock; a whole-page write needs no zeroing.
            let page_len = to_usize(self.geometry.chunk_len(piece.chunk));
            let fresh = Page::new(page_len, start, src)?;
            let mut shard = self.shard(page).write().expect("memory shard lock");
            match shard.get_mut(&page) {
                // Another writer allocated the page meanwhile: write into theirs.
                Some(p) => p.bytes_mut()[start..start + src.len()].copy_from_slice(src),
                None => {
                    shard.insert(page, fresh);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { trim: true, write_zeroes: true, extents: true, read_only: false }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.size())?;
        self.zero_range(off, len);
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.trim(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        check_range(off, len, self.size())?;
        let mut out: Vec<Extent> = Vec::new();
        for piece in self.geometry.split(off, len) {
            let hole =
                !self.shard(piece.chunk.0).read().expect("memory shard lock").contains_key(&piece.chunk.0);
            let n = piece.buf.len() as u64;
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += n,
                _ => out.push(Extent { len: n, hole }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_memory_reads_zero_and_costs_nothing() {
        let m = Memory::new(1 << 40);
        let mut buf = vec![1u8; 4096];
        m.read_at(&mut buf, 1 << 39).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(m.allocated_bytes(), 0);
    }

    #[test]
    fn zero_writes_allocate_nothing_and_trim_frees_pages() {
        let m = Memory::with_page_size(1 << 20, 4096).unwrap();
        m.write_at(&[0u8; 8192], 0).unwrap();
        assert_eq!(m.allocated_bytes(), 0);
        m.write_at(&[7u8; 8192], 4096).unwrap();
        assert_eq!(m.allocated_bytes(), 8192);
        m.trim(4096, 4096).unwrap();
        assert_eq!(m.allocated_bytes(), 4096);
        assert_eq!(
            m.extents(0, 16384).unwrap(),
            vec![
                Extent { len: 8192, hole: true },
                Extent { len: 4096, hole: false },
                Extent { len: 4096, hole: true }
            ]
        );
    }
}
