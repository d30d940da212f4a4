//! [`AnonMapping`]: a private anonymous mapping meant to be filled by a userfaultfd handler, with
//! safe, volatile access.
//!
//! # Why there is no `&[u8]` view
//! The bytes of such a mapping change under any reference one could hand out: other threads of
//! the application write them through raw pointers, the kernel fills missing pages
//! (`UFFDIO_COPY`), and [`AnonMapping::discard`] drops pages so that they are filled again. A
//! `&[u8]` promises that the bytes do not change while it lives and a `&mut [u8]` that nobody
//! else looks at them, so neither is handed out. Access goes through copies made with volatile
//! loads and stores ([`AnonMapping::read`], [`AnonMapping::write`]), which are defined behaviour
//! however other threads and the kernel touch the same bytes (the approach of `vm-memory` for
//! guest memory), or through the raw pointer ([`AnonMapping::as_ptr`]), whose users take on
//! those rules themselves.
//!
//! An access to a page that is not present blocks until the userfaultfd handler of the mapping
//! (if one is registered) fills it. That is a wait, not undefined behaviour; the thread that
//! serves the faults must therefore never access the mapping itself.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::ptr::NonNull;

use rustix::mm::{Advice, MapFlags, ProtFlags};

/// The system's page size in bytes.
#[must_use]
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// A read-write `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE` mapping, unmapped on drop. See the
/// [module docs](self) for how its bytes may be accessed.
pub struct AnonMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access through `&self` is a
// volatile copy or a system call on a range checked against the length, which is sound from any
// thread (the module docs explain why concurrent accesses are defined). Unmapping needs `self` by
// value (drop), so no thread can use the memory after it is gone.
unsafe impl Send for AnonMapping {}
// SAFETY: as for `Send`: shared access is limited to volatile copies and system calls.
unsafe impl Sync for AnonMapping {}

impl fmt::Debug for AnonMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnonMapping")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .finish()
    }
}

impl AnonMapping {
    /// Maps `len` bytes rounded up to whole pages. No memory is committed until pages are
    /// touched (or filled by a userfaultfd handler).
    ///
    /// # Errors
    /// `InvalidInput` for a zero length; the `mmap` error.
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot map zero bytes"));
        }
        let len = len
            .checked_next_multiple_of(page_size())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the mapping length overflows"))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses overlaps nothing that
        // exists, so no Rust object is affected; the returned pointer is owned by `Self`.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )?
        };
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned a null pointer"))?;
        Ok(Self { ptr, len })
    }

    /// Length in bytes (a multiple of the page size).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start address, as userfaultfd and `/proc/self/pagemap` take it.
    #[must_use]
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The first byte. Dereferencing it is up to the caller, under the rules of the
    /// [module docs](self): the bytes may change at any time, and the pointer dangles once the
    /// mapping is dropped.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, off: usize, len: usize) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {off}+{len} is beyond the end of the mapping ({} bytes)", self.len),
            )),
        }
    }

    /// Copies `buf.len()` bytes at `off` into `buf` with volatile loads. Missing pages fault.
    ///
    /// # Errors
    /// `InvalidInput` for a range past the end.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: the range lies within the mapping (checked), which lives as long as `&self`.
        unsafe { volatile_copy_out(self.ptr.as_ptr().add(off), buf) };
        Ok(())
    }

    /// Copies `buf` to `off` with volatile stores. Missing pages fault.
    ///
    /// # Errors
    /// `InvalidInput` for a range past the end.
    pub fn write(&self, off: usize, buf: &[u8]) -> io::Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: the range lies within the mapping (checked), which lives as long as `&self`.
        unsafe { volatile_copy_in(self.ptr.as_ptr().add(off), buf) };
        Ok(())
    }

    /// Reads one byte with a volatile load.
    ///
    /// # Errors
    /// `InvalidInput` past the end.
    pub fn read_u8(&self, off: usize) -> io::Result<u8> {
        self.check(off, 1)?;
        // SAFETY: in bounds (checked); a volatile load of a byte of live mapped memory.
        Ok(unsafe { self.ptr.as_ptr().add(off).read_volatile() })
    }

    /// Writes one byte with a volatile store.
    ///
    /// # Errors
    /// `InvalidInput` past the end.
    pub fn write_u8(&self, off: usize, value: u8) -> io::Result<()> {
        self.check(off, 1)?;
        // SAFETY: in bounds (checked); a volatile store to a byte of live, writable mapped memory.
        unsafe { self.ptr.as_ptr().add(off).write_volatile(value) };
        Ok(())
    }

    /// Writes a native-endian `u64` at `off` (any alignment) with volatile stores.
    ///
    /// # Errors
    /// `InvalidInput` past the end.
    pub fn write_u64(&self, off: usize, value: u64) -> io::Result<()> {
        self.check(off, 8)?;
        let p = self.ptr.as_ptr().wrapping_add(off);
        if p.align_offset(8) == 0 {
            // SAFETY: in bounds (checked) and aligned for u64; volatile store to live memory.
            unsafe { p.cast::<u64>().write_volatile(value) };
        } else {
            // SAFETY: in bounds (checked); byte-wise volatile stores.
            unsafe { volatile_copy_in(p, &value.to_ne_bytes()) };
        }
        Ok(())
    }

    /// Drops the pages of `off..off + len` (`MADV_DONTNEED`): they become missing, so the next
    /// access faults again (to the userfaultfd handler, if one is registered; otherwise the pages
    /// read as zeroes). The range is widened to whole pages.
    ///
    /// # Errors
    /// `InvalidInput` past the end; the `madvise` error.
    pub fn discard(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        let page = page_size();
        let start = off - off % page;
        let end = (off + len).next_multiple_of(page).min(self.len);
        if end <= start {
            return Ok(());
        }
        // SAFETY: the page range lies within the mapping; dropping pages of an anonymous private
        // mapping only changes what its bytes read as, which every accessor tolerates (no
        // references into the mapping exist, see the module docs).
        unsafe {
            rustix::mm::madvise(self.ptr.as_ptr().add(start).cast(), end - start, Advice::LinuxDontNeed)?;
        };
        Ok(())
    }

    /// Reads from `fd` at `file_off` into the mapping at `off..off + len` with one `pread(2)`
    /// (the kernel writes the mapping; missing pages fault to the userfaultfd handler as a
    /// kernel-mode access). Returns the bytes read (short at end of file).
    ///
    /// # Errors
    /// `InvalidInput` past the end; the `pread` error.
    pub fn pread_from(&self, fd: BorrowedFd<'_>, file_off: u64, off: usize, len: usize) -> io::Result<usize> {
        self.check(off, len)?;
        let file_off = libc::off_t::try_from(file_off)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        // SAFETY: the destination range lies within the mapping (checked) and stays mapped for the
        // call; the kernel writes it with its own user-copy routines, no Rust reference is made.
        let n = unsafe { libc::pread(fd.as_raw_fd(), self.ptr.as_ptr().add(off).cast(), len, file_off) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes the mapping's `off..off + len` to `fd` at `file_off` with one `pwrite(2)` (the
    /// kernel reads the mapping). Returns the bytes written.
    ///
    /// # Errors
    /// `InvalidInput` past the end; the `pwrite` error.
    pub fn pwrite_to(&self, fd: BorrowedFd<'_>, file_off: u64, off: usize, len: usize) -> io::Result<usize> {
        self.check(off, len)?;
        let file_off = libc::off_t::try_from(file_off)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        // SAFETY: the source range lies within the mapping (checked) and stays mapped for the
        // call; the kernel reads it with its own user-copy routines.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), self.ptr.as_ptr().add(off).cast(), len, file_off) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is the mapping this value created and owns; nothing can use it
        // after drop (every accessor borrows `self`).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            // Leaking address space is all that can happen here.
            let _ = e;
        }
    }
}

/// Copies `dst.len()` bytes from `src` with volatile loads, eight bytes at a time where aligned.
///
/// # Safety
/// `src..src + dst.len()` must be readable memory for the whole call.
unsafe fn volatile_copy_out(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let head = src.align_offset(8).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: `i < n`, within the readable range (caller).
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: `src + i` is 8-aligned (after the head) and `i + 8 <= n` keeps it in range.
        let v = unsafe { src.add(i).cast::<u64>().read_volatile() };
        dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, within the readable range (caller).
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
}

/// Copies `src` to `dst` with volatile stores, eight bytes at a time where aligned.
///
/// # Safety
/// `dst..dst + src.len()` must be writable memory for the whole call.
unsafe fn volatile_copy_in(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    let head = dst.align_offset(8).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: `i < n`, within the writable range (caller).
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
    while i + 8 <= n {
        let mut word = [0u8; 8];
        word.copy_from_slice(&src[i..i + 8]);
        // SAFETY: `dst + i` is 8-aligned (after the head) and `i + 8 <= n` keeps it in range.
        unsafe { dst.add(i).cast::<u64>().write_volatile(u64::from_ne_bytes(word)) };
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, within the writable range (caller).
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_and_discard() {
        let m = AnonMapping::new(3 * page_size() - 5).unwrap();
        assert_eq!(m.len(), 3 * page_size());
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        m.write(4093, &data).unwrap();
        let mut back = vec![0u8; 1000];
        m.read(4093, &mut back).unwrap();
        assert_eq!(back, data);
        m.write_u64(17, 0x0102_0304_0506_0708).unwrap();
        m.write_u64(32, 7).unwrap();
        let mut w = [0u8; 8];
        m.read(17, &mut w).unwrap();
        assert_eq!(u64::from_ne_bytes(w), 0x0102_0304_0506_0708);
        assert_eq!(m.read_u8(32).unwrap(), 7u64.to_ne_bytes()[0]);
        m.discard(0, page_size() * 3).unwrap();
        m.read(4093, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert!(m.read(m.len() - 1, &mut [0u8; 2]).is_err());
        assert!(AnonMapping::new(0).is_err());
    }

    #[test]
    fn pread_and_pwrite_through_the_mapping() {
        use std::io::{Seek as _, Write as _};
        use std::os::fd::AsFd as _;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[9u8; 5000]).unwrap();
        f.rewind().unwrap();
        let m = AnonMapping::new(2 * page_size()).unwrap();
        assert_eq!(m.pread_from(f.as_fd(), 0, 10, 5000).unwrap(), 5000);
        assert_eq!(m.read_u8(5009).unwrap(), 9);
        m.write(0, b"hello").unwrap();
        assert_eq!(m.pwrite_to(f.as_fd(), 6000, 0, 5).unwrap(), 5);
        let mut got = [0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 6000).unwrap();
        assert_eq!(&got, b"hello");
    }
}
