//! [`Stored`]: a [`Backend`] over a [`ChunkStore`] of one entry per chunk.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use r3map_core::backend::len64;
use r3map_core::geometry::{Piece, to_usize};
use r3map_core::{Backend, Capabilities, Chunk, Geometry, check_range};

/// A store of one entry per chunk, addressed by the chunk's index. Each call is one batch, which
/// an implementation sends in as few round trips as it can.
pub trait ChunkStore: Send + Sync {
    /// Where the chunks live, for messages (`redis://127.0.0.1:6379/0, prefix "disk:"`).
    fn describe(&self) -> String;

    /// The stored data of `chunks`, in the same order; `None` for a chunk never written (or
    /// deleted since).
    ///
    /// # Errors
    /// The store failed or could not be reached; nothing is returned for any chunk then.
    fn get(&self, chunks: &[u64]) -> io::Result<Vec<Option<Vec<u8>>>>;

    /// Stores each `(chunk, data)`, replacing what was there.
    ///
    /// # Errors
    /// The store failed; some of the chunks may have been stored.
    fn put(&self, chunks: &[(u64, &[u8])]) -> io::Result<()>;

    /// Deletes `chunks`; afterwards they read as `None`. Deleting a missing chunk is no error.
    ///
    /// # Errors
    /// The store failed; some of the chunks may have been deleted.
    fn delete(&self, chunks: &[u64]) -> io::Result<()>;

    /// Makes completed puts and deletes durable (most stores are, once the call returns).
    ///
    /// # Errors
    /// The store failed.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

macro_rules! forward_store {
    ($ty:ty) => {
        impl<S: ChunkStore + ?Sized> ChunkStore for $ty {
            fn describe(&self) -> String {
                (**self).describe()
            }
            fn get(&self, chunks: &[u64]) -> io::Result<Vec<Option<Vec<u8>>>> {
                (**self).get(chunks)
            }
            fn put(&self, chunks: &[(u64, &[u8])]) -> io::Result<()> {
                (**self).put(chunks)
            }
            fn delete(&self, chunks: &[u64]) -> io::Result<()> {
                (**self).delete(chunks)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
        }
    };
}

forward_store!(std::sync::Arc<S>);
forward_store!(Box<S>);

/// The URL parameters of every store, which give the [`Stored`] backend's size and
/// [`StoredOptions`] (`size=SIZE`, `chunk-size=SIZE`, `max-batch=N`). They belong to whoever makes
/// the backend from the URL (the `r3map` crate's URL registry); each store's own URL parser skips
/// them.
pub const COMMON_PARAMETERS: [&str; 3] = ["size", "chunk-size", "max-batch"];

/// How a [`Stored`] backend cuts the resource and its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredOptions {
    /// Bytes per chunk (per key, object or row); the last chunk may be shorter.
    pub chunk_size: u64,
    /// Most chunks in one call to the store; a larger request becomes several batches.
    pub max_batch: usize,
}

impl Default for StoredOptions {
    fn default() -> Self {
        Self { chunk_size: 64 * 1024, max_batch: 256 }
    }
}

/// Locks that serialize read-modify-write cycles on the same chunk.
const STRIPES: usize = 256;

/// A [`Backend`] of `size` bytes over a [`ChunkStore`]; see the [crate documentation](crate).
pub struct Stored<S> {
    store: S,
    geometry: Geometry,
    max_batch: usize,
    stripes: Box<[Mutex<()>]>,
}

impl<S: ChunkStore> fmt::Debug for Stored<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stored")
            .field("store", &self.store.describe())
            .field("geometry", &self.geometry)
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

impl<S: ChunkStore> Stored<S> {
    /// A backend of `size` bytes over `store`.
    ///
    /// # Errors
    /// `InvalidInput` for a zero chunk size or batch.
    pub fn new(store: S, size: u64, options: StoredOptions) -> io::Result<Self> {
        if options.max_batch == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the batch size must be at least 1"));
        }
        Ok(Self {
            store,
            geometry: Geometry::new(size, options.chunk_size)?,
            max_batch: options.max_batch,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    #[must_use]
    pub fn store(&self) -> &S {
        &self.store
    }

    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Fetches `chunks`, checking that each stored chunk has its chunk's length.
    fn fetch(&self, chunks: &[u64]) -> io::Result<Vec<Option<Vec<u8>>>> {
        let mut out = Vec::with_capacity(chunks.len());
        for batch in chunks.chunks(self.max_batch) {
            let got = self.store.get(batch)?;
            if got.len() != batch.len() {
                return Err(io::Error::other(format!(
                    "{} answered {} chunks for a request of {}",
                    self.store.describe(),
                    got.len(),
                    batch.len()
                )));
            }
            for (&c, data) in batch.iter().zip(&got) {
                self.check_len(c, data.as_deref())?;
            }
            out.extend(got);
        }
        Ok(out)
    }

    fn check_len(&self, chunk: u64, data: Option<&[u8]>) -> io::Result<()> {
        let want = self.geometry.chunk_len(Chunk(chunk));
        match data {
            Some(d) if len64(d) != want => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "chunk {chunk} in {} has {} bytes where {want} were expected: the store holds \
                     data of another chunk size or resource (or was changed by someone else)",
                    self.store.describe(),
                    d.len()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Locks the stripes of `chunks`, in ascending order so that writers never wait on each other
    /// in a cycle.
    fn lock(&self, chunks: impl Iterator<Item = u64>) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = chunks.map(|c| to_usize(c) % STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .iter()
            .map(|&s| self.stripes[s].lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            .collect()
    }

    /// Writes the pieces of one batch: whole chunks as they are, partial ones over the stored
    /// chunk (or zeroes). `data` gives each piece's bytes; `None` writes zeroes.
    fn write_batch(&self, pieces: &[Piece], data: Option<&[u8]>) -> io::Result<()> {
        let _locks = self.lock(pieces.iter().map(|p| p.chunk.0));
        let partial: Vec<u64> = pieces
            .iter()
            .filter(|p| p.within != 0 || len64_of(&p.buf) != self.geometry.chunk_len(p.chunk))
            .map(|p| p.chunk.0)
            .collect();
        let mut old: HashMap<u64, Option<Vec<u8>>> =
            partial.iter().copied().zip(self.fetch(&partial)?).collect();
        let zeroes = vec![0u8; to_usize(self.geometry.chunk_size())];
        let mut built: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut direct: Vec<(u64, &[u8])> = Vec::new();
        for p in pieces {
            let len = to_usize(self.geometry.chunk_len(p.chunk));
            let bytes: &[u8] = match data {
                Some(d) => &d[p.buf.clone()],
                None => &zeroes[..p.buf.len()],
            };
            match old.remove(&p.chunk.0) {
                Some(previous) => {
                    let mut chunk = previous.unwrap_or_else(|| vec![0u8; len]);
                    let at = to_usize(p.within);
                    chunk[at..at + bytes.len()].copy_from_slice(bytes);
                    built.push((p.chunk.0, chunk));
                }
                None => direct.push((p.chunk.0, bytes)),
            }
        }
        direct.extend(built.iter().map(|(c, d)| (*c, d.as_slice())));
        self.store.put(&direct)
    }

    /// Zeroes `off..off + len`: whole chunks are deleted, partial ones rewritten.
    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.geometry.size())?;
        let pieces: Vec<Piece> = self.geometry.split(off, len).collect();
        for batch in pieces.chunks(self.max_batch) {
            let (whole, partial): (Vec<&Piece>, Vec<&Piece>) = batch
                .iter()
                .partition(|p| p.within == 0 && len64_of(&p.buf) == self.geometry.chunk_len(p.chunk));
            if !whole.is_empty() {
                let chunks: Vec<u64> = whole.iter().map(|p| p.chunk.0).collect();
                let _locks = self.lock(chunks.iter().copied());
                self.store.delete(&chunks)?;
            }
            if !partial.is_empty() {
                let partial: Vec<Piece> = partial.into_iter().cloned().collect();
                self.write_batch(&partial, None)?;
            }
        }
        Ok(())
    }
}

fn len64_of(r: &std::ops::Range<usize>) -> u64 {
    (r.end - r.start) as u64
}

impl<S: ChunkStore> Backend for Stored<S> {
    fn size(&self) -> u64 {
        self.geometry.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_many(&mut [(off, buf)])
    }

    /// All the chunks of all the reads are fetched together, in batches of `max_batch`.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        let mut pieces: Vec<(usize, Piece)> = Vec::new();
        for (i, (off, buf)) in reads.iter().enumerate() {
            check_range(*off, len64(buf), self.geometry.size())?;
            pieces.extend(self.geometry.split(*off, len64(buf)).map(|p| (i, p)));
        }
        let mut chunks: Vec<u64> = pieces.iter().map(|(_, p)| p.chunk.0).collect();
        chunks.sort_unstable();
        chunks.dedup();
        let mut found: HashMap<u64, Option<Vec<u8>>> = HashMap::with_capacity(chunks.len());
        for batch in chunks.chunks(self.max_batch) {
            found.extend(batch.iter().copied().zip(self.fetch(batch)?));
        }
        for (i, p) in pieces {
            let target = &mut reads[i].1[p.buf.clone()];
            match found.get(&p.chunk.0).and_then(Option::as_ref) {
                Some(data) => {
                    let at = to_usize(p.within);
                    target.copy_from_slice(&data[at..at + target.len()]);
                }
                None => target.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.geometry.size())?;
        let pieces: Vec<Piece> = self.geometry.split(off, len64(buf)).collect();
        for batch in pieces.chunks(self.max_batch) {
            self.write_batch(batch, Some(buf))?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.store.flush()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { trim: true, write_zeroes: true, extents: false, read_only: false }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.zero(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.zero(off, len)
    }
}

/// A [`ChunkStore`] in memory that counts its calls: the reference the other stores are tested
/// against, and a way to test [`Stored`] itself.
#[derive(Debug, Default)]
pub struct MemoryStore {
    chunks: Mutex<HashMap<u64, Vec<u8>>>,
    calls: AtomicU64,
}

impl MemoryStore {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls made to the store so far (each one batch, one round trip for a network store).
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Chunks stored.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map().len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Stores `data` under `chunk` as it is (to plant a chunk of the wrong size).
    pub fn insert_raw(&self, chunk: u64, data: Vec<u8>) {
        self.map().insert(chunk, data);
    }

    fn map(&self) -> MutexGuard<'_, HashMap<u64, Vec<u8>>> {
        self.chunks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ChunkStore for MemoryStore {
    fn describe(&self) -> String {
        "memory store".to_owned()
    }

    fn get(&self, chunks: &[u64]) -> io::Result<Vec<Option<Vec<u8>>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let map = self.map();
        Ok(chunks.iter().map(|c| map.get(c).cloned()).collect())
    }

    fn put(&self, chunks: &[(u64, &[u8])]) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut map = self.map();
        for (c, d) in chunks {
            map.insert(*c, d.to_vec());
        }
        Ok(())
    }

    fn delete(&self, chunks: &[u64]) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut map = self.map();
        for c in chunks {
            map.remove(c);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use r3map_core::conformance;

    use super::*;

    fn stored(size: u64, chunk_size: u64, max_batch: usize) -> Stored<Arc<MemoryStore>> {
        Stored::new(Arc::new(MemoryStore::new()), size, StoredOptions { chunk_size, max_batch }).unwrap()
    }

    #[test]
    fn conformance_with_small_chunks_and_batches() {
        conformance::run(&|size| Arc::new(stored(size, 4096, 3)));
    }

    #[test]
    fn conformance_with_default_options() {
        conformance::run(&|size| Arc::new(stored(size, 64 * 1024, 256)));
    }

    #[test]
    fn a_read_of_many_chunks_is_one_call_per_batch_and_missing_chunks_are_zeroes() {
        let s = stored(1 << 20, 4096, 16);
        s.write_at(&[7u8; 4096], 8192).unwrap();
        let before = s.store().calls();
        let mut buf = vec![1u8; 64 * 4096];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(s.store().calls() - before, 4, "64 chunks in batches of 16");
        assert!(buf[..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..12288].iter().all(|&b| b == 7));
        assert!(buf[12288..].iter().all(|&b| b == 0));
    }

    #[test]
    fn read_many_fetches_the_chunks_of_every_range_together() {
        let s = stored(1 << 20, 4096, 64);
        s.write_at(&[3u8; 3 * 4096], 0).unwrap();
        let before = s.store().calls();
        let (mut a, mut b, mut c) = ([0u8; 10], [0u8; 5000], [0u8; 1]);
        s.read_many(&mut [(5, &mut a[..]), (4000, &mut b[..]), (100 * 4096, &mut c[..])]).unwrap();
        assert_eq!(s.store().calls() - before, 1);
        assert_eq!(a, [3u8; 10]);
        assert!(b.iter().all(|&x| x == 3));
        assert_eq!(c, [0]);
    }

    #[test]
    fn whole_chunks_are_written_without_reading_and_trim_deletes_them() {
        let s = stored(10 * 4096 + 100, 4096, 64);
        s.write_at(&vec![9u8; 10 * 4096 + 100], 0).unwrap();
        assert_eq!(s.store().calls(), 1, "one put, no get");
        assert_eq!(s.store().len(), 11);
        s.trim(4096, 3 * 4096 + 10).unwrap();
        assert_eq!(s.store().len(), 8, "three whole chunks deleted; the partial one rewritten");
        let mut buf = vec![1u8; 5 * 4096];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9));
        assert!(buf[4096..4 * 4096 + 10].iter().all(|&b| b == 0));
        assert!(buf[4 * 4096 + 10..].iter().all(|&b| b == 9));
    }

    #[test]
    fn a_chunk_of_the_wrong_size_is_an_error_not_data() {
        let s = stored(4 * 4096, 4096, 64);
        s.store().insert_raw(2, vec![5u8; 100]);
        let err = s.read_at(&mut [0u8; 10], 2 * 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("chunk 2") && err.to_string().contains("100 bytes"), "{err}");
        // A partial write must not build on it either; a whole one replaces it.
        assert!(s.write_at(&[1u8; 10], 2 * 4096).is_err());
        s.write_at(&[1u8; 4096], 2 * 4096).unwrap();
        s.read_at(&mut [0u8; 10], 2 * 4096).unwrap();
    }

    #[test]
    fn concurrent_partial_writes_to_one_chunk_are_all_kept() {
        let s = Arc::new(stored(4096, 4096, 64));
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let s = Arc::clone(&s);
                scope.spawn(move || {
                    for round in 0..50u64 {
                        let off = u64::from(t) * 512 + round % 8;
                        s.write_at(&[t + 1; 8], off).unwrap();
                    }
                });
            }
        });
        let mut buf = vec![0u8; 4096];
        s.read_at(&mut buf, 0).unwrap();
        for t in 0..8u8 {
            let region = &buf[usize::from(t) * 512..usize::from(t) * 512 + 15];
            assert!(region.iter().all(|&b| b == t + 1), "writer {t}'s bytes were lost: {region:?}");
        }
    }

    #[test]
    fn bad_options_are_rejected() {
        let store = Arc::new(MemoryStore::new());
        assert!(Stored::new(Arc::clone(&store), 100, StoredOptions { chunk_size: 0, max_batch: 1 }).is_err());
        assert!(Stored::new(store, 100, StoredOptions { chunk_size: 10, max_batch: 0 }).is_err());
    }
}
