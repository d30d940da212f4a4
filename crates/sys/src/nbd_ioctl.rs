//! The kernel NBD driver's ioctls (`linux/nbd.h`): the older way to configure `/dev/nbdN`, for
//! kernels without the generic-netlink interface. Every request takes an integer by value (a
//! size, a flag word, a descriptor), never a pointer, so each wrapper is safe to call with any
//! value: the kernel checks them and answers `EINVAL` or `EBUSY`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `_IO(0xab, nr)`.
const fn nbd_io(nr: u32) -> u32 {
    (0xab << 8) | nr
}

const NBD_SET_SOCK: u32 = nbd_io(0);
const NBD_SET_BLKSIZE: u32 = nbd_io(1);
const NBD_DO_IT: u32 = nbd_io(3);
const NBD_CLEAR_SOCK: u32 = nbd_io(4);
const NBD_SET_SIZE_BLOCKS: u32 = nbd_io(7);
const NBD_DISCONNECT: u32 = nbd_io(8);
const NBD_SET_TIMEOUT: u32 = nbd_io(9);
const NBD_SET_FLAGS: u32 = nbd_io(10);

fn call(device: BorrowedFd<'_>, request: u32, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the NBD requests take their argument by value (the kernel reads no memory through
    // it); `device` is an open descriptor for the duration of the call.
    let r = unsafe { libc::ioctl(device.as_raw_fd(), libc::c_ulong::from(request), arg) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Adds a connection: `socket` (a connected stream socket) is one more socket of the device.
///
/// # Errors
/// `EBUSY` when the device is in use by another configuration.
pub fn set_sock(device: BorrowedFd<'_>, socket: BorrowedFd<'_>) -> io::Result<()> {
    let fd =
        libc::c_ulong::try_from(socket.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    call(device, NBD_SET_SOCK, fd)
}

/// Sets the logical block size (512 to 4096, a power of two).
///
/// # Errors
/// `EINVAL` for a bad size, `EBUSY` while the device runs.
pub fn set_block_size(device: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    call(device, NBD_SET_BLKSIZE, bytes)
}

/// Sets the size in blocks of the block size set before.
///
/// # Errors
/// `EINVAL` for an overflowing size.
pub fn set_size_blocks(device: BorrowedFd<'_>, blocks: u64) -> io::Result<()> {
    call(device, NBD_SET_SIZE_BLOCKS, blocks)
}

/// Sets the request timeout in seconds (0: the kernel's default).
///
/// # Errors
/// As the kernel answers.
pub fn set_timeout(device: BorrowedFd<'_>, seconds: u64) -> io::Result<()> {
    call(device, NBD_SET_TIMEOUT, seconds)
}

/// Sets the export's transmission flags (read-only, flush, trim...).
///
/// # Errors
/// As the kernel answers.
pub fn set_flags(device: BorrowedFd<'_>, flags: u64) -> io::Result<()> {
    call(device, NBD_SET_FLAGS, flags)
}

/// Starts the device and blocks until it is disconnected (by [`disconnect`], or when its sockets
/// close).
///
/// # Errors
/// `EINVAL` without sockets, `EBUSY` when it already runs; the ending connection's error.
pub fn do_it(device: BorrowedFd<'_>) -> io::Result<()> {
    call(device, NBD_DO_IT, 0)
}

/// Asks the device to disconnect: [`do_it`] returns once the requests in flight are done.
///
/// # Errors
/// As the kernel answers.
pub fn disconnect(device: BorrowedFd<'_>) -> io::Result<()> {
    call(device, NBD_DISCONNECT, 0)
}

/// Drops the device's sockets, after [`do_it`] returned.
///
/// # Errors
/// As the kernel answers.
pub fn clear_sock(device: BorrowedFd<'_>) -> io::Result<()> {
    call(device, NBD_CLEAR_SOCK, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_those_of_linux_nbd_h() {
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_DO_IT, 0xab03);
        assert_eq!(NBD_SET_SIZE_BLOCKS, 0xab07);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
    }

    #[test]
    fn a_file_that_is_no_nbd_device_is_refused() {
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd as _;
        let e = set_block_size(f.as_fd(), 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    }
}
