//! Live migration of an r3map resource between hosts, as the thesis and the Go r3map define it,
//! with iterative pre-copy on top.
//!
//! - **Source** ([`Source`]): the application keeps reading and writing a backend wrapped in
//!   [`Source`]; a destination calls its [`Seeder`](r3map_core::Seeder) operations, usually over
//!   the network (`r3map_net::Export::with_seeder`). The protocol is one-way: only the destination
//!   calls, so the source never dials out.
//! - **Destination** ([`Leecher`]): asks the source to track writes, pulls everything in the
//!   background (pre-copy) while the application still runs at the source, then in rounds pulls
//!   again what was written meanwhile ([`Leecher::precopy`]; a round's scattered chunks go in
//!   batches of reads sent together) until the set shrinks by less than a tenth. Then
//!   [`Leecher::finalize`]: the source suspends the application (its hook) and sends the chunks
//!   written since the last round; they are marked remote and queued first, and the destination
//!   unlocks. The application resumes at the destination while the rest arrives in the
//!   background and on demand (post-copy). When everything is local, [`Leecher::close`] releases
//!   the source and hands over the local backend, which can be the source of the next hop.
//! - **One step** ([`Migrator`]): a leecher whose application uses a [`Source`] over the
//!   leecher's view from the start, so that after the post-copy the same backend is exported to
//!   the next hop with no swap under the application (A → B → C).
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
//! What happens when the source or the link fails, phase by phase (the CLI prints the same):
//! - **Opening, pre-copy**: [`Leecher::open`] or [`Leecher::precopy`] fails with the error; the
//!   destination never unlocked, and the source's application runs on, unaffected.
//! - **Finalize**: a `sync` that fails (the source's hook refused, the source died) leaves the
//!   destination locked and [`Leecher::finalize`] may be called again. A `sync` whose answer is
//!   lost with the connection is asked for again after reconnecting and gets the same chunks:
//!   the server keeps its last answers to a round and to the sync (over the native protocol;
//!   the Go r3map's gRPC services have no way to ask again).
//! - **Post-copy**: a dropped link is reconnected and the pull continues (the source keeps its
//!   state until `close`). A source gone for good makes the pull give up after
//!   `max_attempts` failures in a row and [`Leecher::wait`] return the error; local chunks keep
//!   serving, and reads of chunks still remote fail with the error, never with zeroes.

mod leecher;
mod migrator;
mod source;

pub use leecher::{DirtyHook, Finalized, Leecher, LeecherHooks, LeecherOptions, Round, SeederRemote};
pub use migrator::{LeecherView, Migrator};
pub use source::{Source, SourceHook, SourceHooks, SourcePhase};
