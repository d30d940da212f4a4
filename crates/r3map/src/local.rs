//! The local backends: sparse memory, files and block devices, chunk directories (see the
//! [crate documentation](crate) for their URLs and when a file is created, kept or emptied).

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use r3map_core::units::{human, parse_size};
use r3map_core::{Backend as _, Dir, File, Memory, SharedBackend};

use crate::params::Params;
use crate::{OpenOptions, Opened};

/// Chunk files a directory backend keeps open unless `max-open` says otherwise (the original's
/// `maxOpenFiles`).
pub const DEFAULT_MAX_OPEN: usize = 512;

/// The file in a chunk directory that records its geometry.
pub const DIR_GEOMETRY_FILE: &str = ".r3map-dir";

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// `what: error`, of the error's kind.
fn context(e: &io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// `memory:SIZE` (also `memory://SIZE`).
pub(crate) fn open_memory(url: &str, params: Params, _: &OpenOptions) -> io::Result<Opened> {
    params.finish()?;
    let (_, rest) = url.split_once(':').unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let size = parse_size(rest.trim_start_matches("//"))
        .map_err(|e| invalid(format!("{e}; write memory:SIZE, for example memory:4GiB")))?;
    if size == 0 {
        return Err(invalid("the size of a memory backend must not be zero".to_owned()));
    }
    Ok(Opened::volatile(Arc::new(Memory::new(size)), "memory".to_owned()))
}

/// `file:///PATH[?size=SIZE[&truncate=true]]`.
pub(crate) fn open_file_url(url: &str, mut params: Params, options: &OpenOptions) -> io::Result<Opened> {
    let path = local_path(url)?;
    let size = params.size("size")?;
    let truncate = params.flag("truncate")?.unwrap_or(false);
    params.finish()?;
    open_file(&path, size, truncate, options.read_only)
}

/// `dir:///PATH?size=SIZE[&chunk-size=SIZE][&max-open=N]`.
pub(crate) fn open_dir_url(url: &str, mut params: Params, options: &OpenOptions) -> io::Result<Opened> {
    let path = local_path(url)?;
    let size = params.size("size")?.ok_or_else(|| {
        params.error("size", "a directory backend needs its size: add ?size=SIZE, for example ?size=4GiB")
    })?;
    let chunk_size = params.size("chunk-size")?.unwrap_or(options.chunk_size);
    let max_open = params.number("max-open", "a number of files")?.unwrap_or(DEFAULT_MAX_OPEN);
    params.finish()?;
    open_dir(&path, size, chunk_size, max_open)
}

/// The absolute path a `SCHEME:///PATH` URL names, percent-decoded.
fn local_path(url: &str) -> io::Result<PathBuf> {
    let (scheme, after_scheme) = url.split_once(':').unwrap_or(("file", url));
    if !after_scheme.starts_with("///") && !after_scheme.starts_with("//localhost/") {
        return Err(invalid(format!("the path must be absolute, after three slashes: {scheme}:///PATH")));
    }
    // Parsed as a file URL whatever the scheme, for `to_file_path` (which decodes `%20` and the
    // like) and the same rules for every scheme that names a path.
    let parsed = url::Url::parse(&format!("file:{after_scheme}"))
        .map_err(|e| invalid(format!("it is not a valid URL: {e}")))?;
    parsed.to_file_path().map_err(|()| invalid("it does not name a local path".to_owned()))
}

/// Opens, creates or empties a file as the [crate documentation](crate) says.
///
/// # Errors
/// A missing file without `size` (`NotFound`), a size that does not match, `truncate` without
/// `size` or on a block device, creating or emptying in read-only mode, and any I/O error (with
/// the path).
pub fn open_file(path: &Path, size: Option<u64>, truncate: bool, read_only: bool) -> io::Result<Opened> {
    let shown = path.display();
    let description = format!("file {shown}");
    let open = |read_only: bool| -> io::Result<SharedBackend> {
        let file = if read_only { File::open_read_only(path) } else { File::open(path) };
        Ok(Arc::new(file?))
    };
    if truncate && size.is_none() {
        return Err(invalid("truncate=true needs the new size: add &size=SIZE".to_owned()));
    }
    let meta = match fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(context(&e, &format!("cannot inspect {shown}"))),
    };
    let Some(meta) = meta else {
        let Some(size) = size else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{shown} does not exist; add ?size=SIZE to create it"),
            ));
        };
        if read_only {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{shown} does not exist, and a read-only server does not create files"),
            ));
        }
        return Ok(Opened::new(Arc::new(File::create(path, size)?), description));
    };
    let file_type = meta.file_type();
    if file_type.is_block_device() {
        if truncate {
            return Err(invalid(format!("{shown} is a block device, which cannot be truncated")));
        }
        let backend = open(read_only)?;
        if let Some(size) = size
            && size != backend.size()
        {
            return Err(invalid(format!(
                "{shown} is a block device of {} ({} bytes), not the {} asked for with ?size",
                human(backend.size()),
                backend.size(),
                human(size)
            )));
        }
        return Ok(Opened::new(backend, format!("block device {shown}")));
    }
    if !file_type.is_file() {
        return Err(invalid(format!("{shown} is neither a regular file nor a block device")));
    }
    match size {
        None if meta.len() == 0 => {
            Err(invalid(format!("{shown} is empty; add ?size=SIZE to give it a size")))
        }
        None => Ok(Opened::new(open(read_only)?, description)),
        Some(size) if truncate || meta.len() == 0 => {
            if read_only {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "a read-only server does not change files: drop truncate=true or the size",
                ));
            }
            let backend = Arc::new(File::create(path, size)?);
            // Emptied on every start: a restarted server no longer has what it had.
            Ok(if truncate {
                Opened::volatile(backend, description)
            } else {
                Opened::new(backend, description)
            })
        }
        Some(size) if size == meta.len() => Ok(Opened::new(open(read_only)?, description)),
        Some(size) => Err(invalid(format!(
            "{shown} holds {} ({} bytes), not the {} ({size} bytes) asked for with ?size; add &truncate=true to \
             empty it and set the new size, or drop ?size to use it as it is",
            human(meta.len()),
            meta.len(),
            human(size)
        ))),
    }
}

/// Opens (creating it if missing) a chunk directory, checking its recorded geometry.
///
/// # Errors
/// A zero size or chunk size, a directory recorded with another geometry, and any I/O error.
pub fn open_dir(path: &Path, size: u64, chunk_size: u64, max_open: usize) -> io::Result<Opened> {
    if size == 0 || chunk_size == 0 {
        return Err(invalid("the size and chunk size of a directory backend must not be zero".to_owned()));
    }
    let dir = Dir::open(path, size, chunk_size, max_open)?;
    let record = path.join(DIR_GEOMETRY_FILE);
    let geometry = format!("size={size}\nchunk-size={chunk_size}\n");
    match fs::read_to_string(&record) {
        Ok(found) if found == geometry => {}
        Ok(found) => {
            let found = found.trim().replace('\n', ", ");
            return Err(invalid(format!(
                "{} holds chunks of another geometry ({found}), not size={size}, chunk-size={chunk_size}; \
                 use the same size and chunk size, or an empty directory",
                path.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::write(&record, geometry)
                .map_err(|e| context(&e, &format!("cannot write {}", record.display())))?;
        }
        Err(e) => return Err(context(&e, &format!("cannot read {}", record.display()))),
    }
    let description =
        format!("directory {} ({} chunks, {max_open} open files)", path.display(), human(chunk_size));
    Ok(Opened::new(Arc::new(dir), description))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open;

    fn err(url: &str) -> String {
        open(url, &OpenOptions::default()).unwrap_err().to_string()
    }

    fn ok(url: &str) -> Opened {
        open(url, &OpenOptions::default()).unwrap()
    }

    fn url(scheme: &str, path: &Path, query: &str) -> String {
        format!("{scheme}://{}{query}", path.display())
    }

    #[test]
    fn memory() {
        let m = ok("memory:4GiB");
        assert_eq!(m.backend.size(), 4 << 30);
        assert_eq!(m.description, "memory");
        assert_eq!(ok("memory:4096").backend.size(), 4096);
        m.backend.write_at(&[1, 2, 3], 10).unwrap();
        let mut buf = [0u8; 3];
        m.backend.read_at(&mut buf, 10).unwrap();
        assert_eq!(buf, [1, 2, 3]);
    }

    #[test]
    fn only_data_that_does_not_survive_a_restart_is_volatile() {
        assert!(ok("memory:1MiB").volatile);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert!(!ok(&url("file", &path, "?size=1MiB")).volatile, "created, then kept on restart");
        assert!(!ok(&url("file", &path, "?size=1MiB")).volatile);
        assert!(!ok(&url("file", &path, "")).volatile);
        assert!(ok(&url("file", &path, "?size=1MiB&truncate=true")).volatile, "emptied on every start");
        assert!(!ok(&url("dir", &dir.path().join("d"), "?size=1MiB")).volatile);
    }

    #[test]
    fn memory_errors() {
        let e = err("memory:lots");
        assert!(e.contains("cannot open the backend 'memory:lots'") && e.contains("memory:SIZE"), "{e}");
        assert!(err("memory:0").contains("must not be zero"));
        assert!(err("memory:12XB").contains("unknown size unit"));
    }

    #[test]
    fn file_is_created_with_a_size_and_kept_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = ok(&url("file", &path, "?size=1MiB"));
        assert_eq!(f.backend.size(), 1 << 20);
        f.backend.write_at(b"kept", 100).unwrap();
        f.backend.flush().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 20);
        // The same URL again keeps the data; so does no size at all.
        for u in [url("file", &path, "?size=1MiB"), url("file", &path, "")] {
            let again = ok(&u);
            let mut buf = [0u8; 4];
            again.backend.read_at(&mut buf, 100).unwrap();
            assert_eq!(&buf, b"kept", "{u}");
        }
        // truncate=true empties it at the new size.
        let t = ok(&url("file", &path, "?size=2MiB&truncate=true"));
        assert_eq!(t.backend.size(), 2 << 20);
        let mut buf = [9u8; 4];
        t.backend.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn an_empty_file_is_grown_and_a_percent_encoded_path_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("with space");
        fs::write(&path, b"").unwrap();
        let u = format!("file://{}/with%20space?size=64KiB", dir.path().display());
        assert_eq!(ok(&u).backend.size(), 65536);
        assert_eq!(fs::metadata(&path).unwrap().len(), 65536);
    }

    #[test]
    fn file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let e = err(&url("file", &missing, ""));
        assert!(e.contains("does not exist; add ?size=SIZE"), "{e}");
        assert!(e.contains(&format!("'file://{}'", missing.display())), "{e}");

        let path = dir.path().join("one-mib");
        fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let e = err(&url("file", &path, "?size=2MiB"));
        assert!(e.contains("not the 2.0 MiB") && e.contains("truncate=true"), "{e}");
        assert!(err(&url("file", &path, "?truncate=true")).contains("needs the new size"));
        assert!(err(&url("file", &path, "?colour=blue")).contains("unknown parameter 'colour'"));
        assert!(err(&url("file", &path, "?size=1MiB&size=1MiB")).contains("given twice"));
        assert!(err(&url("file", &path, "?size=0")).contains("must not be zero"));
        assert!(err(&url("file", &path, "?truncate=maybe")).contains("neither true nor false"));
        assert!(err(&url("file", dir.path(), "")).contains("neither a regular file nor a block device"));

        let empty = dir.path().join("empty");
        fs::write(&empty, b"").unwrap();
        assert!(err(&url("file", &empty, "")).contains("is empty; add ?size=SIZE"));

        let e = err("file://relative/path");
        assert!(e.contains("three slashes"), "{e}");
        let e = err(&path.display().to_string());
        assert!(e.contains(&format!("write file://{}", path.display())), "{e}");
    }

    #[test]
    fn read_only_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        fs::write(&path, vec![7u8; 8192]).unwrap();
        let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
        let f = open(&url("file", &path, ""), &ro).unwrap();
        assert!(f.backend.capabilities().read_only);
        assert!(f.backend.write_at(&[1], 0).is_err());
        let e = format!("{}", open(&url("file", &path, "?size=4KiB&truncate=true"), &ro).unwrap_err());
        assert!(e.contains("read-only"), "{e}");
        let e = format!("{}", open(&url("file", &dir.path().join("new"), "?size=4KiB"), &ro).unwrap_err());
        assert!(e.contains("does not create files"), "{e}");
    }

    #[test]
    fn directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunks");
        let d = ok(&url("dir", &path, "?size=1MiB&chunk-size=4KiB&max-open=8"));
        assert_eq!(d.backend.size(), 1 << 20);
        assert!(
            d.description.contains("4.0 KiB chunks") && d.description.contains("8 open files"),
            "{}",
            d.description
        );
        d.backend.write_at(&[5u8; 10], 4096 * 3 + 1).unwrap();
        d.backend.flush().unwrap();
        assert!(path.join("3").exists());
        drop(d);
        // Reopening with the same geometry keeps the data; the chunk size defaults to the option.
        let opts = OpenOptions { chunk_size: 4096, ..OpenOptions::default() };
        let again = open(&url("directory", &path, "?size=1MiB"), &opts).unwrap();
        let mut buf = [0u8; 10];
        again.backend.read_at(&mut buf, 4096 * 3 + 1).unwrap();
        assert_eq!(buf, [5u8; 10]);
    }

    #[test]
    fn directory_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunks");
        let e = err(&url("dir", &path, ""));
        assert!(e.contains("needs its size"), "{e}");
        assert!(err(&url("dir", &path, "?size=1MiB&max-open=many")).contains("max-open=many"));
        assert!(err(&url("dir", &path, "?size=1MiB&chunk-size=0")).contains("chunk-size must not be zero"));
        ok(&url("dir", &path, "?size=1MiB&chunk-size=4KiB"));
        let e = err(&url("dir", &path, "?size=1MiB&chunk-size=8KiB"));
        assert!(e.contains("another geometry") && e.contains("chunk-size=4096"), "{e}");
        let e = err(&url("dir", &path, "?size=2MiB&chunk-size=4KiB"));
        assert!(e.contains("another geometry"), "{e}");
    }
}
