//! Mounts: a [`Backend`](r3map_core::Backend) (a remote, a store, a file) as a local file, a
//! block device or a memory slice, as the original r3map's mount API offered them.
//!
//! - A **direct** mount serves the backend as it is: every access goes to it.
//! - A **managed** mount puts a local cache in front ([`Synced`](r3map_core::Synced)): chunks are
//!   pulled on first access and in the background ([`Puller`](r3map_core::Puller)), writes go to
//!   the cache and are pushed in the background ([`Pusher`](r3map_core::Pusher)). The pull starts
//!   before the frontend, so it runs while the frontend is set up.
//!
//! Each gives a path ([`Mount::path`]: the file, or the block device with `loop_device`), an open
//! file ([`Mount::open_file`]) or a mapped slice ([`Mount::map`]). The frontend is FUSE (a
//! single-file filesystem); the kernel NBD device and userfaultfd regions come as later frontends.
//!
//! # Layout
//! - [`mount`]: [`Mount`], its options and hooks, [`Mapping`].
//! - [`loopdev`]: loop devices over mount files.

pub mod loopdev;
pub mod mount;

pub use loopdev::LoopDevice;
pub use mount::{Frontend, Hook, Hooks, ManagedOptions, Mapping, Mount, MountOptions};
pub use r3map_fuse::FuseOptions;
