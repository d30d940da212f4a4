//! Backends over distributed stores: one Redis key, S3 object or Cassandra row per chunk.
//!
//! The stores differ only in how they get, put and delete a batch of chunks, which each does in
//! as few round trips as it can (a Redis pipeline, parallel S3 requests, concurrent prepared
//! statements): that is the [`ChunkStore`] trait. [`Stored`] turns any of them into a
//! [`Backend`](r3map_core::Backend) of any size, with requests of any alignment: it splits a
//! request into chunks, fetches all the chunks of a read in one batch (a chunk never written
//! reads as zeroes), writes whole chunks directly and partial ones by read-modify-write under a
//! per-chunk lock, and deletes whole chunks for `trim`.
//!
//! What it does not: choose a store from a URL. Each store parses its own URL (the `redis`,
//! `s3` and `cassandra` modules); the table of schemes that picks the store, and reads the
//! parameters every store takes ([`COMMON_PARAMETERS`]), is the `r3map` crate's.

mod stored;

pub use stored::{COMMON_PARAMETERS, ChunkStore, MemoryStore, Stored, StoredOptions};

#[cfg(feature = "cassandra")]
pub mod cassandra;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "s3")]
pub mod s3;
