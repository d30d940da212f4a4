//! A backend that stores each chunk in its own file inside a directory.
//!
//! Chunk `i` lives in the file named `i` in decimal (`0`, `1`, ..., `42`, no padding), which is
//! exactly as long as the chunk (the tail chunk's file is shorter). A chunk without a file reads
//! as zeroes; reading never creates files, the first write to a chunk does. Files are created
//! under a temporary name (`.<i>.<random>.tmp`), sized, then renamed into place, so a chunk file
//! never appears with the wrong length. Any other file in the directory is ignored.
//!
//! Open files are kept in a small LRU cache bounded by `max_open_files`; the cache lock is held
//! only to look a file up or insert it, never across I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::fs::{CWD, FallocateFlags, RenameFlags};
use rustix::io::Errno;

use super::file::{annotate, push, zero_fill};
use crate::backend::{Backend, Capabilities, Extent, check_range, len64};
use crate::geometry::{Chunk, Geometry};

/// Up to this many chunks, `extents` looks each chunk file up; above, it lists the directory.
const LOOKUP_LIMIT: u64 = 64;

/// A directory of chunk files, one per chunk that was ever written.
pub struct Dir {
    path: PathBuf,
    /// The directory itself, kept open to make created and deleted entries durable.
    dir: fs::File,
    geometry: Geometry,
    max_open_files: usize,
    cache: Mutex<Cache>,
    pending: Mutex<Pending>,
    /// Serialises flushes, so a flush never returns while an earlier one is still syncing chunks
    /// it took from `pending`.
    flushing: Mutex<()>,
}

/// What the next flush must make durable.
#[derive(Debug, Default)]
struct Pending {
    /// Chunks written (or trimmed in place) since their file was last synced.
    chunks: BTreeSet<u64>,
    /// Chunk files were created or deleted since the directory was last synced.
    dir: bool,
}

/// An LRU cache of open chunk files.
#[derive(Debug, Default)]
struct Cache {
    /// Chunk index to its file and the tick of its last use.
    files: HashMap<u64, (Arc<fs::File>, u64)>,
    /// Tick of last use to chunk index: the first entry is the least recently used.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    /// Bumped whenever a chunk file is deleted, so a file opened before the deletion (perhaps the
    /// deleted one) is not cached after it.
    generation: u64,
}

impl Cache {
    fn get(&mut self, chunk: u64) -> Option<Arc<fs::File>> {
        let (file, last) = self.files.get_mut(&chunk)?;
        self.lru.remove(last);
        self.tick += 1;
        *last = self.tick;
        self.lru.insert(self.tick, chunk);
        Some(Arc::clone(file))
    }

    /// Caches `file` for `chunk` (unless another caller already did: theirs is returned) and
    /// evicts the least recently used files beyond `max`. The evicted files are returned so the
    /// caller can drop (close) them after releasing the lock.
    fn insert(&mut self, chunk: u64, file: Arc<fs::File>, max: usize) -> (Arc<fs::File>, Vec<Arc<fs::File>>) {
        if let Some(existing) = self.get(chunk) {
            return (existing, vec![file]);
        }
        self.tick += 1;
        self.files.insert(chunk, (Arc::clone(&file), self.tick));
        self.lru.insert(self.tick, chunk);
        let mut evicted = Vec::new();
        while self.files.len() > max {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some((f, _)) = self.files.remove(&victim) {
                evicted.push(f);
            }
        }
        (file, evicted)
    }

    fn remove(&mut self, chunk: u64) -> Option<Arc<fs::File>> {
        let (file, last) = self.files.remove(&chunk)?;
        self.lru.remove(&last);
        Some(file)
    }
}

impl Dir {
    /// Opens (creating it if missing) the chunk directory `path` for a backend of `size` bytes cut
    /// into chunks of `chunk_size` bytes, keeping at most `max_open_files` chunk files open at
    /// once (0 closes each file after every call). The directory itself stays open too.
    ///
    /// Existing chunk files are used as they are; they must have been written with the same
    /// `size` and `chunk_size`, or they are reported as the wrong size when touched.
    ///
    /// # Errors
    /// `InvalidInput` when `chunk_size` is zero; any error of creating or opening the directory,
    /// with its path in the message.
    pub fn open(
        path: impl AsRef<Path>,
        size: u64,
        chunk_size: u64,
        max_open_files: usize,
    ) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let geometry = Geometry::new(size, chunk_size)?;
        fs::create_dir_all(&path)
            .map_err(|e| annotate(&e, &format!("cannot create the chunk directory {}", path.display())))?;
        let dir = fs::File::open(&path)
            .map_err(|e| annotate(&e, &format!("cannot open the chunk directory {}", path.display())))?;
        Ok(Self {
            path,
            dir,
            geometry,
            max_open_files,
            cache: Mutex::new(Cache::default()),
            pending: Mutex::new(Pending::default()),
            flushing: Mutex::new(()),
        })
    }

    /// The chunk directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the backend is cut into chunk files.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The bound on open chunk files given to [`Dir::open`].
    #[must_use]
    pub fn max_open_files(&self) -> usize {
        self.max_open_files
    }

    /// How many chunk files the cache holds open right now (never more than
    /// [`Dir::max_open_files`]; calls in progress may briefly hold evicted files open too).
    #[must_use]
    pub fn open_files(&self) -> usize {
        self.lock_cache().files.len()
    }

    /// The file of `chunk`.
    #[must_use]
    pub fn chunk_path(&self, chunk: Chunk) -> PathBuf {
        self.path.join(chunk.0.to_string())
    }

    fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().expect("dir cache lock")
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().expect("dir pending lock")
    }

    /// The open file of `chunk`, from the cache or opened (and cached). When the chunk has no
    /// file, `None`, or with `create` a new file of the chunk's length.
    fn lookup(&self, chunk: Chunk, create: bool) -> io::Result<Option<Arc<fs::File>>> {
        let generation = {
            let mut cache = self.lock_cache();
            if let Some(file) = cache.get(chunk.0) {
                return Ok(Some(file));
            }
            cache.generation
        };
        let file = loop {
            if let Some(file) = self.open_chunk(chunk)? {
                break file;
            }
            if !create {
                return Ok(None);
            }
            if let Some(file) = self.create_chunk(chunk)? {
                break file;
            }
            // Another writer created the file first: open theirs.
        };
        let file = Arc::new(file);
        let mut cache = self.lock_cache();
        if cache.generation != generation {
            // A chunk file was deleted while this one was opened, maybe this very one: use it
            // for this call (which overlapped the deletion) but do not cache it.
            return Ok(Some(file));
        }
        let (file, evicted) = cache.insert(chunk.0, file, self.max_open_files);
        drop(cache);
        drop(evicted);
        Ok(Some(file))
    }

    /// Opens the existing file of `chunk` and checks its length; `None` when there is none.
    fn open_chunk(&self, chunk: Chunk) -> io::Result<Option<fs::File>> {
        let path = self.chunk_path(chunk);
        let file = match fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(annotate(&e, &format!("cannot open chunk file {}", path.display())));
            }
        };
        let len = file
            .metadata()
            .map_err(|e| annotate(&e, &format!("cannot inspect chunk file {}", path.display())))?
            .len();
        self.check_len(chunk, &path, len)?;
        Ok(Some(file))
    }

    /// Creates the file of `chunk`, sized to the chunk (sparse); `None` when it already exists.
    fn create_chunk(&self, chunk: Chunk) -> io::Result<Option<fs::File>> {
        let path = self.chunk_path(chunk);
        let tmp = self.path.join(format!(".{}.{:016x}.tmp", chunk.0, fastrand::u64(..)));
        let fail = |e: &io::Error| annotate(e, &format!("cannot create chunk file {}", path.display()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| fail(&e))?;
        let placed =
            file.set_len(self.geometry.chunk_len(chunk)).and_then(|()| rename_no_replace(&tmp, &path));
        match placed {
            Ok(()) => {
                self.lock_pending().dir = true;
                Ok(Some(file))
            }
            Err(e) => {
                // Best effort: a leftover temporary file is ignored by the backend.
                let _ = fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::AlreadyExists { Ok(None) } else { Err(fail(&e)) }
            }
        }
    }

    /// Deletes the file of `chunk` (if any) and forgets it in the cache. A file of the wrong
    /// length is not ours to delete: `InvalidData`.
    fn delete_chunk(&self, chunk: Chunk) -> io::Result<()> {
        let path = self.chunk_path(chunk);
        let fail = |e: &io::Error| annotate(e, &format!("cannot delete chunk file {}", path.display()));
        let exists = match fs::metadata(&path) {
            Ok(meta) => {
                self.check_len(chunk, &path, meta.len())?;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(fail(&e)),
        };
        if exists {
            match fs::remove_file(&path) {
                Ok(()) => self.lock_pending().dir = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail(&e)),
            }
        }
        // Also when the file was already gone: a cached descriptor would still read its data.
        let evicted = {
            let mut cache = self.lock_cache();
            cache.generation += 1;
            cache.remove(chunk.0)
        };
        drop(evicted);
        Ok(())
    }

    /// `InvalidData` unless `len` is the length of `chunk`.
    fn check_len(&self, chunk: Chunk, path: &Path, len: u64) -> io::Result<()> {
        let expected = self.geometry.chunk_len(chunk);
        if len == expected {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "chunk file {} is {len} bytes long but {chunk} is {expected} bytes long; it was \
                 not written by this backend with this geometry",
                path.display()
            ),
        ))
    }

    /// Zeroes `within..within + len` of the file of `chunk`, if it has one: punches a hole, or
    /// writes zeroes if that fails.
    fn zero_within(&self, chunk: Chunk, within: u64, len: u64) -> io::Result<()> {
        let Some(file) = self.lookup(chunk, false)? else {
            return Ok(());
        };
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(&*file, punch, within, len).is_err() {
            zero_fill(&file, within, len).map_err(|e| self.chunk_error(&e, "zero", chunk))?;
        }
        self.lock_pending().chunks.insert(chunk.0);
        Ok(())
    }

    fn chunk_error(&self, e: &io::Error, verb: &str, chunk: Chunk) -> io::Error {
        annotate(e, &format!("cannot {verb} chunk file {}", self.chunk_path(chunk).display()))
    }

    /// Whether `chunk` has a file.
    fn has_file(&self, chunk: Chunk) -> io::Result<bool> {
        if self.lock_cache().files.contains_key(&chunk.0) {
            return Ok(true);
        }
        let path = self.chunk_path(chunk);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(annotate(&e, &format!("cannot inspect chunk file {}", path.display()))),
        }
    }

    /// The chunks in `chunks` that have a file, in order.
    fn chunks_with_files(&self, chunks: Range<u64>) -> io::Result<Vec<u64>> {
        if chunks.end - chunks.start <= LOOKUP_LIMIT {
            let mut present = Vec::new();
            for c in chunks {
                if self.has_file(Chunk(c))? {
                    present.push(c);
                }
            }
            return Ok(present);
        }
        let fail =
            |e: &io::Error| annotate(e, &format!("cannot list the chunk directory {}", self.path.display()));
        let mut present = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(|e| fail(&e))? {
            let entry = entry.map_err(|e| fail(&e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // Only canonical decimal names are chunk files ("042" is not).
            if let Ok(c) = name.parse::<u64>()
                && c.to_string() == name
                && chunks.contains(&c)
            {
                present.push(c);
            }
        }
        present.sort_unstable();
        Ok(present)
    }

    /// Syncs the file of `chunk` to disk, if it still has one.
    fn sync_chunk(&self, chunk: Chunk) -> io::Result<()> {
        match self.lookup(chunk, false)? {
            Some(file) => file.sync_data().map_err(|e| self.chunk_error(&e, "flush", chunk)),
            // Trimmed away since it was written.
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dir")
            .field("path", &self.path)
            .field("geometry", &self.geometry)
            .field("max_open_files", &self.max_open_files)
            .field("open_files", &self.open_files())
            .finish_non_exhaustive()
    }
}

impl Backend for Dir {
    fn size(&self) -> u64 {
        self.geometry.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size())?;
        for piece in self.geometry.split(off, len64(buf)) {
            let dst = &mut buf[piece.buf];
            match self.lookup(piece.chunk, false)? {
                Some(file) => file
                    .read_exact_at(dst, piece.within)
                    .map_err(|e| self.chunk_error(&e, "read", piece.chunk))?,
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size())?;
        for piece in self.geometry.split(off, len64(buf)) {
            let file = self
                .lookup(piece.chunk, true)?
                .ok_or_else(|| io::Error::other(format!("{} has no file after creating it", piece.chunk)))?;
            file.write_all_at(&buf[piece.buf], piece.within)
                .map_err(|e| self.chunk_error(&e, "write", piece.chunk))?;
            self.lock_pending().chunks.insert(piece.chunk.0);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let _flushing = self.flushing.lock().expect("dir flush lock");
        let (chunks, dir) = {
            let mut pending = self.lock_pending();
            (std::mem::take(&mut pending.chunks), std::mem::take(&mut pending.dir))
        };
        let mut failed = Vec::new();
        let mut first_error = None;
        for &c in &chunks {
            if let Err(e) = self.sync_chunk(Chunk(c)) {
                failed.push(c);
                first_error.get_or_insert(e);
            }
        }
        let mut dir_failed = false;
        if dir && let Err(e) = self.dir.sync_all() {
            dir_failed = true;
            first_error.get_or_insert(annotate(
                &e,
                &format!("cannot flush the chunk directory {}", self.path.display()),
            ));
        }
        match first_error {
            None => Ok(()),
            Some(e) => {
                // Keep what failed for the next flush to retry.
                let mut pending = self.lock_pending();
                pending.chunks.extend(failed);
                pending.dir |= dir_failed;
                Err(e)
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { trim: true, write_zeroes: true, extents: true, read_only: false }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.size())?;
        for piece in self.geometry.split(off, len) {
            let n = piece.buf.len() as u64;
            if piece.within == 0 && n == self.geometry.chunk_len(piece.chunk) {
                self.delete_chunk(piece.chunk)?;
            } else {
                self.zero_within(piece.chunk, piece.within, n)?;
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.trim(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        check_range(off, len, self.size())?;
        let end = off + len;
        let mut out = Vec::new();
        let mut pos = off;
        for c in self.chunks_with_files(self.geometry.chunks_touched(off, len))? {
            let bytes = self.geometry.byte_range(c..c + 1);
            let (start, stop) = (bytes.start.max(off), bytes.end.min(end));
            push(&mut out, start - pos, true);
            push(&mut out, stop - start, false);
            pos = stop;
        }
        push(&mut out, end - pos, true);
        Ok(out)
    }
}

/// Renames `from` to `to` unless `to` exists (`AlreadyExists` then).
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // The file system lacks RENAME_NOREPLACE; a hard link refuses an existing target too.
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::backend::SharedBackend;
    use crate::conformance;

    const CHUNK: u64 = 64 * 1024;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn conformance_with_eviction() {
        let root = tempfile::tempdir().unwrap();
        let n = AtomicU64::new(0);
        conformance::run(&|size| -> SharedBackend {
            let path = root.path().join(format!("d{}", n.fetch_add(1, Ordering::Relaxed)));
            Arc::new(Dir::open(path, size, CHUNK, 8).unwrap())
        });
    }

    #[test]
    fn conformance_without_cache() {
        let root = tempfile::tempdir().unwrap();
        let n = AtomicU64::new(0);
        conformance::run(&|size| -> SharedBackend {
            let path = root.path().join(format!("d{}", n.fetch_add(1, Ordering::Relaxed)));
            Arc::new(Dir::open(path, size, 100_000, 0).unwrap())
        });
    }

    #[test]
    fn reads_create_no_files_and_writes_create_sized_sparse_ones() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("a/b/chunks");
        let size = 10 * CHUNK + 100;
        let d = Dir::open(&path, size, CHUNK, 8).unwrap();
        let mut buf = vec![1u8; usize::try_from(size).unwrap()];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(names(&path).is_empty());
        assert_eq!(d.open_files(), 0);
        assert_eq!(d.extents(0, size).unwrap(), vec![Extent { len: size, hole: true }]);

        d.write_at(b"xy", 3 * CHUNK + 10).unwrap();
        d.write_at(b"tail", size - 4).unwrap();
        assert_eq!(names(&path), vec!["10", "3"]);
        let meta = fs::metadata(path.join("3")).unwrap();
        assert_eq!(meta.len(), CHUNK);
        assert!(meta.blocks() < CHUNK / 512, "{} blocks", meta.blocks());
        assert_eq!(fs::metadata(path.join("10")).unwrap().len(), 100);
        let mut two = [0u8; 2];
        d.read_at(&mut two, 3 * CHUNK + 10).unwrap();
        assert_eq!(&two, b"xy");
        assert_eq!(
            d.extents(0, size).unwrap(),
            vec![
                Extent { len: 3 * CHUNK, hole: true },
                Extent { len: CHUNK, hole: false },
                Extent { len: 6 * CHUNK, hole: true },
                Extent { len: 100, hole: false },
            ]
        );
        // A partial range inside the data chunk, and the same via the directory listing.
        assert_eq!(d.extents(3 * CHUNK + 5, 10).unwrap(), vec![Extent { len: 10, hole: false }]);
        d.flush().unwrap();
        assert!(d.lock_pending().chunks.is_empty());
        assert!(!d.lock_pending().dir);

        // Reopening finds the data again.
        drop(d);
        let d = Dir::open(&path, size, CHUNK, 8).unwrap();
        d.read_at(&mut two, 3 * CHUNK + 10).unwrap();
        assert_eq!(&two, b"xy");
    }

    #[test]
    fn extents_lists_the_directory_for_long_ranges() {
        let root = tempfile::tempdir().unwrap();
        let size = 1000 * 4096;
        let d = Dir::open(root.path(), size, 4096, 4).unwrap();
        for c in [0u64, 1, 500, 999] {
            d.write_at(&[1], c * 4096 + 7).unwrap();
        }
        // Stray files that are not chunk files are ignored.
        fs::write(root.path().join("0042"), b"x").unwrap();
        fs::write(root.path().join("notes"), b"x").unwrap();
        fs::write(root.path().join("5000"), b"x").unwrap();
        let hole = |len| Extent { len, hole: true };
        let data = |len| Extent { len, hole: false };
        assert_eq!(
            d.extents(0, size).unwrap(),
            vec![data(2 * 4096), hole(498 * 4096), data(4096), hole(498 * 4096), data(4096)]
        );
        assert_eq!(
            d.extents(100, size - 200).unwrap(),
            vec![data(2 * 4096 - 100), hole(498 * 4096), data(4096), hole(498 * 4096), data(4096 - 100)]
        );
    }

    #[test]
    fn wrong_size_chunk_file_is_invalid_data() {
        let root = tempfile::tempdir().unwrap();
        let d = Dir::open(root.path(), 4 * CHUNK, CHUNK, 8).unwrap();
        let bad = root.path().join("2");
        fs::write(&bad, b"hello").unwrap();
        let mut buf = [0u8; 10];
        let err = d.read_at(&mut buf, 2 * CHUNK).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&*bad.to_string_lossy()), "{err}");
        let err = d.write_at(&buf, 2 * CHUNK + 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(fs::read(&bad).unwrap(), b"hello", "never truncated or padded");
        // Other chunks still work.
        d.write_at(&buf, CHUNK).unwrap();
        d.read_at(&mut buf, CHUNK).unwrap();
    }

    #[test]
    fn open_files_stay_within_the_bound() {
        let root = tempfile::tempdir().unwrap();
        let chunks = 64;
        let d = Arc::new(Dir::open(root.path(), chunks * 4096, 4096, 4).unwrap());
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let d = Arc::clone(&d);
                s.spawn(move || {
                    for i in 0..200u64 {
                        let c = (i * 7 + t * 13) % chunks;
                        let data = [u8::try_from(c).unwrap(); 100];
                        d.write_at(&data, c * 4096 + 50).unwrap();
                        let mut back = [0u8; 100];
                        d.read_at(&mut back, c * 4096 + 50).unwrap();
                        assert_eq!(back, data);
                        assert!(d.open_files() <= 4, "{} open files", d.open_files());
                    }
                });
            }
        });
        assert!(d.open_files() <= 4);
        assert_eq!(names(root.path()).len(), 64);
        // Flushing reopens evicted files and stays within the bound.
        d.flush().unwrap();
        assert!(d.open_files() <= 4);
        assert!(d.lock_pending().chunks.is_empty());
    }

    #[test]
    fn trim_deletes_whole_chunks_and_zeroes_partial_ones() {
        let root = tempfile::tempdir().unwrap();
        let size = 4 * CHUNK;
        let d = Dir::open(root.path(), size, CHUNK, 8).unwrap();
        d.write_at(&vec![9u8; usize::try_from(size).unwrap()], 0).unwrap();
        assert_eq!(d.open_files(), 4);
        // Chunk 1 whole, chunk 2 in part.
        d.trim(CHUNK, CHUNK + 100).unwrap();
        assert_eq!(names(root.path()), vec!["0", "2", "3"]);
        assert_eq!(d.open_files(), 3);
        let mut buf = vec![1u8; usize::try_from(CHUNK + 200).unwrap()];
        d.read_at(&mut buf, CHUNK).unwrap();
        assert!(buf[..usize::try_from(CHUNK + 100).unwrap()].iter().all(|&b| b == 0));
        assert!(buf[usize::try_from(CHUNK + 100).unwrap()..].iter().all(|&b| b == 9));
        // Writing the trimmed chunk again creates a fresh file, not the deleted one.
        d.write_at(b"back", CHUNK + 1).unwrap();
        let mut four = [0u8; 4];
        d.read_at(&mut four, CHUNK + 1).unwrap();
        assert_eq!(&four, b"back");
        assert_eq!(fs::read(root.path().join("1")).unwrap()[1..5], *b"back");
        d.write_zeroes(0, size).unwrap();
        assert!(names(root.path()).is_empty());
        d.flush().unwrap();
    }

    #[test]
    fn failed_flush_keeps_chunks_for_the_retry() {
        let root = tempfile::tempdir().unwrap();
        let d = Dir::open(root.path(), 4 * CHUNK, CHUNK, 1).unwrap();
        d.write_at(b"a", 0).unwrap();
        d.write_at(b"b", CHUNK).unwrap(); // evicts chunk 0
        assert_eq!(d.open_files(), 1);
        // Replace chunk 0 behind the backend's back: reopening it for the flush fails.
        fs::remove_file(root.path().join("0")).unwrap();
        fs::write(root.path().join("0"), b"short").unwrap();
        let err = d.flush().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(d.lock_pending().chunks.iter().copied().collect::<Vec<_>>(), vec![0]);
        fs::remove_file(root.path().join("0")).unwrap();
        d.flush().unwrap();
        assert!(d.lock_pending().chunks.is_empty());
    }

    #[test]
    fn uncreatable_directory_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("plain");
        fs::write(&file, b"x").unwrap();
        for path in [file.join("chunks"), file.clone()] {
            let err = Dir::open(&path, 100, 10, 4).unwrap_err();
            assert!(err.to_string().contains("cannot create the chunk directory"), "{err}");
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        }
        assert_eq!(Dir::open(root.path(), 100, 0, 4).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn dir_is_send_sync_debug() {
        fn check<T: Send + Sync + fmt::Debug>() {}
        check::<Dir>();
        check::<super::super::File>();
        let root = tempfile::tempdir().unwrap();
        let d = Dir::open(root.path(), 100, 10, 4).unwrap();
        assert!(format!("{d:?}").contains("open_files"));
    }
}
