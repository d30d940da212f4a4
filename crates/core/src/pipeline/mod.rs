//! The chunk pipeline: lazy copy-on-read ([`Synced`]) into a local [`Cache`], background pull
//! ([`Puller`]) and background write-back ([`Pusher`]), and the stack of all three ([`Managed`]).

pub mod cache;
pub mod managed;
pub mod puller;
pub mod pusher;
pub mod synced;

pub use cache::{Cache, Fault};
pub use managed::{Managed, ManagedOptions};
pub use puller::Puller;
pub use pusher::Pusher;
pub use synced::Synced;

use std::io;

/// Checks the worker options shared by the puller and the pusher.
fn check_workers(what: &str, depth: usize, request_size: u64, chunk_size: u64) -> io::Result<()> {
    if depth == 0 || request_size < chunk_size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the {what} needs a depth of at least 1 (got {depth}) and requests of at least one chunk \
                 ({chunk_size} bytes, got {request_size})"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil;
