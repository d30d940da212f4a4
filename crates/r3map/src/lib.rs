//! r3map as one library: a backend opened from a URL, whatever it is. [`open`] takes
//! `memory:4GiB`, `file:///srv/disk.img`, `nbd://host/export`, `redis://host/0?size=1GiB` and
//! the rest of the forms below, and returns a [`Backend`] ready for the pipeline, a mount or a
//! server, so that a program need not know which crate speaks which protocol.
//!
//! What it does not: speak any protocol itself. Each scheme's own parameters are read by the
//! crate that speaks it ([`r3map_net::ClientOptions::from_url`],
//! `r3map_nbd::NbdClientOptions::from_url`, the stores' constructors), all with the one parser,
//! [`params`] (from `r3map-net`, the lowest crate they share): the same typed getters, the same
//! refusal of unknown and repeated parameters, the same multi-host authorities, and messages that
//! never show a secret. This crate holds the one table that maps schemes to them, the parameters
//! every store takes (`size`, `chunk-size`, `max-batch`) and the local backends.
//!
//! ```no_run
//! let opened = r3map::open("memory:1GiB", &r3map::OpenOptions::default())?;
//! assert_eq!(r3map::Backend::size(&*opened.backend), 1 << 30);
//! for scheme in r3map::schemes() {
//!     println!("{}: {}", scheme.form(), scheme.description());
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Features
//! One per family of schemes, all on by default: `net` (`r3map://` and its plaintext and Unix
//! forms), `nbd`, `grpc`, `redis`, `s3` and `cassandra`. The local backends are always there. A
//! scheme whose feature is off is still in [`schemes()`], and opening it says which feature it
//! needs.
//!
//! # Layout
//! - [`schemes`](mod@schemes): the table of schemes, with a form and a line of help for each.
//! - [`params`] (re-exported from `r3map-net`): [`Params`], the query with typed getters, and
//!   [`BackendUrl`], a URL whose authority may list several hosts.
//! - [`local`]: memory, files, block devices and chunk directories.
//! - `remote`: r3map, gRPC and NBD servers; `store`: Redis, S3 and Cassandra.
//!
//! # Backend URLs
//!
//! | URL | Backend |
//! |---|---|
//! | `memory:SIZE` | sparse memory of `SIZE` bytes (`memory:4GiB`), gone when the process ends |
//! | `file:///PATH` | an existing regular file or block device, at its current size |
//! | `file:///PATH?size=SIZE` | a regular file of `SIZE` bytes, created (sparse) if missing |
//! | `file:///PATH?size=SIZE&truncate=true` | the file emptied (all zeroes) and set to `SIZE` bytes |
//! | `dir:///PATH?size=SIZE[&chunk-size=SIZE][&max-open=N]` | one file per chunk in a directory |
//!
//! Sizes take the units of [`parse_size`](r3map_core::units::parse_size) (`4096`, `64KiB`, `4GiB`). Paths are absolute (three
//! slashes) and percent-encoded where needed (`%20` for a space).
//!
//! ## Files: when is a file created, kept or emptied?
//! Data is never thrown away unless the URL says so:
//! - without `size`, the file (or block device) must exist and is used as it is;
//! - with `size`, a missing file is created sparse at that size, an empty file is grown to it, and
//!   an existing file of exactly that size is used as it is (so restarting a server with the same
//!   URL keeps its data); an existing file of another size is an error;
//! - `truncate=true` (which needs `size`) empties the file and sets it to `size`, whatever it held.
//!
//! A block device always keeps its own size: `size` must match it and `truncate` is refused.
//!
//! ## Directories
//! `size` is required; `chunk-size` defaults to the chunk size the caller passes (the server's
//! `--chunk-size`), `max-open` (open chunk files) to 512 as in the original `ram-ul`. The directory
//! is created if missing. Its geometry is recorded in a file `.r3map-dir` inside it, and opening it
//! again with another size or chunk size is an error, since chunk files cut at one chunk size are
//! garbage at another.
//!
//! ## Remotes
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
//! ## Stores (one key, object or row per chunk; `size=SIZE` required, `chunk-size=SIZE` defaults to the caller's, `max-batch=N` chunks per request)
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
//! Every URL is checked for parameters given twice before it is opened, and a URL's errors name
//! it, without its secrets (`token`, `secret-access-key`, a password: `******`):
//! `cannot open the backend 'URL': ...`.

pub mod local;
#[cfg(any(feature = "net", feature = "grpc", feature = "nbd"))]
mod remote;
pub mod schemes;
#[cfg(any(feature = "redis", feature = "s3", feature = "cassandra"))]
mod store;

use std::fmt;
use std::io;

pub use params::{BackendUrl, HostPort, Params, UrlError};
pub use r3map_core::{Backend, SharedBackend};
pub use r3map_net::Io;
pub use r3map_net::params;
pub use schemes::{Scheme, schemes};

// The crates behind the schemes, for what a URL does not say.
pub use r3map_core as core;
#[cfg(feature = "grpc")]
pub use r3map_grpc as grpc;
#[cfg(feature = "nbd")]
pub use r3map_nbd as nbd;
pub use r3map_net as net;
#[cfg(any(feature = "redis", feature = "s3", feature = "cassandra"))]
pub use r3map_stores as stores;

/// How to open a backend.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open files and block devices read-only (and refuse URLs that would create or empty one).
    pub read_only: bool,
    /// The chunk size of a directory or store whose URL gives none.
    pub chunk_size: u64,
    /// The runtime network clients and stores run on; `None` is [`Io::shared`].
    pub io: Option<Io>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self { read_only: false, chunk_size: r3map_core::pipeline::synced::DEFAULT_CHUNK_SIZE, io: None }
    }
}

impl OpenOptions {
    /// The runtime to run on: the one given, or the shared one.
    pub(crate) fn io(&self) -> Io {
        self.io.clone().unwrap_or_else(Io::shared)
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

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("description", &self.description)
            .field("size", &self.backend.size())
            .field("volatile", &self.volatile)
            .finish()
    }
}

/// Opens the backend a URL names; see the [crate documentation](crate) for the forms.
///
/// # Errors
/// A sentence naming the URL and what is wrong: an unknown scheme or parameter, a parameter
/// given twice, a bad size, a missing file, a size that does not match, a scheme this build
/// leaves out (`Unsupported`), or the error of opening, creating or connecting to the storage
/// (whose kind it keeps: `NotFound`, `PermissionDenied`, `ConnectionRefused`...).
pub fn open(url: &str, options: &OpenOptions) -> io::Result<Opened> {
    open_inner(url, options).map_err(|e| {
        // Messages never show a secret of the URL (a token, a password, an S3 secret key).
        let shown = params::shown(url);
        // A URL error names the URL already; say it once.
        let cause = match e.get_ref().and_then(|inner| inner.downcast_ref::<UrlError>()) {
            Some(u) if u.url() == shown => u.problem().to_owned(),
            _ => e.to_string(),
        };
        io::Error::new(e.kind(), format!("cannot open the backend '{shown}': {cause}"))
    })
}

fn open_inner(url: &str, options: &OpenOptions) -> io::Result<Opened> {
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
    let Some((scheme, _)) = url.split_once(':') else {
        if url.starts_with('/') {
            return Err(invalid(format!("a path is not a backend URL; for a file, write file://{url}")));
        }
        return Err(invalid(format!("it is not a backend URL; {}", schemes::forms())));
    };
    let Some(found) = schemes::find(scheme) else {
        let scheme = scheme.to_ascii_lowercase();
        return Err(invalid(format!("unknown backend type '{scheme}'; {}", schemes::forms())));
    };
    found.open(url, Params::parse(url)?, options)
}
