//! Error codes on the wire: Linux errno values, as NBD uses them, with a message beside them.

use std::io;

pub const EPERM: u32 = 1;
pub const ENOENT: u32 = 2;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const EOPNOTSUPP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;
pub const ETIMEDOUT: u32 = 110;
pub const EBADMSG: u32 = 74;

/// The code that stands for `e` on the wire.
#[must_use]
pub fn from_io(e: &io::Error) -> u32 {
    use io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => EPERM,
        K::NotFound => ENOENT,
        K::OutOfMemory => ENOMEM,
        K::InvalidInput => EINVAL,
        K::StorageFull | K::QuotaExceeded => ENOSPC,
        K::Unsupported => EOPNOTSUPP,
        K::TimedOut => ETIMEDOUT,
        K::InvalidData | K::UnexpectedEof => EBADMSG,
        _ => EIO,
    }
}

/// The error a client reports for `code`, with the server's message.
#[must_use]
pub fn to_io(code: u32, message: &str) -> io::Error {
    use io::ErrorKind as K;
    let kind = match code {
        EPERM => K::PermissionDenied,
        ENOENT => K::NotFound,
        ENOMEM => K::OutOfMemory,
        EINVAL | EOVERFLOW => K::InvalidInput,
        ENOSPC => K::StorageFull,
        EOPNOTSUPP => K::Unsupported,
        ETIMEDOUT => K::TimedOut,
        EBADMSG => K::InvalidData,
        ESHUTDOWN => K::ConnectionAborted,
        _ => K::Other,
    };
    io::Error::new(kind, format!("the server answered: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_survive_the_wire() {
        for kind in [
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::NotFound,
            io::ErrorKind::InvalidInput,
            io::ErrorKind::StorageFull,
            io::ErrorKind::Unsupported,
            io::ErrorKind::TimedOut,
            io::ErrorKind::InvalidData,
        ] {
            let code = from_io(&io::Error::new(kind, "x"));
            assert_eq!(to_io(code, "x").kind(), kind, "{kind:?}");
        }
        assert_eq!(from_io(&io::Error::other("disk on fire")), EIO);
    }
}
