//! The chunk pipeline: lazy copy-on-read ([`Synced`]), background pull ([`Puller`]) and
//! background write-back ([`Pusher`]).

pub mod puller;
pub mod pusher;
pub mod synced;

pub use puller::Puller;
pub use pusher::Pusher;
pub use synced::Synced;

#[cfg(test)]
pub(crate) mod testutil;
