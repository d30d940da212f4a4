//! [`SharedMapping`]: a `MAP_SHARED` mapping of a file of fixed size, as a byte slice.

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};

use memmap2::{MmapMut, MmapOptions};

/// A read-write shared mapping of a whole file. Writes through the slice reach the file (and the
/// backend behind an r3map mount) on [`SharedMapping::flush`] (`msync`) or when the kernel writes
/// the pages back.
pub struct SharedMapping {
    map: MmapMut,
}

impl fmt::Debug for SharedMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMapping").field("len", &self.map.len()).finish()
    }
}

impl SharedMapping {
    /// Maps `len` bytes of `file` (opened read-write) from offset 0.
    ///
    /// # Safety
    /// The file must not shrink below `len` bytes while the mapping lives (accesses past the end
    /// of a file raise SIGBUS), and the mount or device behind it must outlive the mapping. r3map's
    /// mount files and block devices have a fixed size, and the mount API ties the mapping's
    /// lifetime to the mount's. Other processes may change the bytes under the slice, as with any
    /// shared mapping: the caller treats the memory as shared with them.
    ///
    /// # Errors
    /// The `mmap` error (an empty length is `InvalidInput`).
    pub unsafe fn map(file: &File, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot map an empty file"));
        }
        // SAFETY: the caller guarantees the file keeps at least `len` bytes and outlives the
        // mapping (see `# Safety`); memmap2 checks the descriptor and the length.
        let map = unsafe { MmapOptions::new().len(len).map_mut(file)? };
        Ok(Self { map })
    }

    /// Writes dirty pages back to the file and waits (`msync(MS_SYNC)`).
    ///
    /// # Errors
    /// The `msync` error, for example `EIO` when the backend behind the file failed.
    pub fn flush(&self) -> io::Result<()> {
        self.map.flush()
    }

    /// Writes back one range (`msync` of the pages it covers).
    ///
    /// # Errors
    /// As [`SharedMapping::flush`].
    pub fn flush_range(&self, offset: usize, len: usize) -> io::Result<()> {
        self.map.flush_range(offset, len)
    }
}

/// Writes dirty pages back before unmapping. Unmapping a shared mapping with dirty pages of a FUSE
/// file makes the kernel write them back while it holds the process's memory-map lock; if the same
/// process serves that file and one of its FUSE workers needs the lock (to map memory for a new
/// page, say), both wait for each other forever. Writing back first, outside the lock, leaves
/// nothing to write at unmap time. Call [`SharedMapping::flush`] to see write-back errors: this one
/// cannot report them.
impl Drop for SharedMapping {
    fn drop(&mut self) {
        let _ = self.map.flush();
    }
}

impl Deref for SharedMapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl DerefMut for SharedMapping {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn writes_through_the_mapping_reach_the_file() {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        // SAFETY: the temporary file keeps its size and lives until the end of the test.
        let mut m = unsafe { SharedMapping::map(&f, 8192) }.unwrap();
        m[4096..4101].copy_from_slice(b"hello");
        m.flush().unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(&back[4096..4101], b"hello");
        // SAFETY: as above.
        assert!(unsafe { SharedMapping::map(&f, 0) }.is_err());
    }
}
