//! Live migration of an r3map resource between hosts, as the thesis and the Go r3map define it,
//! with iterative pre-copy on top.
//!
//! - **Source** ([`Source`]): the application keeps reading and writing a backend wrapped in
//!   [`Source`]; a destination calls its [`Seeder`](r3map_core::Seeder) operations, usually over
//!   the network (`r3map_net::Export::with_seeder`). The protocol is one-way: only the destination
//!   calls, so the source never dials out.
//! - **Destination** ([`Leecher`]): asks the source to track writes, pulls everything in the
//!   background (pre-copy) while the application still runs at the source, then in rounds pulls
//!   again what was written meanwhile ([`Leecher::precopy`]) until that stops shrinking. Then
//!   [`Leecher::finalize`]: the source suspends the application (its hook) and sends the chunks
//!   written since the last round; they are marked remote and queued first, and the destination
//!   unlocks. The application resumes at the destination while the rest arrives in the
//!   background and on demand (post-copy). When everything is local, [`Leecher::close`] releases
//!   the source and hands over the local backend, which can be the source of the next hop.
//!
//! Guarantees:
//! - The destination never serves a stale chunk: its view is locked until finalize, and every
//!   chunk written at the source after it was pulled is in a round's or the final dirty set, so it
//!   is pulled again (a pull in flight when its chunk is marked remote is discarded on landing).
//! - A source whose destination gives up before finalize is unaffected; `close` without a
//!   successful `sync` changes nothing at the source.
//!
//! Frontends compose with it: a FUSE mount of a [`Source`] or of [`Leecher::backend`], a
//! userfaultfd region as the source (it is a seeder itself) or over [`Leecher::backend`] at the
//! destination. The Go r3map's gRPC seeder services work through [`Leecher::open_parts`]. The CLI
//! is `r3map migrate`; the benchmark `cargo bench -p r3map-migrate --bench migrate`.
//!
//! Not yet: a lost reply to the final `sync` (or to a round) cannot be repeated and fails the
//! migration; the dirty chunks of a round are re-pulled one request per run of adjacent chunks,
//! which over a link with a long round trip keeps rounds from converging (see
//! docs/benchmarks.md).

mod leecher;
mod source;

pub use leecher::{DirtyHook, Finalized, Leecher, LeecherHooks, LeecherOptions, Round, SeederRemote};
pub use source::{Source, SourceHook, SourceHooks, SourcePhase};
