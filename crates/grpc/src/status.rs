//! Errors across the wire: [`io::Error`] kinds to gRPC status codes on the server, and back on the
//! client.

use std::error::Error as StdError;
use std::io;

use tonic::{Code, Status};

/// The status the server answers for a backend or seeder error: the kind picks the code, the
/// error's message is sent as the status message.
pub(crate) fn status_from_io(err: &io::Error) -> Status {
    use io::ErrorKind as K;
    let code = match err.kind() {
        K::InvalidInput => Code::InvalidArgument,
        K::PermissionDenied | K::ReadOnlyFilesystem => Code::PermissionDenied,
        K::Unsupported => Code::Unimplemented,
        K::NotFound => Code::NotFound,
        K::AlreadyExists => Code::AlreadyExists,
        K::TimedOut => Code::DeadlineExceeded,
        K::StorageFull | K::QuotaExceeded | K::OutOfMemory => Code::ResourceExhausted,
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::BrokenPipe
        | K::NetworkDown
        | K::NetworkUnreachable
        | K::HostUnreachable
        | K::WouldBlock
        | K::Interrupted => Code::Unavailable,
        K::InvalidData | K::UnexpectedEof => Code::DataLoss,
        _ => Code::Internal,
    };
    Status::new(code, err.to_string())
}

/// The error a client call returns for a status the server answered (or the transport made up):
/// `what` names the call ("ReadAt of 4096 bytes at offset 0 from http://..."), the status message
/// follows.
pub(crate) fn io_from_status(status: &Status, what: &str) -> io::Error {
    use io::ErrorKind as K;
    let kind = match status.code() {
        // The range checks of the Backend contract are InvalidInput, whichever code said it.
        Code::InvalidArgument | Code::OutOfRange => K::InvalidInput,
        Code::PermissionDenied | Code::Unauthenticated => K::PermissionDenied,
        Code::Unimplemented => K::Unsupported,
        Code::NotFound => K::NotFound,
        Code::AlreadyExists => K::AlreadyExists,
        Code::DeadlineExceeded => K::TimedOut,
        // tonic's own client-side deadline reports itself as Cancelled.
        Code::Cancelled if status.message() == tonic::TimeoutExpired(()).to_string() => K::TimedOut,
        // Any other cancellation of a call this client made: the server or the connection dropped
        // it (a server shutting down resets its streams).
        Code::Cancelled => K::ConnectionAborted,
        Code::ResourceExhausted => K::QuotaExceeded,
        Code::Unavailable => K::NotConnected,
        Code::DataLoss => K::InvalidData,
        _ => K::Other,
    };
    let message = status.message();
    let message = if message.is_empty() { "no message" } else { message };
    io::Error::new(kind, format!("{what} failed with gRPC status {:?}: {message}", status.code()))
}

/// An error of the transport (binding, TLS set-up, connecting), with the kind of the innermost
/// [`io::Error`] in its chain when there is one.
pub(crate) fn io_from_transport(err: &(dyn StdError + 'static), what: &str) -> io::Error {
    let mut kind = io::ErrorKind::Other;
    let mut text = err.to_string();
    let mut source = err.source();
    if let Some(e) = err.downcast_ref::<io::Error>() {
        kind = e.kind();
    }
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<io::Error>() {
            kind = e.kind();
        }
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    io::Error::new(kind, format!("{what}: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_survive_a_round_trip_through_a_status() {
        use io::ErrorKind as K;
        for kind in [K::InvalidInput, K::PermissionDenied, K::Unsupported, K::NotFound, K::TimedOut] {
            let status = status_from_io(&io::Error::new(kind, "the backend said no"));
            let back = io_from_status(&status, "ReadAt of 1 byte at offset 0");
            assert_eq!(back.kind(), kind, "{back}");
            assert!(back.to_string().contains("the backend said no"), "{back}");
            assert!(back.to_string().starts_with("ReadAt of 1 byte at offset 0 failed"), "{back}");
        }
    }

    #[test]
    fn codes_map_as_documented() {
        assert_eq!(status_from_io(&io::Error::other("x")).code(), Code::Internal);
        assert_eq!(status_from_io(&io::ErrorKind::ConnectionReset.into()).code(), Code::Unavailable);
        assert_eq!(io_from_status(&Status::out_of_range("past"), "r").kind(), io::ErrorKind::InvalidInput);
        assert_eq!(io_from_status(&Status::unavailable("down"), "r").kind(), io::ErrorKind::NotConnected);
        assert_eq!(
            io_from_status(&Status::cancelled("Timeout expired"), "r").kind(),
            io::ErrorKind::TimedOut
        );
        assert_eq!(io_from_status(&Status::cancelled("gone"), "r").kind(), io::ErrorKind::ConnectionAborted);
        assert!(io_from_status(&Status::internal(""), "r").to_string().contains("no message"));
    }

    #[test]
    fn transport_errors_keep_the_inner_io_kind() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused"));
        let io = io_from_transport(&err, "cannot connect to http://127.0.0.1:1");
        assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            io.to_string(),
            "cannot connect to http://127.0.0.1:1: transport error: connection refused"
        );
    }
}
