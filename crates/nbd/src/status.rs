//! Block status: the metadata contexts an export offers and the descriptors that answer
//! `NBD_CMD_BLOCK_STATUS`, plus the hole layout of structured reads.
//!
//! Two contexts:
//! - `base:allocation` (the spec's): from [`Backend::extents`] where the backend reports holes
//!   (`NBD_STATE_HOLE | NBD_STATE_ZERO`); everything is reported as allocated data otherwise,
//!   which the spec allows.
//! - `r3map:chunks`, offered by exports that are the local side of a pull/push pipeline (they
//!   carry [`ChunkStates`]): per chunk, [`CHUNK_REMOTE`] when it has not been pulled yet (reading
//!   it costs a round trip to the remote) and [`CHUNK_DIRTY`] when it was written here and not
//!   yet pushed. A chunk with neither flag is local and clean.
//!
//! Queries: `NBD_OPT_LIST_META_CONTEXT` takes full names, or a namespace (`base:`, `r3map:`) for
//! every context in it, or no query for all; `NBD_OPT_SET_META_CONTEXT` takes full names only.
//! Unknown names select nothing, as the spec asks.

use std::io;
use std::ops::Range;

use r3map_core::{Backend, Chunk, Synced};

use crate::proto::{BlockDescriptor, meta};

/// The name of the chunk-state context.
pub const R3MAP_CHUNKS: &str = "r3map:chunks";
/// `r3map:chunks`: the chunk has not been pulled from the remote yet.
pub const CHUNK_REMOTE: u32 = 1 << 0;
/// `r3map:chunks`: the chunk was written locally and not yet pushed to the remote.
pub const CHUNK_DIRTY: u32 = 1 << 1;

/// Most descriptors in one `BLOCK_STATUS` chunk; a reply may cover less than was asked, and
/// clients ask again from where it stopped.
pub const MAX_DESCRIPTORS: usize = 16 * 1024;

/// Holes shorter than this are sent as data in structured reads: a hole chunk costs 32 bytes
/// and a separate backend read for the data on each side of it.
pub const MIN_READ_HOLE: u64 = 4096;

/// What an export knows about its chunks when it is the local side of a pull/push pipeline
/// ([`Synced`] implements it).
pub trait ChunkStates: Send + Sync {
    /// Bytes per chunk; the last chunk may be shorter.
    fn chunk_size(&self) -> u64;
    /// [`CHUNK_REMOTE`] and [`CHUNK_DIRTY`] for chunk number `chunk`.
    fn chunk_flags(&self, chunk: u64) -> u32;
    /// Makes the chunks covering `off..off + len` local, pulling the missing ones; returns once
    /// they are (`NBD_CMD_CACHE`).
    ///
    /// # Errors
    /// A failed pull.
    fn prefetch(&self, off: u64, len: u64) -> io::Result<()>;
}

impl ChunkStates for Synced {
    fn chunk_size(&self) -> u64 {
        self.geometry().chunk_size()
    }

    fn chunk_flags(&self, chunk: u64) -> u32 {
        let mut flags = 0;
        if !self.is_local(Chunk(chunk)) {
            flags |= CHUNK_REMOTE;
        }
        if self.is_dirty(Chunk(chunk)) {
            flags |= CHUNK_DIRTY;
        }
        flags
    }

    fn prefetch(&self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.fetch(self.geometry().chunks_touched(off, len))
    }
}

/// A metadata context of an export; its id on a connection is its index in the selection plus one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Context {
    Allocation,
    Chunks,
}

impl Context {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Allocation => meta::BASE_ALLOCATION,
            Self::Chunks => R3MAP_CHUNKS,
        }
    }

    /// The contexts an export offers.
    pub(crate) fn offered(has_chunk_states: bool) -> &'static [Self] {
        if has_chunk_states { &[Self::Allocation, Self::Chunks] } else { &[Self::Allocation] }
    }

    /// Whether `query` names this context; a bare namespace (`base:`) names all of its contexts
    /// when listing.
    pub(crate) fn matches(self, query: &str, listing: bool) -> bool {
        let name = self.name();
        query == name || (listing && query.ends_with(':') && name.starts_with(query))
    }
}

/// The contexts `queries` select among those `offered`, in offered order and without repeats;
/// no queries selects everything when listing and nothing when setting.
pub(crate) fn select(offered: &[Context], queries: &[String], listing: bool) -> Vec<Context> {
    offered
        .iter()
        .copied()
        .filter(|c| (listing && queries.is_empty()) || queries.iter().any(|q| c.matches(q, listing)))
        .collect()
}

/// Appends a run, merging it into the previous one when the flags are equal.
fn push_run(out: &mut Vec<BlockDescriptor>, len: u64, flags: u32) {
    let Ok(len) = u32::try_from(len) else {
        // Requests are at most 4 GiB - 1 bytes long, so runs within one never exceed u32.
        unreachable!("a run within one request fits 32 bits");
    };
    match out.last_mut() {
        Some(last) if last.flags == flags => last.len += len,
        _ => out.push(BlockDescriptor { len, flags }),
    }
}

/// `base:allocation` descriptors for `off..off + len` (`len` ≤ `u32::MAX`), at most `max` of them.
/// A backend that cannot report extents, or fails to, has everything reported as data.
pub(crate) fn allocation(backend: &dyn Backend, off: u64, len: u32, max: usize) -> Vec<BlockDescriptor> {
    let len = u64::from(len);
    let extents = if backend.capabilities().extents {
        backend.extents(off, len).unwrap_or_else(|e| {
            tracing::debug!(offset = off, length = len, error = %e, "extents failed; reporting data");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    let mut covered = 0;
    for e in extents {
        let n = e.len.min(len - covered);
        if n == 0 {
            break;
        }
        let flags = if e.hole { meta::STATE_HOLE | meta::STATE_ZERO } else { 0 };
        if out.len() == max && out.last().is_none_or(|d: &BlockDescriptor| d.flags != flags) {
            return out;
        }
        push_run(&mut out, n, flags);
        covered += n;
    }
    if covered < len && out.len() < max {
        push_run(&mut out, len - covered, 0);
    }
    out
}

/// `r3map:chunks` descriptors for `off..off + len`, at most `max` of them.
pub(crate) fn chunks(states: &dyn ChunkStates, off: u64, len: u32, max: usize) -> Vec<BlockDescriptor> {
    let chunk_size = states.chunk_size().max(1);
    let end = off + u64::from(len);
    let mut out = Vec::new();
    let mut at = off;
    while at < end {
        let chunk = at / chunk_size;
        let run_end = ((chunk + 1) * chunk_size).min(end);
        let flags = states.chunk_flags(chunk);
        if out.len() == max && out.last().is_none_or(|d: &BlockDescriptor| d.flags != flags) {
            break;
        }
        push_run(&mut out, run_end - at, flags);
        at = run_end;
    }
    out
}

/// How a structured read of `off..off + len` is sent: runs of data and holes (holes shorter than
/// [`MIN_READ_HOLE`] folded into data). `None` when it is one run of data, or the backend cannot
/// tell.
pub(crate) fn read_layout(backend: &dyn Backend, off: u64, len: u64) -> Option<Vec<(Range<u64>, bool)>> {
    if len < MIN_READ_HOLE || !backend.capabilities().extents {
        return None;
    }
    let extents = backend.extents(off, len).ok()?;
    let mut runs: Vec<(Range<u64>, bool)> = Vec::new();
    let mut at = off;
    for e in extents {
        let n = e.len.min(off + len - at);
        if n == 0 {
            break;
        }
        let hole = e.hole && n >= MIN_READ_HOLE;
        match runs.last_mut() {
            Some((r, h)) if *h == hole => r.end += n,
            _ => runs.push((at..at + n, hole)),
        }
        at += n;
    }
    if at < off + len {
        match runs.last_mut() {
            Some((r, false)) => r.end = off + len,
            _ => runs.push((at..off + len, false)),
        }
    }
    (runs.len() > 1 || runs.first().is_some_and(|(_, hole)| *hole)).then_some(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3map_core::Memory;

    struct Fixed(Vec<u32>);

    impl ChunkStates for Fixed {
        fn chunk_size(&self) -> u64 {
            100
        }
        fn chunk_flags(&self, chunk: u64) -> u32 {
            self.0[usize::try_from(chunk).unwrap()]
        }
        fn prefetch(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
    }

    fn d(len: u32, flags: u32) -> BlockDescriptor {
        BlockDescriptor { len, flags }
    }

    #[test]
    fn queries_select_contexts() {
        let all = Context::offered(true);
        assert_eq!(select(all, &[], true), all);
        assert!(select(all, &[], false).is_empty());
        assert_eq!(select(all, &["base:".into()], true), [Context::Allocation]);
        assert!(select(all, &["base:".into()], false).is_empty());
        assert_eq!(select(all, &["r3map:chunks".into(), "base:allocation".into()], false), all);
        assert!(select(Context::offered(false), &["r3map:chunks".into()], false).is_empty());
        assert!(select(all, &["qemu:dirty-bitmap:x".into()], true).is_empty());
    }

    #[test]
    fn chunk_runs_merge_and_clip() {
        let s = Fixed(vec![CHUNK_REMOTE, CHUNK_REMOTE, 0, CHUNK_DIRTY]);
        assert_eq!(chunks(&s, 50, 300, 100), [d(150, CHUNK_REMOTE), d(100, 0), d(50, CHUNK_DIRTY)]);
        assert_eq!(chunks(&s, 50, 300, 1), [d(150, CHUNK_REMOTE)]);
        assert_eq!(chunks(&s, 399, 1, 1), [d(1, CHUNK_DIRTY)]);
    }

    #[test]
    fn allocation_follows_extents() {
        let m = Memory::with_page_size(1 << 20, 64 * 1024).unwrap();
        let chunk = 64 * 1024;
        m.write_at(&[1], chunk).unwrap();
        let hole = meta::STATE_HOLE | meta::STATE_ZERO;
        let all = allocation(&m, 0, 1 << 20, MAX_DESCRIPTORS);
        assert_eq!(all.iter().map(|x| u64::from(x.len)).sum::<u64>(), 1 << 20);
        assert_eq!(all[0], d(64 * 1024, hole));
        assert_eq!(all[1].flags, 0);
        assert_eq!(allocation(&m, 0, 1 << 20, 1), [d(64 * 1024, hole)]);
        let layout = read_layout(&m, 0, 3 * chunk).unwrap();
        assert_eq!(layout, [(0..chunk, true), (chunk..2 * chunk, false), (2 * chunk..3 * chunk, true)]);
        assert_eq!(read_layout(&m, chunk, chunk), None);
    }
}
