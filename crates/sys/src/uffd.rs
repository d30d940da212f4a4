//! A thin wrapper over Linux userfaultfd and `PAGEMAP_SCAN`, on `rustix` and the uapi
//! definitions of `linux-raw-sys`.
//!
//! - [`Uffd`]: a userfaultfd descriptor. [`Uffd::probe`] reports what the kernel offers,
//!   [`Uffd::open`] creates one with a chosen set of [`Features`] (the `UFFDIO_API` handshake),
//!   then [`Uffd::register`] an [`AnonMapping`] for missing and/or write-protect faults, read
//!   [`Event`]s with [`Uffd::read_events`], and resolve them with [`Uffd::copy`],
//!   [`Uffd::zeropage`], [`Uffd::wake`], [`Uffd::write_protect`] and [`Uffd::poison`].
//! - [`PageMap`]: `/proc/self/pagemap`, for `PAGEMAP_SCAN` of the pages written since they were
//!   last write-protected (asynchronous write-protect, `UFFD_FEATURE_WP_ASYNC`), and for asking
//!   whether a page is present.
//!
//! # Kernel-mode accesses
//! Descriptors are created **without** `UFFD_USER_MODE_ONLY`, so an access made by the kernel on
//! behalf of the process (a `read(2)` whose buffer is in a registered range, say) faults to the
//! handler as well, instead of failing with `EFAULT`. That needs privilege: `/dev/userfaultfd`
//! access or `CAP_SYS_PTRACE` (or `vm.unprivileged_userfaultfd = 1`). The handler must then be
//! another thread (or process) than the one making the access, which it always is.
//!
//! # Why the operations are safe functions
//! `UFFDIO_COPY`, `ZEROPAGE`, `POISON` and `WRITEPROTECT` only act on ranges registered with the
//! same descriptor, and `COPY`/`ZEROPAGE`/`POISON` only fill pages that are missing (they fail with
//! `EEXIST` otherwise). Ranges get registered through [`Uffd::register`], which takes an
//! [`AnonMapping`] (whose bytes are only ever accessed in ways that tolerate such changes), or
//! through the unsafe [`Uffd::register_range`], whose caller vouches for the memory. A descriptor
//! received from another process ([`Uffd::from_fd`]) acts on that process's memory, never on ours.

use std::ffi::c_void;
use std::fmt;
use std::io;
use std::mem::size_of;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as nr;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};

use crate::region_map::{AnonMapping, page_size};

/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: Opcode = opcode::none(0xAA, 0x00);
/// `UFFDIO_POISON`: `_IOWR(0xAA, 8, struct uffdio_poison)` (not in `linux-raw-sys`' ioctl list).
const UFFDIO_POISON: Opcode = opcode::read_write::<uapi::uffdio_poison>(0xAA, 8);
/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: Opcode = opcode::read_write::<uapi::pm_scan_arg>(b'f', 16);

/// `UFFDIO_WRITEPROTECT_MODE_WP` and `_DONTWAKE` (`(__u64)1 << n` in the header, which bindgen
/// leaves out).
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

const MSG_SIZE: usize = 32;
const _: () = assert!(size_of::<uapi::uffd_msg>() == MSG_SIZE);

/// An `ioctl` whose argument is a raw pointer (or integer) and whose output is the return value.
struct RawIoctl {
    opcode: Opcode,
    arg: *mut c_void,
}

// SAFETY: every constructor below (`raw_ioctl`) documents that `arg` is what the kernel expects
// for `opcode`; the output is only the integer return value, no memory is read back here.
unsafe impl Ioctl for RawIoctl {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _arg: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Runs one ioctl.
///
/// # Safety
/// `arg` must be what the kernel expects for `opcode` on `fd` (a pointer to a live, correctly
/// typed and sized struct, or an integer), and the call's effects must be sound for the process.
unsafe fn raw_ioctl(fd: BorrowedFd<'_>, opcode: Opcode, arg: *mut c_void) -> Result<IoctlOutput, Errno> {
    // SAFETY: forwarded to the caller.
    unsafe { rustix::ioctl::ioctl(fd, RawIoctl { opcode, arg }) }
}

/// Runs a userfaultfd ioctl on a struct argument.
///
/// # Safety
/// `T` must be the struct `opcode` takes, and the operation must only act on ranges registered with
/// `fd` (see the module docs for why that is sound).
unsafe fn uffd_ioctl<T>(fd: BorrowedFd<'_>, opcode: Opcode, arg: &mut T) -> Result<IoctlOutput, Errno> {
    // SAFETY: forwarded to the caller; `arg` is a live exclusive reference for the call.
    unsafe { raw_ioctl(fd, opcode, std::ptr::from_mut(arg).cast()) }
}

macro_rules! bitset {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $flag:ident = $value:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            $($(#[$fmeta])* pub const $flag: Self = Self($value as u64);)*
            /// The empty set.
            pub const NONE: Self = Self(0);
            const NAMES: &[(&'static str, u64)] = &[$((stringify!($flag), $value as u64),)*];

            /// Whether every flag of `other` is in this set.
            #[must_use]
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// The flags in either set.
            #[must_use]
            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }

            /// The flags in both sets.
            #[must_use]
            pub const fn intersection(self, other: Self) -> Self {
                Self(self.0 & other.0)
            }

            /// The flags of this set that are not in `other`.
            #[must_use]
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }

            /// The names of the known flags in the set.
            #[must_use]
            pub fn names(self) -> Vec<&'static str> {
                Self::NAMES.iter().filter(|(_, v)| self.0 & v == *v && *v != 0).map(|(n, _)| *n).collect()
            }
        }

        impl std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                self.union(rhs)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.names().join(" | "))
            }
        }
    };
}

bitset! {
    /// `UFFD_FEATURE_*` flags negotiated with `UFFDIO_API`.
    Features {
        /// Write-protect faults (`UFFDIO_REGISTER_MODE_WP`) on anonymous memory.
        PAGEFAULT_FLAG_WP = uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        EVENT_FORK = uapi::UFFD_FEATURE_EVENT_FORK,
        EVENT_REMAP = uapi::UFFD_FEATURE_EVENT_REMAP,
        /// `MADV_DONTNEED`/`MADV_REMOVE` on a registered range is reported (and the caller of
        /// `madvise` waits until the event is read).
        EVENT_REMOVE = uapi::UFFD_FEATURE_EVENT_REMOVE,
        MISSING_HUGETLBFS = uapi::UFFD_FEATURE_MISSING_HUGETLBFS,
        MISSING_SHMEM = uapi::UFFD_FEATURE_MISSING_SHMEM,
        EVENT_UNMAP = uapi::UFFD_FEATURE_EVENT_UNMAP,
        /// Missing faults raise SIGBUS instead of being reported.
        SIGBUS = uapi::UFFD_FEATURE_SIGBUS,
        THREAD_ID = uapi::UFFD_FEATURE_THREAD_ID,
        MINOR_HUGETLBFS = uapi::UFFD_FEATURE_MINOR_HUGETLBFS,
        MINOR_SHMEM = uapi::UFFD_FEATURE_MINOR_SHMEM,
        EXACT_ADDRESS = uapi::UFFD_FEATURE_EXACT_ADDRESS,
        WP_HUGETLBFS_SHMEM = uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        WP_UNPOPULATED = uapi::UFFD_FEATURE_WP_UNPOPULATED,
        /// `UFFDIO_POISON`: a page that raises SIGBUS when accessed.
        POISON = uapi::UFFD_FEATURE_POISON,
        /// Write-protect faults are resolved by the kernel without a message; `PAGEMAP_SCAN`
        /// reports the written pages.
        WP_ASYNC = uapi::UFFD_FEATURE_WP_ASYNC,
        MOVE = uapi::UFFD_FEATURE_MOVE,
    }
}

bitset! {
    /// The ioctls a descriptor or a registered range supports (bit `n` for `_UFFDIO_*` number `n`).
    Ioctls {
        REGISTER = 1u64 << uapi::_UFFDIO_REGISTER,
        UNREGISTER = 1u64 << uapi::_UFFDIO_UNREGISTER,
        WAKE = 1u64 << uapi::_UFFDIO_WAKE,
        COPY = 1u64 << uapi::_UFFDIO_COPY,
        ZEROPAGE = 1u64 << uapi::_UFFDIO_ZEROPAGE,
        MOVE = 1u64 << uapi::_UFFDIO_MOVE,
        WRITEPROTECT = 1u64 << uapi::_UFFDIO_WRITEPROTECT,
        CONTINUE = 1u64 << uapi::_UFFDIO_CONTINUE,
        POISON = 1u64 << uapi::_UFFDIO_POISON,
        API = 1u64 << uapi::_UFFDIO_API,
    }
}

bitset! {
    /// `UFFDIO_REGISTER_MODE_*`.
    RegisterMode {
        /// Faults on missing pages.
        MISSING = uapi::UFFDIO_REGISTER_MODE_MISSING,
        /// Write-protect faults (synchronous, or resolved by the kernel with `WP_ASYNC`).
        WP = uapi::UFFDIO_REGISTER_MODE_WP,
        /// Minor faults (shmem and hugetlbfs).
        MINOR = uapi::UFFDIO_REGISTER_MODE_MINOR,
    }
}

/// What the kernel offers, from [`Uffd::probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Api {
    /// Every feature the kernel supports.
    pub features: Features,
    /// The ioctls of a descriptor after the handshake.
    pub ioctls: Ioctls,
}

/// How [`Uffd::copy`] installs pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyMode {
    /// Install the pages write-protected (`UFFDIO_COPY_MODE_WP`): the first write is recorded
    /// (by a write-protect fault, or by the kernel with `WP_ASYNC`).
    pub write_protect: bool,
    /// Do not wake threads waiting on the range (`UFFDIO_COPY_MODE_DONTWAKE`); call
    /// [`Uffd::wake`] later.
    pub dont_wake: bool,
}

/// What [`Uffd::copy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyReport {
    /// Bytes installed by this call.
    pub copied: u64,
    /// Bytes skipped because their pages were already present (`EEXIST`): their contents were
    /// left as they were.
    pub existing: u64,
}

/// Flags of a page fault event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(clippy::struct_excessive_bools)]
pub struct FaultFlags {
    /// The access was a write.
    pub write: bool,
    /// A write-protect fault (the page is present and protected).
    pub wp: bool,
    /// A minor fault (page cache present, page table entry missing).
    pub minor: bool,
}

/// A message read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted at `address` (page-aligned unless `EXACT_ADDRESS` was negotiated) and
    /// waits until the page is resolved and it is woken.
    Pagefault {
        address: u64,
        flags: FaultFlags,
        /// The faulting thread, with `THREAD_ID` (0 otherwise).
        thread_id: u32,
    },
    /// The process forked (`EVENT_FORK`): `uffd` serves the child's copy of the ranges.
    Fork { uffd: OwnedFd },
    /// A registered range moved (`EVENT_REMAP`).
    Remap { from: u64, to: u64, len: u64 },
    /// Pages of `start..end` were dropped by `madvise` (`EVENT_REMOVE`).
    Remove { start: u64, end: u64 },
    /// `start..end` was unmapped (`EVENT_UNMAP`).
    Unmap { start: u64, end: u64 },
    /// An event this wrapper does not know.
    Unknown { event: u8 },
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

/// Parses one `struct uffd_msg` (32 bytes: `u8 event`, 7 reserved bytes, then the argument union).
fn parse_msg(b: &[u8]) -> Event {
    let event = u32::from(b[0]);
    let arg = &b[8..MSG_SIZE];
    match event {
        uapi::UFFD_EVENT_PAGEFAULT => {
            let flags = u64_at(arg, 0);
            Event::Pagefault {
                address: u64_at(arg, 8),
                flags: FaultFlags {
                    write: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                    wp: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WP) != 0,
                    minor: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_MINOR) != 0,
                },
                thread_id: u32_at(arg, 16),
            }
        }
        uapi::UFFD_EVENT_FORK => {
            // The kernel installed a new descriptor in our table and passes its number.
            match RawFd::try_from(u32_at(arg, 0)) {
                // SAFETY: the kernel just created this descriptor for us and nothing else owns it.
                Ok(fd) => Event::Fork { uffd: unsafe { OwnedFd::from_raw_fd(fd) } },
                Err(_) => Event::Unknown { event: b[0] },
            }
        }
        uapi::UFFD_EVENT_REMAP => {
            Event::Remap { from: u64_at(arg, 0), to: u64_at(arg, 8), len: u64_at(arg, 16) }
        }
        uapi::UFFD_EVENT_REMOVE => Event::Remove { start: u64_at(arg, 0), end: u64_at(arg, 8) },
        uapi::UFFD_EVENT_UNMAP => Event::Unmap { start: u64_at(arg, 0), end: u64_at(arg, 8) },
        _ => Event::Unknown { event: b[0] },
    }
}

/// A userfaultfd descriptor (non-blocking, close-on-exec). See the [module docs](self).
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
}

impl fmt::Debug for Uffd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uffd").field("fd", &self.fd.as_raw_fd()).field("features", &self.features).finish()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Creates a descriptor without the handshake: `/dev/userfaultfd` first, then the system call.
fn create() -> io::Result<OwnedFd> {
    let flags = OFlags::CLOEXEC | OFlags::NONBLOCK;
    let dev_error = match rustix::fs::open("/dev/userfaultfd", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
    {
        Ok(dev) => {
            // No UFFD_USER_MODE_ONLY: kernel-mode accesses fault to the handler too.
            let arg = std::ptr::without_provenance_mut(flags.bits() as usize);
            // SAFETY: USERFAULTFD_IOC_NEW takes the open flags as an integer and returns a new
            // descriptor; it touches no memory of ours.
            match unsafe { raw_ioctl(dev.as_fd(), USERFAULTFD_IOC_NEW, arg) } {
                // SAFETY: the return value is a descriptor the kernel just created for us.
                Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(e) => io::Error::from(e),
            }
        }
        Err(e) => io::Error::from(e),
    };
    let uflags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
    // SAFETY: creating the descriptor has no effect on memory; what it can do later is guarded by
    // the registration rules of this module.
    unsafe { rustix::mm::userfaultfd(uflags) }.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "userfaultfd is unavailable: /dev/userfaultfd failed ({dev_error}) and the system call \
                 failed ({e}); it needs privilege (root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)"
            ),
        )
    })
}

/// Runs the `UFFDIO_API` handshake asking for `features`.
fn handshake(fd: BorrowedFd<'_>, features: Features) -> io::Result<Api> {
    let mut api = uapi::uffdio_api { api: u64::from(uapi::UFFD_API), features: features.0, ioctls: 0 };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api` and touches no other memory.
    unsafe { uffd_ioctl(fd, nr::UFFDIO_API, &mut api) }.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("the UFFDIO_API handshake for {features:?} failed: {e}"),
        )
    })?;
    Ok(Api { features: Features(api.features), ioctls: Ioctls(api.ioctls) })
}

fn errno_error(what: &str, e: Errno) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what} failed: {e}"))
}

impl Uffd {
    /// Reports every feature and ioctl the kernel offers (a handshake on a throwaway descriptor,
    /// since a descriptor takes only one handshake).
    ///
    /// # Errors
    /// When userfaultfd cannot be opened here (not built in, or no privilege).
    pub fn probe() -> io::Result<Api> {
        let fd = create()?;
        handshake(fd.as_fd(), Features::NONE)
    }

    /// Creates a descriptor with exactly `features` enabled (a subset of what [`Uffd::probe`]
    /// reports).
    ///
    /// # Errors
    /// When userfaultfd cannot be opened or the kernel rejects a feature.
    pub fn open(features: Features) -> io::Result<Self> {
        let fd = create()?;
        handshake(fd.as_fd(), features)?;
        Ok(Self { fd, features })
    }

    /// Wraps a descriptor received from elsewhere (another process over `SCM_RIGHTS`), after
    /// checking that it is a userfaultfd. The sender did the handshake and the registration; the
    /// enabled features are not known here ([`Uffd::features`] is empty).
    ///
    /// # Errors
    /// `InvalidInput` when the descriptor is not a userfaultfd.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {} is {} and not a userfaultfd", fd.as_raw_fd(), link.display()),
            ));
        }
        Ok(Self { fd, features: Features::NONE })
    }

    /// The features enabled at [`Uffd::open`].
    #[must_use]
    pub fn features(&self) -> Features {
        self.features
    }

    /// A new owned descriptor for the same userfaultfd (to send it to another process).
    ///
    /// # Errors
    /// The `dup` error.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Registers the whole of `mapping` for `mode` faults; returns the ioctls the range supports.
    ///
    /// # Errors
    /// The `UFFDIO_REGISTER` error (`EINVAL` for a mode the features do not allow).
    pub fn register(&self, mapping: &AnonMapping, mode: RegisterMode) -> io::Result<Ioctls> {
        // SAFETY: an `AnonMapping`'s bytes are only accessed through volatile copies, system calls
        // and raw pointers whose users accept that they change (see `region_map`), so letting this
        // descriptor fill and protect them is sound.
        unsafe { self.register_range(mapping.addr(), mapping.len() as u64, mode) }
    }

    /// Registers `start..start + len` (page-aligned) for `mode` faults.
    ///
    /// # Safety
    /// The range must be memory that no Rust reference covers and whose users tolerate its pages
    /// being filled (`COPY`, `ZEROPAGE`), poisoned or write-protected by this descriptor, and
    /// faults in it blocking until served.
    ///
    /// # Errors
    /// The `UFFDIO_REGISTER` error.
    pub unsafe fn register_range(&self, start: u64, len: u64, mode: RegisterMode) -> io::Result<Ioctls> {
        let mut reg =
            uapi::uffdio_register { range: uapi::uffdio_range { start, len }, mode: mode.0, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`; the caller vouches for the range.
        unsafe { uffd_ioctl(self.fd.as_fd(), nr::UFFDIO_REGISTER, &mut reg) }
            .map_err(|e| errno_error(&format!("registering {len} bytes at {start:#x} for {mode:?}"), e))?;
        Ok(Ioctls(reg.ioctls))
    }

    /// Installs `src` at `dst` (page-aligned, `src.len()` a multiple of the page size), page by
    /// page, never overwriting a page that is present: such pages are skipped and counted in
    /// [`CopyReport::existing`]. A partial copy (`EAGAIN`) is retried for the remainder. Threads
    /// waiting on the range are woken unless `mode.dont_wake`.
    ///
    /// # Errors
    /// The first other error (`ENOENT` for a range that is no longer registered, `ENOMEM`, ...);
    /// `WouldBlock` if the kernel kept answering `EAGAIN` without progress.
    pub fn copy(&self, dst: u64, src: &[u8], mode: CopyMode) -> io::Result<CopyReport> {
        let page = page_size() as u64;
        let mut bits = 0u64;
        if mode.write_protect {
            bits |= u64::from(uapi::UFFDIO_COPY_MODE_WP);
        }
        if mode.dont_wake {
            bits |= u64::from(uapi::UFFDIO_COPY_MODE_DONTWAKE);
        }
        let len = src.len() as u64;
        let mut report = CopyReport::default();
        let mut done = 0u64;
        let mut stalls = 0u32;
        while done < len {
            let off = usize::try_from(done).expect("offsets within a slice fit in usize");
            let mut arg = uapi::uffdio_copy {
                dst: dst + done,
                src: src[off..].as_ptr() as u64,
                len: len - done,
                mode: bits,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; the kernel reads `len - done`
            // bytes of `src` (live for the call) and writes only missing pages of ranges
            // registered with this descriptor.
            let result = unsafe { uffd_ioctl(self.fd.as_fd(), nr::UFFDIO_COPY, &mut arg) };
            let progressed = u64::try_from(arg.copy).unwrap_or(0);
            match result {
                Ok(_) => {
                    report.copied += len - done;
                    done = len;
                }
                Err(Errno::AGAIN) if progressed > 0 => {
                    report.copied += progressed;
                    done += progressed;
                    stalls = 0;
                }
                Err(Errno::AGAIN) => {
                    stalls += 1;
                    if stalls > 1000 {
                        return Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            format!("UFFDIO_COPY at {:#x} made no progress (EAGAIN)", dst + done),
                        ));
                    }
                    std::thread::yield_now();
                }
                Err(Errno::EXIST) => {
                    // The page at `dst + done` is present: leave it and go on after it.
                    report.existing += page.min(len - done);
                    done += page;
                }
                Err(e) => {
                    return Err(errno_error(
                        &format!("UFFDIO_COPY of {} bytes at {:#x}", len - done, dst + done),
                        e,
                    ));
                }
            }
        }
        if report.existing > 0 && !mode.dont_wake {
            // Pages skipped as present were not woken by the kernel; a waiter on them (a fault that
            // raced with whoever installed them) must not sleep on.
            self.wake(dst, len)?;
        }
        Ok(report)
    }

    /// Maps the shared zero page at the missing pages of `start..start + len`. Returns the bytes
    /// mapped; present pages are skipped as with [`Uffd::copy`].
    ///
    /// # Errors
    /// As [`Uffd::copy`].
    pub fn zeropage(&self, start: u64, len: u64, dont_wake: bool) -> io::Result<u64> {
        let page = page_size() as u64;
        let mode = if dont_wake { u64::from(uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE) } else { 0 };
        let mut done = 0;
        let mut mapped = 0;
        let mut stalls = 0u32;
        while done < len {
            let mut arg = uapi::uffdio_zeropage {
                range: uapi::uffdio_range { start: start + done, len: len - done },
                mode,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage` and maps only missing
            // pages of ranges registered with this descriptor.
            let result = unsafe { uffd_ioctl(self.fd.as_fd(), nr::UFFDIO_ZEROPAGE, &mut arg) };
            let progressed = u64::try_from(arg.zeropage).unwrap_or(0);
            match result {
                Ok(_) => {
                    mapped += len - done;
                    done = len;
                }
                Err(Errno::AGAIN) if progressed > 0 => {
                    mapped += progressed;
                    done += progressed;
                }
                Err(Errno::AGAIN) if stalls < 1000 => {
                    stalls += 1;
                    std::thread::yield_now();
                }
                Err(Errno::EXIST) => done += page,
                Err(e) => return Err(errno_error("UFFDIO_ZEROPAGE", e)),
            }
        }
        Ok(mapped)
    }

    /// Wakes threads waiting on faults in `start..start + len` (they retry the access).
    ///
    /// # Errors
    /// The `UFFDIO_WAKE` error.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = uapi::uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range` and changes no memory.
        unsafe { uffd_ioctl(self.fd.as_fd(), nr::UFFDIO_WAKE, &mut range) }
            .map_err(|e| errno_error("UFFDIO_WAKE", e))?;
        Ok(())
    }

    /// Write-protects (`protect`) or un-protects the present pages of `start..start + len`.
    /// Un-protecting wakes threads waiting on write-protect faults there unless `dont_wake`.
    ///
    /// # Errors
    /// The `UFFDIO_WRITEPROTECT` error.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool, dont_wake: bool) -> io::Result<()> {
        let mut mode = 0;
        if protect {
            mode |= WRITEPROTECT_MODE_WP;
        }
        if dont_wake {
            mode |= WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = uapi::uffdio_writeprotect { range: uapi::uffdio_range { start, len }, mode };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect` and only changes page
        // protection within ranges registered with this descriptor.
        unsafe { uffd_ioctl(self.fd.as_fd(), nr::UFFDIO_WRITEPROTECT, &mut arg) }
            .map_err(|e| errno_error("UFFDIO_WRITEPROTECT", e))?;
        Ok(())
    }

    /// Marks the missing pages of `start..start + len` poisoned: an access raises SIGBUS instead
    /// of faulting to the handler, until the pages are dropped (`MADV_DONTNEED`) or filled by a
    /// later [`Uffd::copy`] (which replaces the marker). Wakes waiters.
    ///
    /// # Errors
    /// The `UFFDIO_POISON` error (`EINVAL` without the `POISON` feature).
    pub fn poison(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = uapi::uffdio_poison { range: uapi::uffdio_range { start, len }, mode: 0, updated: 0 };
        // SAFETY: UFFDIO_POISON takes a `struct uffdio_poison` and only installs poison markers in
        // missing pages of ranges registered with this descriptor.
        match unsafe { uffd_ioctl(self.fd.as_fd(), UFFDIO_POISON, &mut arg) } {
            Ok(_) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(errno_error("UFFDIO_POISON", e)),
        }
    }

    /// Reads pending messages into `out` without blocking; returns how many were read (0 when
    /// none is pending).
    ///
    /// # Errors
    /// The `read` error.
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> io::Result<usize> {
        let mut buf = [0u8; MSG_SIZE * 16];
        let want = max.clamp(1, 16) * MSG_SIZE;
        match rustix::io::read(&self.fd, &mut buf[..want]) {
            Ok(n) => {
                let count = n / MSG_SIZE;
                out.extend(buf[..count * MSG_SIZE].chunks_exact(MSG_SIZE).map(parse_msg));
                Ok(count)
            }
            Err(Errno::AGAIN) => Ok(0),
            Err(e) => Err(errno_error("reading userfaultfd events", e)),
        }
    }
}

/// `/proc/self/pagemap`, for `PAGEMAP_SCAN` and page presence.
#[derive(Debug)]
pub struct PageMap {
    fd: OwnedFd,
    regions: std::sync::Mutex<Vec<uapi::page_region>>,
}

impl PageMap {
    /// Opens this process's pagemap.
    ///
    /// # Errors
    /// The `open` error.
    pub fn open_self() -> io::Result<Self> {
        let fd = rustix::fs::open("/proc/self/pagemap", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        let empty = uapi::page_region { start: 0, end: 0, categories: 0 };
        Ok(Self { fd, regions: std::sync::Mutex::new(vec![empty; 1024]) })
    }

    /// Appends to `out` the pages of `mapping[range]` written since they were last
    /// write-protected, as byte ranges relative to the mapping (adjacent pages merged). With
    /// `reprotect`, the same walk write-protects them again (`PM_SCAN_WP_MATCHING`), atomically
    /// per page, so every write is reported by exactly one scan. The range must be registered
    /// for write-protect with `WP_ASYNC` (`PM_SCAN_CHECK_WPASYNC` makes the call fail otherwise).
    ///
    /// # Errors
    /// `InvalidInput` for a range outside the mapping; the `PAGEMAP_SCAN` error (`EPERM` where
    /// the range is not under asynchronous write-protect).
    pub fn scan_written(
        &self,
        mapping: &AnonMapping,
        range: Range<usize>,
        reprotect: bool,
        out: &mut Vec<Range<usize>>,
    ) -> io::Result<()> {
        if range.start > range.end || range.end > mapping.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("scan range {range:?} is outside the mapping ({} bytes)", mapping.len()),
            ));
        }
        let base = mapping.addr();
        let end = base + range.end as u64;
        let mut start = base + range.start as u64;
        let mut regions = self.regions.lock().expect("pagemap scan buffer lock");
        let flags = if reprotect {
            u64::from(uapi::PM_SCAN_WP_MATCHING | uapi::PM_SCAN_CHECK_WPASYNC)
        } else {
            u64::from(uapi::PM_SCAN_CHECK_WPASYNC)
        };
        while start < end {
            let mut arg = uapi::pm_scan_arg {
                size: size_of::<uapi::pm_scan_arg>() as u64,
                flags,
                start,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: u64::from(uapi::PAGE_IS_WRITTEN),
                category_anyof_mask: 0,
                return_mask: u64::from(uapi::PAGE_IS_WRITTEN),
            };
            // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` whose `vec` points at `vec_len`
            // writable `page_region`s (the locked buffer); with WP_MATCHING it only changes the
            // write-protect bits of pages in the mapping's range, which is registered for
            // asynchronous write-protect (checked by the kernel with CHECK_WPASYNC).
            let n = unsafe { uffd_ioctl(self.fd.as_fd(), PAGEMAP_SCAN, &mut arg) }
                .map_err(|e| errno_error("PAGEMAP_SCAN", e))?;
            let n = usize::try_from(n).unwrap_or(0).min(regions.len());
            for r in &regions[..n] {
                let (s, e) = (to_usize(r.start - base), to_usize(r.end - base));
                match out.last_mut() {
                    Some(last) if last.end == s => last.end = e,
                    _ => out.push(s..e),
                }
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(())
    }

    /// Whether the page holding `mapping[off]` is missing: neither present nor swapped out, so an
    /// access faults to a missing-page handler.
    ///
    /// # Errors
    /// `InvalidInput` past the end; the `pread` error.
    pub fn is_missing(&self, mapping: &AnonMapping, off: usize) -> io::Result<bool> {
        if off >= mapping.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "offset past the end of the mapping"));
        }
        let page = (mapping.addr() + off as u64) / page_size() as u64;
        let mut entry = [0u8; 8];
        let n = rustix::io::pread(&self.fd, &mut entry, page * 8)?;
        if n != 8 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read of /proc/self/pagemap"));
        }
        let bits = u64::from_ne_bytes(entry);
        Ok(bits & (3 << 62) == 0)
    }
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("mapping offsets fit in usize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available() -> Option<Api> {
        match Uffd::probe() {
            Ok(api) => Some(api),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    #[test]
    fn opcodes_match_the_kernel_headers() {
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn probe_reports_features() {
        let Some(api) = available() else { return };
        assert!(api.ioctls.contains(Ioctls::REGISTER | Ioctls::API), "{api:?}");
        assert!(!api.features.names().is_empty());
    }

    #[test]
    fn copy_fills_missing_pages_and_never_overwrites() {
        let Some(api) = available() else { return };
        let uffd = Uffd::open(Features::NONE).unwrap();
        let page = page_size();
        let m = AnonMapping::new(4 * page).unwrap();
        let ioctls = uffd.register(&m, RegisterMode::MISSING).unwrap();
        assert!(ioctls.contains(Ioctls::COPY | Ioctls::WAKE), "{ioctls:?} of {api:?}");
        let one = vec![1u8; page];
        let r = uffd.copy(m.addr() + page as u64, &one, CopyMode::default()).unwrap();
        assert_eq!(r, CopyReport { copied: page as u64, existing: 0 });
        let all = vec![2u8; 4 * page];
        let r = uffd.copy(m.addr(), &all, CopyMode::default()).unwrap();
        assert_eq!(r, CopyReport { copied: 3 * page as u64, existing: page as u64 });
        assert_eq!(m.read_u8(page).unwrap(), 1);
        assert_eq!(m.read_u8(0).unwrap(), 2);
        assert_eq!(m.read_u8(3 * page).unwrap(), 2);
        // A missing page again after discard: a fault would now block, so fill before reading.
        m.discard(0, page).unwrap();
        assert_eq!(uffd.zeropage(m.addr(), page as u64, false).unwrap(), page as u64);
        assert_eq!(m.read_u8(0).unwrap(), 0);
        let mut events = Vec::new();
        assert_eq!(uffd.read_events(&mut events, 4).unwrap(), 0);
    }

    #[test]
    fn faults_are_reported_and_served_from_another_thread() {
        if available().is_none() {
            return;
        }
        let uffd = Uffd::open(Features::NONE).unwrap();
        let page = page_size();
        let m = AnonMapping::new(2 * page).unwrap();
        uffd.register(&m, RegisterMode::MISSING).unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(|| m.read_u8(page + 5).unwrap());
            // The descriptor becomes readable when the fault is reported; a minute without is a
            // hang (and the reader would stay blocked, so fail loudly rather than wait).
            let mut pollfd = libc::pollfd { fd: uffd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `pollfd` is one valid, writable entry, and the descriptor stays open during
            // the call.
            let ready = unsafe { libc::poll(&raw mut pollfd, 1, 60_000) };
            if ready != 1 {
                // Let the reader go so that the scope can end and the test fail instead of hang.
                let _ = uffd.zeropage(m.addr() + page as u64, page as u64, false);
                panic!("no fault reported within a minute (poll returned {ready})");
            }
            let mut events = Vec::new();
            assert_eq!(uffd.read_events(&mut events, 1).unwrap(), 1);
            let Event::Pagefault { address, flags, .. } = events[0] else { panic!("{:?}", events[0]) };
            assert_eq!(address, m.addr() + page as u64);
            assert!(!flags.write && !flags.wp);
            uffd.copy(address, &vec![42u8; page], CopyMode::default()).unwrap();
            assert_eq!(reader.join().unwrap(), 42);
        });
    }

    #[test]
    fn async_write_protect_reports_written_pages_once() {
        let Some(api) = available() else { return };
        if !api.features.contains(Features::WP_ASYNC) {
            eprintln!("skipped: no WP_ASYNC");
            return;
        }
        let uffd = Uffd::open(Features::PAGEFAULT_FLAG_WP | Features::WP_ASYNC).unwrap();
        let page = page_size();
        let m = AnonMapping::new(16 * page).unwrap();
        uffd.register(&m, RegisterMode::MISSING | RegisterMode::WP).unwrap();
        let mode = CopyMode { write_protect: true, dont_wake: false };
        uffd.copy(m.addr(), &vec![0u8; 16 * page], mode).unwrap();
        let pagemap = PageMap::open_self().unwrap();
        let mut out = Vec::new();
        pagemap.scan_written(&m, 0..m.len(), true, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        m.write_u8(3 * page + 1, 1).unwrap();
        m.write_u8(4 * page, 1).unwrap();
        m.write_u8(9 * page + 100, 1).unwrap();
        pagemap.scan_written(&m, 0..m.len(), true, &mut out).unwrap();
        assert_eq!(out, vec![3 * page..5 * page, 9 * page..10 * page]);
        out.clear();
        pagemap.scan_written(&m, 0..m.len(), true, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        assert!(!pagemap.is_missing(&m, 0).unwrap());
        m.discard(0, page).unwrap();
        assert!(pagemap.is_missing(&m, 0).unwrap());
    }

    #[test]
    fn poison_makes_the_page_fail_instead_of_faulting() {
        let Some(api) = available() else { return };
        if !api.features.contains(Features::POISON) {
            return;
        }
        let uffd = Uffd::open(Features::POISON).unwrap();
        let m = AnonMapping::new(page_size()).unwrap();
        uffd.register(&m, RegisterMode::MISSING).unwrap();
        uffd.poison(m.addr(), page_size() as u64).unwrap();
        // Accessing it now raises SIGBUS (tested in r3map-region in a child process). A COPY
        // replaces the poison marker: the page can be recovered once its data is there.
        let r = uffd.copy(m.addr(), &vec![1u8; page_size()], CopyMode::default()).unwrap();
        assert_eq!(r.copied, page_size() as u64);
        assert_eq!(m.read_u8(0).unwrap(), 1);
    }

    #[test]
    fn from_fd_rejects_other_descriptors() {
        let f = tempfile::tempfile().unwrap();
        let err = Uffd::from_fd(OwnedFd::from(f)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        if available().is_some() {
            let uffd = Uffd::open(Features::NONE).unwrap();
            Uffd::from_fd(uffd.try_clone_fd().unwrap()).unwrap();
        }
    }
}
