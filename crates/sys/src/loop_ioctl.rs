//! Binding a loop device to a file with the loop driver's ioctls (`linux/loop.h`), without
//! `losetup`: for measuring a loop device's own cost next to r3map's devices.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;

fn call(device: BorrowedFd<'_>, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: both requests take their argument by value (a descriptor, or nothing), so the kernel
    // reads no memory through it; `device` is open for the duration of the call.
    let r = unsafe { libc::ioctl(device.as_raw_fd(), request, arg) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Binds the loop device `device` to the open file `backing`.
///
/// # Errors
/// `EBUSY` when the device is bound already; `ENOTTY` for a file that is no loop device.
pub fn set_fd(device: BorrowedFd<'_>, backing: BorrowedFd<'_>) -> io::Result<()> {
    let fd = libc::c_ulong::try_from(backing.as_raw_fd())
        .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    call(device, LOOP_SET_FD, fd)
}

/// Unbinds the loop device (the kernel lets go once nothing has it open).
///
/// # Errors
/// `ENXIO` when it is not bound.
pub fn clear_fd(device: BorrowedFd<'_>) -> io::Result<()> {
    call(device, LOOP_CLR_FD, 0)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn a_file_that_is_no_loop_device_is_refused() {
        let f = tempfile::tempfile().unwrap();
        let e = set_fd(f.as_fd(), f.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    }
}
