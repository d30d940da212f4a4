//! The core of r3map: the [`Backend`] trait, local backends, layers that wrap a backend and do
//! one thing each, and the chunk pipeline that makes a remote resource usable locally
//! (lazy copy-on-read, background pull in priority order, background push of dirty chunks).
//!
//! It does not talk to the kernel (userfaultfd, FUSE, NBD devices) or the network: those are
//! frontends and transports built on this crate.
//!
//! # Layout
//! - [`backend`]: the trait, capabilities and range checks.
//! - [`geometry`]: chunk geometry and the [`Chunk`] index newtype; [`bitmap`]: atomic bitmaps.
//! - [`backends`]: local storage: [`Memory`], [`File`], [`Dir`].
//! - [`layers`]: wrappers named by effect: [`Aligned`], [`Chunked`], [`Tracked`], [`Locked`],
//!   [`Delay`], [`FaultInject`].
//! - [`pipeline`]: [`Synced`] (lazy copy-on-read with per-chunk state), [`Puller`] (background
//!   pull) and [`Pusher`] (background write-back).
//! - [`seeder`]: the [`Seeder`] trait, the source side of a migration.
//! - [`conformance`]: the suite every backend and layer stack passes.

pub mod backend;
pub mod backends;
pub mod bitmap;
pub mod conformance;
pub mod geometry;
pub mod layers;
pub mod pipeline;
pub mod seeder;
pub mod units;

pub use backend::{Backend, Capabilities, Extent, SharedBackend, check_range, flush_each};
pub use backends::{Dir, File, Memory};
pub use geometry::{Chunk, Geometry};
pub use layers::{Aligned, Chunked, Delay, FaultInject, Locked, Tracked};
pub use pipeline::{Managed, ManagedOptions, Puller, Pusher, Synced};
pub use seeder::Seeder;
