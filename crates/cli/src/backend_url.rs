//! Opening a storage backend from a URL, as `r3map serve` takes it.
//!
//! | URL | Backend |
//! |---|---|
//! | `memory:SIZE` | sparse memory of `SIZE` bytes (`memory:4GiB`), gone when the process ends |
//! | `file:///PATH` | an existing regular file or block device, at its current size |
//! | `file:///PATH?size=SIZE` | a regular file of `SIZE` bytes, created (sparse) if missing |
//! | `file:///PATH?size=SIZE&truncate=true` | the file emptied (all zeroes) and set to `SIZE` bytes |
//! | `dir:///PATH?size=SIZE[&chunk-size=SIZE][&max-open=N]` | one file per chunk in a directory |
//!
//! Sizes take the units of [`parse_size`] (`4096`, `64KiB`, `4GiB`). Paths are absolute (three
//! slashes) and percent-encoded where needed (`%20` for a space).
//!
//! # Files: when is a file created, kept or emptied?
//! Data is never thrown away unless the URL says so:
//! - without `size`, the file (or block device) must exist and is used as it is;
//! - with `size`, a missing file is created sparse at that size, an empty file is grown to it, and
//!   an existing file of exactly that size is used as it is (so restarting a server with the same
//!   URL keeps its data); an existing file of another size is an error;
//! - `truncate=true` (which needs `size`) empties the file and sets it to `size`, whatever it held.
//!
//! A block device always keeps its own size: `size` must match it and `truncate` is refused.
//!
//! # Directories
//! `size` is required; `chunk-size` defaults to the chunk size the caller passes (the server's
//! `--chunk-size`), `max-open` (open chunk files) to 512 as in the original `ram-ul`. The directory
//! is created if missing. Its geometry is recorded in a file `.r3map-dir` inside it, and opening it
//! again with another size or chunk size is an error, since chunk files cut at one chunk size are
//! garbage at another.
//!
//! # Remotes
//! | URL | Backend |
//! |---|---|
//! | `r3map://HOST[:PORT]/EXPORT?ca=PATH[&token=T]...` | an r3map server over TLS ([`r3map_net::ClientOptions::from_url`]) |
//! | `r3map+plain://HOST[:PORT]/EXPORT` | an r3map server over plaintext TCP |
//! | `r3map+unix:///EXPORT?socket=PATH` | an r3map server on a Unix socket |
//! | `grpc://HOST:PORT?size=SIZE` | a Go r3map (or our) gRPC `Backend` service, plaintext; the size is given since the service has no size call |
//! | `nbd://HOST[:PORT]/[EXPORT]` | an export of any NBD server (`nbdkit`, `qemu-nbd`, `r3map serve --nbd`); port 10809 by default, the empty export is the default one ([`r3map_nbd::NbdClientOptions::from_url`]) |
//! | `nbd+unix:///[EXPORT]?socket=PATH` | an export of an NBD server on a Unix socket |
//! | `nbds://HOST[:PORT]/[EXPORT]?tls-certificates=DIR` | the same over TLS (`NBD_OPT_STARTTLS`), which is then required; `DIR` holds `ca-cert.pem` and, for a client certificate, `client-cert.pem` and `client-key.pem`, as for libnbd |
//! | `nbds://HOST[:PORT]/[EXPORT]?ca=PATH[&cert=PATH&key=PATH]` | the same with the CA (and client certificate and key) as PEM files, as `r3map://` takes them |
//! | `nbds+unix:///[EXPORT]?socket=PATH&tls-certificates=DIR` | TLS on a Unix socket (the certificate is checked for `localhost`) |
//!
//! # Stores (one key, object or row per chunk; `size=SIZE` required, `chunk-size=SIZE` defaults to the caller's, `max-batch=N` chunks per request)
//! | URL | Backend |
//! |---|---|
//! | `redis://[USER:PASS@]HOST[:PORT][/DB]?size=SIZE[&prefix=P]` | Redis keys `{prefix}{chunk}` (prefix `r3map:` by default); `rediss://` for TLS (`ca=PATH`), `redis+unix:///PATH?db=N` for a socket |
//! | `s3://BUCKET[/PREFIX]?size=SIZE[&endpoint=URL&region=R&access-key-id=K&secret-access-key=S&create-bucket=true]` | S3 objects `PREFIX/{chunk}`; credentials and region from the environment unless given |
//! | `cassandra://[USER:PASS@]HOST[:PORT][,HOST...]?size=SIZE[&keyspace=K&table=T&prefix=P]` | Cassandra or ScyllaDB rows; `cassandrasecure://` for TLS (`ca=PATH`) |
//!
//! NBD URIs take `connections=N` (used when the server allows several) and `timeout=SECONDS`;
//! `nbds` URIs also `tls-hostname=NAME` (the name the server's certificate is checked against).
//! TLS needs a CA (the system's trusted roots are not used) and always verifies the server's
//! certificate (`tls-verify-peer=false` is refused); it never falls back to plaintext.
//!
//! Redis and S3 backends are not supported yet; their URLs get an error that says so.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use r3map_core::{Backend as _, Dir, File, Memory, SharedBackend};

use crate::units::{human, parse_size};

/// Chunk files a directory backend keeps open unless `max-open` says otherwise (the original's
/// `maxOpenFiles`).
pub const DEFAULT_MAX_OPEN: usize = 512;

/// The file in a chunk directory that records its geometry.
pub const DIR_GEOMETRY_FILE: &str = ".r3map-dir";

/// How to open a backend.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Open files and block devices read-only (and refuse URLs that would create or empty one).
    pub read_only: bool,
    /// The chunk size of a directory backend whose URL gives none.
    pub chunk_size: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self { read_only: false, chunk_size: r3map_core::pipeline::synced::DEFAULT_CHUNK_SIZE }
    }
}

/// An open backend and a description of it for people (without secrets).
#[derive(Clone)]
pub struct Opened {
    pub backend: SharedBackend,
    /// `memory`, `file /srv/disk.img`, `directory /srv/chunks (64.0 KiB chunks)`, ...
    pub description: String,
    /// The data does not outlive this process: memory, or storage emptied on every start
    /// (`truncate=true`). A server says so to its clients, so that they do not take a restarted
    /// server's empty storage for their data.
    pub volatile: bool,
}

impl Opened {
    /// A backend whose data outlives this process.
    #[must_use]
    pub fn new(backend: SharedBackend, description: String) -> Self {
        Self { backend, description, volatile: false }
    }

    /// A backend whose data is gone when this process ends (or starts again).
    #[must_use]
    pub fn volatile(backend: SharedBackend, description: String) -> Self {
        Self { backend, description, volatile: true }
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("description", &self.description)
            .field("size", &self.backend.size())
            .finish()
    }
}

const FORMS: &str = "use memory:SIZE, file:///PATH[?size=SIZE[&truncate=true]], \
                     dir:///PATH?size=SIZE[&chunk-size=SIZE][&max-open=N], an r3map server \
                     (r3map://, r3map+plain://, r3map+unix://), grpc://HOST:PORT?size=SIZE or an NBD \
                     server (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds:// and \
                     nbds+unix:// with ?tls-certificates=DIR), or a store (redis://HOST/DB?size=SIZE, \
                     s3://BUCKET/PREFIX?size=SIZE, cassandra://HOST?size=SIZE)";

/// A URL without its query (which may hold a token).
fn remote_name(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// Opens the backend a URL names; see the [module documentation](self) for the forms.
///
/// # Errors
/// A sentence naming the URL and what is wrong: an unknown scheme or parameter, a bad size, a
/// missing file, a size that does not match, or the error of opening or creating the storage.
pub fn open(url: &str, options: &OpenOptions) -> anyhow::Result<Opened> {
    open_inner(url, options).with_context(|| format!("cannot open the backend '{url}'"))
}

fn open_inner(url: &str, options: &OpenOptions) -> anyhow::Result<Opened> {
    let Some((scheme, rest)) = url.split_once(':') else {
        if url.starts_with('/') {
            bail!("a path is not a backend URL; for a file, write file://{url}");
        }
        bail!("it is not a backend URL; {FORMS}");
    };
    match scheme.to_ascii_lowercase().as_str() {
        "memory" | "mem" => {
            let size = parse_size(rest.trim_start_matches("//"))
                .map_err(|e| anyhow!("{e}; write memory:SIZE, for example memory:4GiB"))?;
            if size == 0 {
                bail!("the size of a memory backend must not be zero");
            }
            Ok(Opened::volatile(Arc::new(Memory::new(size)), "memory".to_owned()))
        }
        "file" => {
            let (path, mut params) = path_and_params(url)?;
            let size = params.size()?;
            let truncate = params.flag("truncate")?;
            params.finish()?;
            open_file(&path, size, truncate, options.read_only)
        }
        "dir" | "directory" => {
            let (path, mut params) = path_and_params(url)?;
            let size = params.size()?.ok_or_else(|| {
                anyhow!("a directory backend needs its size: add ?size=SIZE, for example ?size=4GiB")
            })?;
            let chunk_size = params.take_size("chunk-size")?.unwrap_or(options.chunk_size);
            let max_open = match params.take("max-open") {
                Some(v) => v.parse().map_err(|_| anyhow!("max-open={v} is not a number of files"))?,
                None => DEFAULT_MAX_OPEN,
            };
            params.finish()?;
            open_dir(&path, size, chunk_size, max_open)
        }
        "r3map" | "r3map+plain" | "r3map+unix" => {
            let remote = r3map_net::RemoteBackend::open(url)?;
            let description = format!("r3map server {}", remote_name(url));
            Ok(Opened::new(Arc::new(remote), description))
        }
        "grpc" => {
            let parsed = url::Url::parse(url).map_err(|e| anyhow!("it is not a valid URL: {e}"))?;
            let host = parsed
                .host_str()
                .ok_or_else(|| anyhow!("a gRPC URL needs a host: grpc://HOST:PORT?size=SIZE"))?;
            let port = parsed.port().unwrap_or(r3map_net::client::DEFAULT_PORT);
            let mut params =
                Params(parsed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect());
            let size = params.size()?.ok_or_else(|| {
                anyhow!("a gRPC remote has no size call: add ?size=SIZE (the size the server exports)")
            })?;
            params.finish()?;
            let endpoint = format!("http://{host}:{port}");
            let remote =
                r3map_grpc::GrpcBackend::connect(&endpoint, size, r3map_grpc::GrpcClientOptions::default())?;
            Ok(Opened::new(Arc::new(remote), format!("gRPC server {endpoint}")))
        }
        "nbd" | "nbd+unix" | "nbds" | "nbds+unix" => {
            let remote = r3map_nbd::NbdBackend::open(url)?;
            let description = nbd_description(&remote);
            Ok(Opened::new(Arc::new(remote), description))
        }
        "redis" | "rediss" | "redis+unix" | "s3" | "cassandra" | "cassandrasecure" => {
            let stored = r3map_stores::open(url, options.chunk_size)?;
            let description = stored.store().describe();
            Ok(Opened::new(Arc::new(stored), description))
        }
        other => bail!("unknown backend type '{other}'; {FORMS}"),
    }
}

/// `NBD server 127.0.0.1:10809 export 'disk'`, or `... default export`, with ` over TLS` when
/// it is.
fn nbd_description(remote: &r3map_nbd::NbdBackend) -> String {
    let (address, export) = (remote.address(), remote.export());
    let tls = if remote.tls() { " over TLS" } else { "" };
    if export.is_empty() {
        format!("NBD server {address} default export{tls}")
    } else {
        format!("NBD server {address} export '{export}'{tls}")
    }
}

/// The query parameters of a URL, taken one by one so leftovers can be reported.
struct Params(HashMap<String, String>);

impl Params {
    fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    fn take_size(&mut self, key: &str) -> anyhow::Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => {
                let size = parse_size(&v).map_err(|e| anyhow!("{key}={v}: {e}"))?;
                if size == 0 {
                    bail!("{key} must not be zero");
                }
                Ok(Some(size))
            }
        }
    }

    fn size(&mut self) -> anyhow::Result<Option<u64>> {
        self.take_size("size")
    }

    fn flag(&mut self, key: &str) -> anyhow::Result<bool> {
        match self.take(key).as_deref() {
            None | Some("false" | "0" | "no") => Ok(false),
            Some("" | "true" | "1" | "yes") => Ok(true),
            Some(other) => bail!("{key}={other} is neither true nor false"),
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        let mut keys: Vec<_> = self.0.into_keys().collect();
        keys.sort();
        match keys.first() {
            None => Ok(()),
            Some(k) => bail!("unknown parameter '{k}'"),
        }
    }
}

fn path_and_params(url: &str) -> anyhow::Result<(PathBuf, Params)> {
    let (scheme, after_scheme) = url.split_once(':').unwrap_or(("file", url));
    if !after_scheme.starts_with("///") && !after_scheme.starts_with("//localhost/") {
        bail!("the path must be absolute, after three slashes: {scheme}:///PATH");
    }
    // Parsed as a file URL whatever the scheme, for `to_file_path` (which decodes `%20` and the
    // like) and the same rules for every scheme that names a path.
    let parsed = url::Url::parse(&format!("file:{after_scheme}"))
        .map_err(|e| anyhow!("it is not a valid URL: {e}"))?;
    let path = parsed.to_file_path().map_err(|()| anyhow!("it does not name a local path"))?;
    let mut params = HashMap::new();
    for (k, v) in parsed.query_pairs() {
        if params.insert(k.clone().into_owned(), v.into_owned()).is_some() {
            bail!("the parameter '{k}' is given twice");
        }
    }
    Ok((path, Params(params)))
}

/// Opens, creates or empties a file as the [module documentation](self) says.
///
/// # Errors
/// A missing file without `size`, a size that does not match, `truncate` without `size` or on a
/// block device, creating or emptying in read-only mode, and any I/O error (with the path).
pub fn open_file(path: &Path, size: Option<u64>, truncate: bool, read_only: bool) -> anyhow::Result<Opened> {
    let shown = path.display();
    let description = format!("file {shown}");
    let open = |read_only: bool| -> anyhow::Result<SharedBackend> {
        let file = if read_only { File::open_read_only(path) } else { File::open(path) };
        Ok(Arc::new(file?))
    };
    if truncate && size.is_none() {
        bail!("truncate=true needs the new size: add &size=SIZE");
    }
    let meta = match fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {shown}")),
    };
    let Some(meta) = meta else {
        let Some(size) = size else {
            bail!("{shown} does not exist; add ?size=SIZE to create it");
        };
        if read_only {
            bail!("{shown} does not exist, and a read-only server does not create files");
        }
        return Ok(Opened::new(Arc::new(File::create(path, size)?), description));
    };
    let file_type = meta.file_type();
    if file_type.is_block_device() {
        if truncate {
            bail!("{shown} is a block device, which cannot be truncated");
        }
        let backend = open(read_only)?;
        if let Some(size) = size
            && size != backend.size()
        {
            bail!(
                "{shown} is a block device of {} ({} bytes), not the {} asked for with ?size",
                human(backend.size()),
                backend.size(),
                human(size)
            );
        }
        return Ok(Opened::new(backend, format!("block device {shown}")));
    }
    if !file_type.is_file() {
        bail!("{shown} is neither a regular file nor a block device");
    }
    match size {
        None if meta.len() == 0 => {
            bail!("{shown} is empty; add ?size=SIZE to give it a size")
        }
        None => Ok(Opened::new(open(read_only)?, description)),
        Some(size) if truncate || meta.len() == 0 => {
            if read_only {
                bail!("a read-only server does not change files: drop truncate=true or the size");
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
        Some(size) => bail!(
            "{shown} holds {} ({} bytes), not the {} ({size} bytes) asked for with ?size; add &truncate=true to \
             empty it and set the new size, or drop ?size to use it as it is",
            human(meta.len()),
            meta.len(),
            human(size)
        ),
    }
}

/// Opens (creating it if missing) a chunk directory, checking its recorded geometry.
///
/// # Errors
/// A zero size or chunk size, a directory recorded with another geometry, and any I/O error.
pub fn open_dir(path: &Path, size: u64, chunk_size: u64, max_open: usize) -> anyhow::Result<Opened> {
    if size == 0 || chunk_size == 0 {
        bail!("the size and chunk size of a directory backend must not be zero");
    }
    let dir = Dir::open(path, size, chunk_size, max_open)?;
    let record = path.join(DIR_GEOMETRY_FILE);
    let geometry = format!("size={size}\nchunk-size={chunk_size}\n");
    match fs::read_to_string(&record) {
        Ok(found) if found == geometry => {}
        Ok(found) => {
            let found = found.trim().replace('\n', ", ");
            bail!(
                "{} holds chunks of another geometry ({found}), not size={size}, chunk-size={chunk_size}; \
                 use the same size and chunk size, or an empty directory",
                path.display()
            );
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::write(&record, geometry).with_context(|| format!("cannot write {}", record.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", record.display())),
    }
    let description =
        format!("directory {} ({} chunks, {max_open} open files)", path.display(), human(chunk_size));
    Ok(Opened::new(Arc::new(dir), description))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        format!("{:#}", open(url, &OpenOptions::default()).unwrap_err())
    }

    fn ok(url: &str) -> Opened {
        open(url, &OpenOptions::default()).unwrap()
    }

    /// An address that refuses connections while the socket returned lives: bound to a port the
    /// kernel picked, never listening (so nobody else can listen there meanwhile).
    fn refusing() -> (rustix::fd::OwnedFd, String) {
        use rustix::net::{AddressFamily, SocketType, bind, getsockname, socket};
        let socket = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        bind(&socket, &std::net::SocketAddrV4::new([127, 0, 0, 1].into(), 0)).unwrap();
        let addr = std::net::SocketAddr::try_from(getsockname(&socket).unwrap()).unwrap();
        (socket, addr.to_string())
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
        let e = format!("{:#}", open(&url("file", &path, "?size=4KiB&truncate=true"), &ro).unwrap_err());
        assert!(e.contains("read-only"), "{e}");
        let e = format!("{:#}", open(&url("file", &dir.path().join("new"), "?size=4KiB"), &ro).unwrap_err());
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

    #[test]
    fn other_schemes() {
        // Stores need their size, and say so before connecting anywhere.
        assert!(err("redis://localhost:6379/0").contains("?size=SIZE"));
        assert!(err("s3://bucket/prefix").contains("?size=SIZE"));
        assert!(err("cassandra://a:9042,b:9043?keyspace=k").contains("?size=SIZE"));
        let e = err("ftp://example.com/x");
        assert!(e.contains("unknown backend type 'ftp'") && e.contains("memory:SIZE"), "{e}");
        assert!(err("nonsense").contains("not a backend URL"));
    }

    #[test]
    fn remote_urls_name_what_is_missing() {
        let opts = OpenOptions { read_only: false, chunk_size: 4096 };
        let err = format!("{:#}", open("grpc://127.0.0.1:1", &opts).err().unwrap());
        assert!(err.contains("?size=SIZE"), "{err}");
        let (_nobody, addr) = refusing();
        let err = format!("{:#}", open(&format!("r3map+plain://{addr}/default"), &opts).err().unwrap());
        assert!(err.contains(&addr), "{err}");
        let err = format!("{:#}", open("r3map://127.0.0.1:1/default", &opts).err().unwrap());
        assert!(err.contains("?ca=PATH"), "{err}");
    }

    #[test]
    fn nbd_urls_say_what_is_wrong() {
        let e = err("nbd://127.0.0.1:1/disk?colour=blue");
        assert!(e.contains("cannot open the backend") && e.contains("unknown parameter 'colour'"), "{e}");
        let e = err("nbd+unix:///disk");
        assert!(e.contains("?socket=PATH"), "{e}");
        let e = err("nbds://example.com/disk");
        assert!(e.contains("TLS needs the CA") && e.contains("tls-certificates=DIR"), "{e}");
        let e = err("nbd://example.com/disk?tls-certificates=/etc/pki");
        assert!(e.contains("use nbds:// for TLS"), "{e}");
        let (_nobody, addr) = refusing();
        let e = err(&format!("nbd://{addr}/disk"));
        assert!(e.contains(&format!("NBD server at {addr}")), "{e}");
        assert!(FORMS.contains("nbd://"));
    }

    /// Serves `server` on a Unix socket at `socket` in a thread; sending on the channel stops it.
    fn serve_nbd_unix(
        server: r3map_nbd::NbdServer,
        socket: &Path,
    ) -> (tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<std::io::Result<()>>) {
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                server.serve_unix(listener, async { drop(stopped.await) }).await
            })
        });
        (stop, thread)
    }

    #[test]
    fn nbd_urls_open_an_nbd_server() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let backend: r3map_core::SharedBackend = Arc::new(Memory::new(65536));
        let server = r3map_nbd::NbdServer::new(vec![r3map_nbd::NbdExport::new("disk", backend)]).unwrap();
        let (stop, thread) = serve_nbd_unix(server, &socket);
        let opened = ok(&format!("nbd+unix:///disk?socket={}", socket.display()));
        assert_eq!(opened.backend.size(), 65536);
        assert_eq!(opened.description, format!("NBD server unix:{} export 'disk'", socket.display()));
        let default = ok(&format!("nbd+unix:///?socket={}", socket.display()));
        assert!(default.description.ends_with("default export"), "{}", default.description);
        drop((opened, default));
        stop.send(()).unwrap();
        thread.join().unwrap().unwrap();
    }

    #[test]
    fn nbds_urls_open_an_nbd_server_over_tls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = r3map_net::certs::Authority::new("cli test CA").unwrap();
        let pem = ca.server(&["localhost"]).unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), &ca.pem().cert).unwrap();
        let config = r3map_net::server_tls(pem.cert.as_bytes(), pem.key.as_bytes(), None).unwrap();
        let socket = dir.path().join("nbd.sock");
        let backend: r3map_core::SharedBackend = Arc::new(Memory::new(65536));
        let server = r3map_nbd::NbdServer::new(vec![r3map_nbd::NbdExport::new("disk", backend)])
            .unwrap()
            .with_tls(r3map_nbd::NbdTls { config, mode: r3map_nbd::TlsMode::Require });
        let (stop, thread) = serve_nbd_unix(server, &socket);
        let url = format!(
            "nbds+unix:///disk?socket={}&tls-certificates={}",
            socket.display(),
            dir.path().display()
        );
        let opened = ok(&url);
        assert_eq!(opened.backend.size(), 65536);
        assert_eq!(
            opened.description,
            format!("NBD server unix:{} export 'disk' over TLS", socket.display())
        );
        drop(opened);
        stop.send(()).unwrap();
        thread.join().unwrap().unwrap();
    }
}
