//! [`Cache`]: what the [`Synced`](super::Synced) layer asks of its local backend.
//!
//! `Synced` puts bytes into its local backend for two reasons, and they are different
//! operations:
//! - a **write** ([`Backend::write_at`]) stores data the application wrote through `Synced`: it
//!   replaces what is there, as every backend's `write_at` does;
//! - a **fill** ([`Cache::fill`]) stores a chunk pulled from the remote because it was not local.
//!
//! For a plain store (memory, a file, a directory of chunks) the two are the same, which is the
//! default: `fill` is `write_at`, and any backend used as a [`SharedBackend`] is a cache
//! (`impl Cache for dyn Backend`). A cache whose bytes the application also changes without
//! going through `Synced` (a memory mapping served by userfaultfd) keeps what is there instead:
//! there, a fill never overwrites data written earlier, because the bytes already in place are
//! newer than the remote's. Such a cache also reports the writes it saw behind the layer's back
//! ([`Cache::take_written`]), so that they are pushed like any other.
//!
//! [`SharedBackend`]: crate::SharedBackend

use std::io;
use std::ops::Range;

use crate::backend::Backend;

/// An access that waits for a fill: the byte it needs, so that a cache able to let it proceed
/// early (a mapping that wakes the faulting thread page by page) stores that part first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Offset of the byte the access needs, within the range being filled.
    pub off: u64,
    /// The access walks forward (the fill reads ahead of it): the bytes after it are wanted next,
    /// so they may go with it rather than after it.
    pub sequential: bool,
}

/// The local backend of a [`Synced`](super::Synced) layer. See the [module docs](self).
pub trait Cache: Backend {
    /// Stores `buf`, fetched from the remote, at `off`: a chunk (or a run of chunks) that was not
    /// local, or whose local copy was lost. Unlike [`Backend::write_at`] it need not replace data
    /// that is already in place: a cache written behind the `Synced` layer's back keeps what it
    /// holds. `fault`, when given, lies in `off..off + buf.len()`. The default is `write_at`.
    ///
    /// # Errors
    /// As [`Backend::write_at`]; the range then counts as not filled.
    fn fill(&self, buf: &[u8], off: u64, fault: Option<Fault>) -> io::Result<()> {
        let _ = fault;
        self.write_at(buf, off)
    }

    /// Calls `written` with each byte range written since the previous call by a path that did
    /// not go through the `Synced` layer (the application writing a mapping), before returning;
    /// the layer marks their chunks dirty. The [`Pusher`](super::Pusher) calls it at the start of
    /// every cycle. The default reports nothing: every write went through the layer.
    ///
    /// # Errors
    /// Finding the written ranges failed.
    fn take_written(&self, written: &mut dyn FnMut(Range<u64>)) -> io::Result<()> {
        let _ = written;
        Ok(())
    }

    /// Drops what a fill stored at `off..off + len`: its chunk was invalidated
    /// ([`Synced::mark_remote`](super::Synced::mark_remote)) while the fill was on its way, so
    /// the bytes are older than the remote's and the chunk stays remote. Called before the chunk
    /// can be claimed again. The default keeps the bytes: every read of a remote chunk goes
    /// through the layer, which fetches it again. A cache that is read behind the layer's back
    /// (a region's mapping) must drop them, or the next access finds the old bytes.
    ///
    /// # Errors
    /// Dropping failed; the layer logs it (the chunk stays remote either way).
    fn evict(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Ok(())
    }
}

/// Any backend is a cache whose fills are writes.
impl Cache for dyn Backend {}
